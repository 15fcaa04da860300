"""Batched ancestral sampling with a KV cache, fast on a CPU: the one sampler of teacher text,
teacher-built preference pairs and on-policy distillation (teacher and MLA student alike).

Per step, for the rows still unfinished (B, 1):

    logits = model(next token, cache)[:, -1]      (B, V)   only the last position's logits
    token  = inverse-CDF draw from softmax(logits / T)   (B,)

What makes it fast, measured in ``bench/sampling.py`` against the first sampler:

* **in-place cache writes.** Every layer's slot holds a ``GrowingLayer`` (``mla/kv_cache.py``):
  preallocated buffers written in place, where transformers' ``DynamicLayer`` copies the whole
  cache with ``torch.cat`` at each step. MLA layers cache their latent (r + p values per token) and
  decode through the absorbed path without expanding it.
* **logits only where needed.** The prefill asks for the last position's logits
  (``logits_to_keep=1``), not T x V of them.
* **no mask when there is no padding.** Rows of equal length (the user header, plain text) need no
  attention mask; the model then skips building one per layer per step.
* **finished rows leave the batch** (their cache rows are dropped), so a step costs what the
  unfinished rows need.
* **matmul threads that pay.** On a shared machine OpenMP's threads wait for each other: a
  2-thread GEMM measured 19x slower than a 1-thread one under load 10 on 2 cores. ``ThreadChoice``
  times decode steps with each thread count and keeps the faster, re-checking every
  ``RECHECK`` steps. The choice changes no result: each output element of these GEMMs is one
  dot product whichever thread computes it, and attention runs eager while sampling (CPU SDPA
  splits a decode step's keys by thread); the tests check: same tokens either way.

Reproducible: the draws come from ``generator`` (teacher text passes a seeded CPU generator, so
a GPU run draws the same uniforms as a CPU run) or else the global torch RNG (seed it), one
uniform per row per step. What stays machine-dependent is the logits themselves: a GPU's
kernels, or another CPU's SIMD width, sum in another order, and a token drawn near a CDF
boundary can then differ; on one machine the thread count does not change them (above).
"""

from __future__ import annotations

import contextlib
import time

import torch

RECHECK = 64  # decode steps between two looks at which thread count is faster


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), by inverse CDF: (B, V) -> (B,).

    One cumulative sum and a binary search per row; torch.multinomial draws an exponential per
    vocabulary entry, which costs more than the model step itself on a CPU. Temperature 0: argmax.
    The uniforms come from `generator` (a CPU one: the same draws on any device) or, without one,
    from the global RNG of the logits' device."""
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(-1)
    if generator is None:
        u = torch.rand(cdf.shape[0], 1, device=cdf.device)
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=generator.device).to(cdf.device)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)


class ThreadChoice:
    """Which intra-op thread count decodes faster now: the machine's, or one (CPU only).

    The first steps alternate between the two and time them; then the faster runs, and every
    RECHECK steps one step of the other is timed again (the load on a shared machine changes)."""

    def __init__(self, device: torch.device, recheck: int = RECHECK):
        self.most = torch.get_num_threads()
        self.active = device.type == "cpu" and self.most > 1
        self.recheck = recheck
        self.seconds = {self.most: [], 1: []}
        self.step = 0

    def pick(self) -> int:
        if not self.active:
            return self.most
        other = {self.most: 1, 1: self.most}
        if min(len(v) for v in self.seconds.values()) < 2:  # the first four steps: alternate
            return self.most if self.step % 2 == 0 else 1
        best = min(self.seconds, key=lambda n: _median(self.seconds[n]))
        return other[best] if self.step % self.recheck == 0 else best

    def run(self, fn):
        """fn() under the chosen thread count, timed."""
        n = self.pick()
        if not self.active:
            return fn()
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            t = time.perf_counter()
            out = fn()
            self.seconds[n] = (self.seconds[n] + [time.perf_counter() - t])[-3:]
        finally:
            torch.set_num_threads(before)
            self.step += 1
        return out

    def best(self) -> int:
        timed = {n: _median(v) for n, v in self.seconds.items() if v}
        return min(timed, key=timed.get) if timed else self.most


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("inf")


def in_place_cache(model):
    """A transformers cache for `model` whose every full-attention layer is written in place."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from ..mla.kv_cache import GrowingLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def sample(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    new_tokens: int,
    stop: list[int],
    temperature: float,
    threads: ThreadChoice | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Up to ``new_tokens`` tokens after left-padded prompts ids/mask (B, T), with a KV cache.

    A row that draws a stop token leaves the batch; its remaining places are padded with that
    stop token (the largest stop id when several). Returns the new tokens (B, <= new_tokens).
    `generator`: where the draws come from (default: the global RNG)."""
    threads = threads or ThreadChoice(ids.device)
    with eager_attention(model):
        return _sample(model, ids, mask, new_tokens, stop, temperature, threads, generator)


@contextlib.contextmanager
def eager_attention(model):
    """Eager attention for the duration: CPU SDPA splits a decode step's keys by thread, so its
    result (and a sampled token) would depend on how many threads ran it; eager's products do not."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


def _sample(model, ids, mask, new_tokens, stop, temperature, threads, generator) -> torch.Tensor:
    cache = in_place_cache(model)
    vocab = model.config.vocab_size
    stops = torch.tensor(stop or [-1], device=ids.device)
    out = torch.full((ids.shape[0], new_tokens), max(stop or [0]), dtype=torch.long, device=ids.device)
    rows = torch.arange(ids.shape[0], device=ids.device)  # the batch's rows in the output
    padded = not bool(mask.all())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (left padding)
    step_ids, steps = ids, 0

    def forward():
        return model(
            input_ids=step_ids,
            attention_mask=mask if padded else None,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :vocab]

    for t in range(new_tokens):
        logits = forward() if t == 0 else threads.run(forward)  # (B, V); the prefill at full threads
        nxt = sample_next(logits, temperature, generator)
        out[rows, t] = nxt
        steps = t + 1
        live = ~torch.isin(nxt, stops)
        if not bool(live.all()):
            if not bool(live.any()):
                break
            keep = live.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, nxt, mask, pos = rows[keep], nxt[keep], mask[keep], pos[keep]
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
    return out[:, :steps]
