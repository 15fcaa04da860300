"""Decode speed: prefill time and greedy decode tokens/s at a given batch and context, from random
prompt tokens, through whatever decode path the model uses; attention time from module hooks."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..loaded import model_dtype_name
from .scoring import body, device_of, new_cache, sync


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in body(model).layers]


BACKEND_NAMES = {"triton": "Triton kernel", "torch": "PyTorch GEMMs", "reference": "fp32 reference"}


def decode_path(model) -> str:
    """Which attention a decode step runs: the original, or MLA absorbed over the latent cache
    through the backend ``kernels.mla_decode_auto`` picks for the model's device."""
    from ..kernels import decode_backend
    from ..mla.attention import MLAAttention

    if not any(isinstance(m, MLAAttention) for m in attention_modules(model)):
        return f"original ({model.config._attn_implementation})"
    return f"mla absorbed ({BACKEND_NAMES[decode_backend(device_of(model))]})"


@torch.inference_mode()
def measure_speed(
    model, *, batch: int = 1, context: int = 1024, new_tokens: int = 32, attention_steps: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Prefill time, then greedy decode tokens/s; attention ms per decode step from module hooks.

    A short warm-up (kernels compiled, memory allocated) runs first and is not timed. Attention
    time is measured in extra decode steps (hooks synchronise the GPU around every attention call,
    which would slow the timed steps).
    """
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)

    def step(cache, tokens):
        return (
            model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        )

    warm = new_cache(model)
    nxt = step(warm, ids[:, : min(16, context)])
    for _ in range(2):
        nxt = step(warm, nxt)
    del warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sync(device)
    t0 = time.perf_counter()
    cache = new_cache(model)
    nxt = step(cache, ids)
    sync(device)
    prefill = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = step(cache, nxt)
    sync(device)
    decode = time.perf_counter() - t0

    spent, hooked = attention_seconds(model, lambda: step(cache, nxt), attention_steps, device)
    out = {
        "device": str(device),
        "dtype": model_dtype_name(model),
        "decode_path": decode_path(model),
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill, 4),
        "prefill_tokens_per_s": round(batch * context / prefill, 1),
        "decode_s": round(decode, 4),
        "decode_tokens_per_s": round(batch * new_tokens / decode, 2),
        "ms_per_step": round(1000 * decode / new_tokens, 3),
        "attention_ms_per_step": round(1000 * spent / attention_steps, 3),
        "attention_share": round(spent / hooked, 4),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return out


def attention_seconds(model, step, steps: int, device) -> tuple[float, float]:
    """(seconds inside the attention modules, seconds in all) over ``steps`` more decode steps,
    timed with module hooks that synchronise the GPU around every attention call."""
    spent: list[float] = []
    starts: dict[int, float] = {}

    def pre(module, args, kwargs):
        sync(device)
        starts[id(module)] = time.perf_counter()

    def post(module, args, kwargs, output):
        sync(device)
        spent.append(time.perf_counter() - starts.pop(id(module)))

    hooks = []
    for m in attention_modules(model):
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return sum(spent), time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
