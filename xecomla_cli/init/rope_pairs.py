"""Which original frequency pairs keep RoPE in the MLA (``qk-pairs``, ``rot-pairs``, ``fast-pairs``,
``uniform-pairs``, ``drop``; per KV group with ``group-rope``; see ``init.methods``). A pair j of
a head is dims (j, j + h/2) in rotate-half layout."""

from __future__ import annotations

import torch

from ..mla.rope import mla_inv_freq
from ..mla.spec import MLASpec
from .layer_weights import RopePlan
from .methods import ROPE_CONTEXT, MethodConfig
from .paper import paper_rope_plan
from .stats import LayerStats


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


def uniform_pairs(head_dim: int, rope_dim: int) -> torch.Tensor:
    """MHA2MLA's uniform strategy: pairs 0, s, 2s, … (p/2 of them), s = ⌊h/p⌋."""
    return torch.arange(0, head_dim // 2, max(head_dim // rope_dim, 1))[: rope_dim // 2]


def layer_plan(config, spec: MLASpec, cfg: MethodConfig, stats: LayerStats | None, context: int = ROPE_CONTEXT):
    """The RoPE plan of one layer of a model of this ``config`` for ``cfg`` (paper plan when no pair selection)."""
    return slice_plan(config, spec, cfg, stats, spec.num_heads, spec.num_kv_heads, spec.rope_dim, context)


def layer_plans(config, spec: MLASpec, cfg: MethodConfig, stats: LayerStats | None, context: int = ROPE_CONTEXT):
    """One RoPE plan per RoPE key slice (``spec.rope_groups`` of them; one for a shared key).

    Slice s serves KV heads s·G/S … (s+1)·G/S − 1 and their query heads; its p_g/2 pairs are chosen
    from those heads' statistics alone."""
    S = spec.rope_groups
    if S == 1:
        return [layer_plan(config, spec, cfg, stats, context)]
    H, G = spec.num_heads // S, spec.num_kv_heads // S
    p = spec.group_rope_dim
    return [
        slice_plan(config, spec, cfg, None if stats is None else stats.heads(s, S), H, G, p, context) for s in range(S)
    ]


def slice_plan(config, spec: MLASpec, cfg: MethodConfig, stats, H: int, G: int, p: int, context: int) -> RopePlan:
    """The RoPE plan of p dims for H query heads over G KV heads (with these heads' ``stats``)."""
    if cfg.pairs is None:
        return paper_rope_plan(config, spec.head_dim, p, spec.rope_frequencies)
    inv_freq, scaling = mla_inv_freq(config, spec.head_dim, spec.rope_frequencies)
    if cfg.pairs == "fast":  # the same p/2 fastest pairs in every layer: DeepSeek-V3's RoPE at theta^(p/h)
        pairs = torch.arange(p // 2)
    elif cfg.pairs == "uniform":
        pairs = uniform_pairs(spec.head_dim, p)
    else:
        scores = pair_scores(stats, H, G, inv_freq if cfg.pairs == "rot" else None, context)
        pairs = select_pairs(scores, p)
    plan = pair_plan(pairs, spec.head_dim, inv_freq, scaling)
    if cfg.drop:
        plan.drop = drop_pairs(inv_freq, context)[plan.nope_idx % (spec.head_dim // 2)]
    return plan


def merged_plan(plans: list[RopePlan]) -> RopePlan:
    """The slices' plans as one: the p/2 frequencies in slice order (``slice_layout``'s order)."""
    if len(plans) == 1:
        return plans[0]
    p = plans[0]
    inv_freq = torch.cat([pl.inv_freq for pl in plans])
    return RopePlan(p.rope_idx, p.nope_idx, inv_freq, p.attention_scaling)
