"""The spectrum of each layer's stacked K/V, ``[W_k; W_v]``: its singular values, the energy a rank
keeps, and the rank that keeps a given energy. ``inspect`` reports it; ``init-svd --energy`` chooses
ranks from it.
"""

from __future__ import annotations

import torch

from ..threads import single_thread
from .rebuild import decoder_layers


def stacked_kv_singular_values(wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """Singular values of [W_k; W_v]. Repeating KV heads to all query heads scales them all by
    sqrt(H/G), so this gives the same energy fractions as the paper's repeated stack."""
    with single_thread():
        return torch.linalg.svdvals(torch.cat([wk, wv]).detach().float())


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of squared singular values kept at rank 1, 2, …"""
    e = (s.double() ** 2).cumsum(0)
    return (e / e[-1]).float()


def rank_for_energy(s: torch.Tensor, delta: float, multiple: int = 8) -> int:
    """Smallest rank whose energy reaches δ, rounded up to a multiple of 8 (capped at len(s))."""
    curve = energy_curve(s)
    r = int(torch.searchsorted(curve, torch.tensor(delta - 1e-7)).item()) + 1
    r = -(-r // multiple) * multiple
    return min(r, s.numel())


def layer_singular_values(model) -> dict[int, torch.Tensor]:
    """Per layer, singular values of the stacked [W_k; W_v] (for energy-based ranks)."""
    return {
        i: stacked_kv_singular_values(layer.self_attn.k_proj.weight.float(), layer.self_attn.v_proj.weight.float())
        for i, layer in enumerate(decoder_layers(model))
    }
