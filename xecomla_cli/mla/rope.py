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


def model_inv_freq(config, dim: int) -> tuple[torch.Tensor, float]:
    """The base model's RoPE frequencies as if its head dim were `dim`.

    Uses transformers' own rope initialisers, so theta and scaling (Llama-3, linear, YaRN…)
    are honoured exactly as the model does. Returns (inv_freq (dim/2,), attention_scaling).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = copy.deepcopy(config)
    cfg.head_dim = dim
    params = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)
