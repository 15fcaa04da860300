"""Which original frequency pairs keep RoPE in the MLA (``qk-pairs``, ``rot-pairs``, ``fast-pairs``,
``drop``; see ``init.methods``). A pair j of a head is dims (j, j + h/2) in rotate-half layout."""

from __future__ import annotations

import torch

from ..mla.rope import model_inv_freq
from ..mla.spec import MLASpec
from .calibration import LayerStats
from .common import RopePlan
from .methods import ROPE_CONTEXT, MethodConfig
from .paper import paper_rope_plan


def rotation_weight(inv_freq: torch.Tensor, context: int = ROPE_CONTEXT) -> torch.Tensor:
    """w_j = mean over Δ = 0..T-1 of |e^{iθ_jΔ} − 1| = 2|sin(θ_jΔ/2)|: what pair j loses without RoPE."""
    delta = torch.arange(context, dtype=torch.float64)
    return (2 * torch.sin(inv_freq.double()[:, None] * delta / 2).abs()).mean(1)


def pair_scores(
    stats: LayerStats, H: int, G: int, inv_freq: torch.Tensor | None = None, context: int = ROPE_CONTEXT
) -> torch.Tensor:
    """Per original pair j (P,): Σ_h E||q_{h,j}||·E||k_{g(h),j}||, times w_j when inv_freq is given."""
    k = stats.k_pair_norm.repeat_interleave(H // G, dim=0)  # (H, P)
    s = (stats.q_pair_norm * k).sum(0)
    return s if inv_freq is None else s * rotation_weight(inv_freq, context)


def select_pairs(scores: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The p/2 pairs of largest score, in increasing pair order."""
    return scores.topk(rope_dim // 2).indices.sort().values


def pair_plan(pairs: torch.Tensor, head_dim: int, inv_freq: torch.Tensor, scaling: float = 1.0):
    """A RopePlan keeping whole original pairs at their original frequencies."""
    P = head_dim // 2
    rope_idx = torch.cat([pairs, pairs + P])
    keep = torch.ones(head_dim, dtype=torch.bool)
    keep[rope_idx] = False
    return RopePlan(rope_idx, keep.nonzero().flatten(), inv_freq[pairs].float(), scaling)


def drop_pairs(inv_freq: torch.Tensor, context: int = ROPE_CONTEXT) -> torch.Tensor:
    """Pairs (P,) bool that turn so fast that dropping their score term beats keeping it unrotated.

    For a score term Re(a·e^{iθΔ}) with a of random phase, keeping it without RoPE costs
    E|a|²(1 − cos θΔ) in mean square, dropping it costs E|a|²/2: drop when E_Δ[cos θΔ] < 1/2.
    """
    delta = torch.arange(context, dtype=torch.float64)
    return torch.cos(inv_freq.double()[:, None] * delta).mean(1) < 0.5


def layer_plan(model, spec: MLASpec, cfg: MethodConfig, stats: LayerStats | None, context: int = ROPE_CONTEXT):
    """The RoPE plan of one layer for ``cfg`` (paper plan when no pair selection)."""
    if cfg.pairs is None:
        return paper_rope_plan(model.config, spec.head_dim, spec.rope_dim)
    inv_freq, scaling = model_inv_freq(model.config, spec.head_dim)
    if cfg.pairs == "fast":  # the same p/2 fastest pairs in every layer: DeepSeek-V3's RoPE at theta^(p/h)
        pairs = torch.arange(spec.rope_dim // 2)
    else:
        scores = pair_scores(
            stats, spec.num_heads, spec.num_kv_heads, inv_freq if cfg.pairs == "rot" else None, context
        )
        pairs = select_pairs(scores, spec.rope_dim)
    plan = pair_plan(pairs, spec.head_dim, inv_freq, scaling)
    if cfg.drop:
        plan.drop = drop_pairs(inv_freq, context)[plan.nope_idx % (spec.head_dim // 2)]
    return plan
