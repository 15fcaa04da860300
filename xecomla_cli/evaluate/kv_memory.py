"""KV cache memory, measured: the bytes per token that the cache tensors hold after a short greedy
generation, checked against what the spec says (2·G·h values per token per layer for original
attention, r + p for an MLA layer), and the ratio to the original model's cache."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import XecomlaError
from ..loaded import dtype_name
from ..mla.spec import MLASpec
from .scoring import device_of, new_cache


def cache_footprint(cache) -> dict[str, Any]:
    """Bytes and values held by a transformers cache, per layer, from its tensors."""
    per_layer_bytes, per_layer_values, lengths, batch = [], [], [], None
    for layer in cache.layers:
        tensors = [
            t
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor) and t.numel()
        ]
        per_layer_bytes.append(sum(t.numel() * t.element_size() for t in tensors))
        per_layer_values.append(sum(t.numel() for t in tensors))
        if tensors:
            lengths.append(tensors[0].shape[-2])
            batch = tensors[0].shape[0]
    return {
        "bytes": sum(per_layer_bytes),
        "values": sum(per_layer_values),
        "per_layer_values": per_layer_values,
        "tokens": max(lengths, default=0),
        "batch": batch or 0,
    }


def expected_values_per_token(model, spec: MLASpec | None = None) -> int:
    """What the spec says one token should cost (a check on the measurement); no spec: the model
    is original, and its own shape gives the spec."""
    if spec is None:
        L = model.config.num_hidden_layers
        return MLASpec.for_config(model.config, rope_dim=0, kv_ranks=[None] * L).original_values_per_token_total
    return spec.values_per_token_total


@torch.inference_mode()
def measure_kv_cache(
    model, *, prompt_tokens: int = 32, new_tokens: int = 8, batch: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Generate greedily from a random prompt, then measure what the cache tensors hold."""
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=g).to(device)
    cache = new_cache(model)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    fp = cache_footprint(cache)
    tokens = fp["tokens"]
    if tokens != prompt_tokens + new_tokens or fp["batch"] != batch:
        raise XecomlaError(
            f"the KV cache holds {tokens} tokens x {fp['batch']}, expected "
            f"{prompt_tokens + new_tokens} x {batch}: cannot measure bytes per token"
        )
    dtype = next(t for layer in cache.layers for t in (layer.keys,) if isinstance(t, torch.Tensor)).dtype
    return {
        "bytes_per_token": fp["bytes"] / (batch * tokens),
        "values_per_token": fp["values"] / (batch * tokens),
        "values_per_token_per_layer": [v // (batch * tokens) for v in fp["per_layer_values"]],
        "dtype": dtype_name(dtype),
        "tokens_measured": tokens,
        "batch_measured": batch,
    }


def kv_report(
    measured: dict[str, Any],
    *,
    expected_values: int,
    original_bytes_per_token: float,
    original_from: str,
    context: int,
    batch: int,
) -> dict[str, Any]:
    """Measured cache size, the ratio to the original model's, and GB at a context and batch."""
    bpt = measured["bytes_per_token"]
    return {
        "bytes_per_token": int(bpt) if float(bpt).is_integer() else round(bpt, 2),
        "values_per_token": int(measured["values_per_token"]),
        "expected_values_per_token": expected_values,
        "dtype": measured["dtype"],
        "original_bytes_per_token": int(original_bytes_per_token),
        "original_from": original_from,  # "measured" (teacher/original run) or "spec" (2·G·h per layer)
        "compression": round(original_bytes_per_token / bpt, 4),
        "context": context,
        "batch": batch,
        "gb": round(bpt * context * batch / 1e9, 4),
        "values_per_token_per_layer": measured["values_per_token_per_layer"],
    }


def kv_cache_metrics(loaded, *, context: int, batch: int, original_kv: dict | None = None) -> dict[str, Any]:
    """The ``kv_cache`` entry of an eval: the model's cache measured, against the original's.

    The original's bytes per token come from, in this order: the model itself when it is original;
    `original_kv`, the original (or a same-shape teacher) measured in this run; else the spec's
    2·G·h values per token per layer at the measured bytes per value."""
    measured = measure_kv_cache(loaded.model)
    spec = loaded.spec
    if spec is None:
        original, source = measured["bytes_per_token"], "measured"
    elif original_kv is not None:
        original, source = original_kv["bytes_per_token"], "measured"
    else:
        original = spec.original_values_per_token_total * measured["bytes_per_token"] / measured["values_per_token"]
        source = "spec"
    return kv_report(
        measured,
        expected_values=expected_values_per_token(loaded.model, spec),
        original_bytes_per_token=original,
        original_from=source,
        context=context,
        batch=batch,
    )
