"""Rotary position embedding over the decoupled RoPE dims of MLA.

The p RoPE dims use Llama's rotate-half layout: dim i pairs with dim i + p/2 and turns at
frequency ``inv_freq[i]``. Each converted layer stores its own ``inv_freq`` (p/2 values), so an
initialisation may keep the original model's frequencies for the pairs it keeps.
"""

from __future__ import annotations

import copy

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0, dtype=None):
    """cos, sin of shape (B, T, p) for positions (B, T) and frequencies (p/2,)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, p/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, p)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    dtype = dtype or inv_freq.dtype
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, p); cos/sin: (B, T, p)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_theta(config) -> float:
    """The source's RoPE base θ."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_type(config) -> str:
    """The source's RoPE type: 'default', or its scaling ('llama3', 'yarn', 'linear', ...)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_type", "default") or "default"


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Default (unscaled) RoPE at ``dim``: θ^(-2j/dim), j < dim/2 — what every engine computes for
    ``rope_type: default``."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def unscaled_pairs(config, head_dim: int) -> int:
    """How many of the fastest rotate-half pairs the source's RoPE scaling leaves as they are
    (all h/2 for default RoPE). Llama 3's scaling keeps the pairs whose wavelength is below
    original_max_position_embeddings / high_freq_factor and slows the others."""
    scaled, _ = model_inv_freq(config, head_dim)
    plain = default_inv_freq(rope_theta(config), head_dim)
    same = torch.isclose(scaled.double(), plain.double(), rtol=1e-6, atol=0)
    return int(same.numel() if bool(same.all()) else int((~same).nonzero()[0]))


def mla_inv_freq(config, dim: int, frequencies: str | None) -> tuple[torch.Tensor, float]:
    """The frequencies an init gives the MLA's RoPE dims, as if the head dim were ``dim``.

    ``frequencies`` None: the source's own (its scaling honoured; exact in transformers and xecomla);
    ``"default"``: default RoPE with the source's θ, no scaling — what llama.cpp, vLLM and SGLang
    read from ``rope_type: default`` (the DeepSeek layout's engines rewrite any other type)."""
    if frequencies == "default":
        return default_inv_freq(rope_theta(config), dim), 1.0
    return model_inv_freq(config, dim)


def model_inv_freq(config, dim: int) -> tuple[torch.Tensor, float]:
    """The base model's RoPE frequencies as if its head dim were `dim`.

    Uses transformers' own rope initialisers, so theta and scaling (Llama-3, linear, YaRN…)
    are honoured exactly as the model does. Returns (inv_freq (dim/2,), attention_scaling).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = copy.deepcopy(config)
    cfg.head_dim = dim
    params = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    kind = params.get("rope_type", "default")
    if kind == "default":
        return default_inv_freq(params["rope_theta"], dim), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    return inv_freq.float(), float(scaling)
