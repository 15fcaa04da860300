"""Architecture report, KV-cache budget table and per-layer SVD energy of a source."""

from __future__ import annotations

from typing import Any

import torch

from ..engines import VLLM_CAPTION, engine_support
from ..loaded import dtype_name, model_dtype_name
from ..mla.kv_spectrum import energy_curve, layer_singular_values, rank_for_energy
from ..mla.rebuild import decoder_layers
from ..mla.spec import MLASpec, attention_kind, attention_shape, source_biases

DEFAULT_RANKS = (32, 64, 96, 128, 192, 256, 384, 512)
DELTAS = (0.90, 0.95, 0.99)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def architecture(model, family: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The source's architecture, from its config and its (possibly meta-device) model: nothing is read but
    shapes; ``dtype`` (the weights' on disk) instead of the model's own."""
    config = model.config
    shape = attention_shape(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return {
        "family": family,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        **shape,
        "attention": attention_kind(shape["num_heads"], shape["num_kv_heads"]),
        "rope_theta": rope.get("rope_theta"),
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} or None,
        "qkv_bias": getattr(decoder_layers(model)[0].self_attn.q_proj, "bias", None) is not None,
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype_name(dtype) if dtype is not None else model_dtype_name(model),
    }


def kv_cache(spec: MLASpec, dtype: torch.dtype, context: int, batch: int) -> dict[str, Any]:
    """The original model's KV cache: 2·G·h values per token per layer (from the spec)."""
    total = spec.original_values_per_token_total
    b = dtype_bytes(dtype)
    return {
        "values_per_token_per_layer": spec.original_values_per_token_per_layer,
        "values_per_token": total,
        "bytes_per_token": total * b,
        "context": context,
        "batch": batch,
        "gb": total * b * context * batch / 1e9,
    }


def budget_rows(
    config,
    singular_values: dict[int, torch.Tensor],
    ranks: list[int],
    rope_dim: int,
    dtype: torch.dtype,
    context: int,
    batch: int,
) -> list[dict[str, Any]]:
    """One row per candidate rank: cache values r + p, compression, SVD energy kept."""
    b = dtype_bytes(dtype)
    curves = {i: energy_curve(s) for i, s in singular_values.items()}
    rows = []
    for r in ranks:
        spec = MLASpec.for_config(config, rope_dim, [r] * config.num_hidden_layers)
        energies = [float(c[min(r, c.numel()) - 1]) for c in curves.values()]
        rows.append(
            {
                "rank": r,
                "cache_values_per_token_per_layer": spec.values_per_token(0),
                "compression": spec.compression,
                "gb": spec.values_per_token_total * b * context * batch / 1e9,
                "energy_min": min(energies),
                "energy_mean": sum(energies) / len(energies),
                "energy_max": max(energies),
                "energy_per_layer": energies,
            }
        )
    return rows


def engines_by_rank(config, arch: dict[str, Any], ranks: list[int], rope_dim: int) -> dict[str, Any]:
    """Per candidate rank: which engines keep the latent cache, for init-svd's default conversion of every
    layer (latent norm; a scaled RoPE as default RoPE, q/k/v biases folded: ``init.engine_ready``)."""
    qkv_bias, o_bias = source_biases(config)
    scaled = (arch["rope_scaling"] or {}).get("rope_type", "default") != "default"
    choices = {
        "rope_frequencies": "default" if scaled else None,
        "attention_bias": ("kept" if o_bias else "folded") if qkv_bias else None,
    }
    by_rank = []
    for r in ranks:
        spec = MLASpec.for_config(config, rope_dim, [r] * arch["num_layers"], latent_norm=True, **choices)
        rows = engine_support(spec)
        by_rank.append({"rank": r, "width": r + rope_dim, "rows": [row.to_dict() for row in rows]})
    assumes = "init-svd's default conversion of every layer at rank r (latent norm), exported bias-free"
    return {"assumes": assumes, "caption": VLLM_CAPTION, "by_rank": by_rank}


def inspect(loaded, *, ranks=None, rope_dim=None, context: int = 8192, batch: int = 1) -> dict[str, Any]:
    """The full report as a JSON-ready dict, of a model in memory (a LoadedModel)."""
    model = loaded.model
    arch = architecture(model, loaded.family)
    return report(loaded.source, model.config, arch, layer_singular_values(model), ranks, rope_dim, context, batch)


def report(
    source: str, config, arch: dict[str, Any], sv: dict[int, torch.Tensor], ranks, rope_dim, context: int, batch: int
) -> dict[str, Any]:
    """The report from the architecture and each layer's singular values (in memory or read layer by layer)."""
    dtype = getattr(torch, arch["dtype"])
    p = rope_dim if rope_dim is not None else arch["head_dim"] // 2
    ranks = sorted(set(ranks or DEFAULT_RANKS))
    original = MLASpec.for_config(config, p, [None] * arch["num_layers"])
    return {
        "source": source,
        "architecture": arch,
        "kv_cache": kv_cache(original, dtype, context, batch),
        "rope_dim": p,
        "budget": budget_rows(config, sv, ranks, p, dtype, context, batch),
        "rank_for_energy": {str(d): [rank_for_energy(sv[i], d) for i in sorted(sv)] for d in DELTAS},
        "engines": engines_by_rank(config, arch, ranks, p),
    }
