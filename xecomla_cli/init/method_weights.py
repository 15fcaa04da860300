"""MLA weights of one layer for the data-aware methods (``init.methods``).

Per layer: the RoPE plan (``rope_pairs``) decides which original pairs keep RoPE, the shared
key (``shared_key``) is fitted per kept pair, and the latent (``latent``) covers the kept rows
[W_k,nope; W_v], optionally whitened by the calibration inputs' second moment C (``whiten``) and
balanced between K and V (``bkv``). With ``group-rope`` each KV group's slice of the RoPE key has
its own plan and key, and its heads keep their own no-RoPE dims. (``freqfold``: ``transmla``.)
"""

from __future__ import annotations

import torch

from ..mla.spec import MLASpec
from .latent import (
    balanced_factors,
    kv_balance,
    nope_rows,
    sliced_kv_biases,
    sliced_kv_rows,
    whitened_factors,
    wide_kv_rows,
)
from .layer_weights import AttentionWeights, RopePlan, output_weights, query_weights
from .methods import MethodConfig
from .rope_pairs import merged_plan
from .shared_key import rope_weights
from .stats import LayerStats


def method_state_dict(
    w: AttentionWeights,
    spec: MLASpec,
    layer: int,
    plans: list[RopePlan],
    cfg: MethodConfig,
    stats: LayerStats | None,
) -> dict[str, torch.Tensor]:
    """MLA weights of one layer for a data-aware method, as an ``MLAAttention`` state dict.

    ``plans``: one RoPE plan per RoPE key slice (``init.rope_pairs.layer_plans``)."""
    H, G, h, S = spec.num_heads, spec.num_kv_heads, spec.head_dim, len(plans)
    n, r, d = spec.nope_dim, spec.kv_ranks[layer], spec.hidden_size
    bias = w.bk is not None
    sd: dict[str, torch.Tensor] = {}

    # Per slice: queries [nope | rope] and the slice's RoPE key (rows carry the bias as a last column).
    q_nope, q_rope, k_rope, bq, resid = [], [], [], [], None
    for s, plan in enumerate(plans):
        ws = w if S == 1 else w.heads(s, S)
        ss = None if stats is None else stats.heads(s, S)
        k_s, q_s, resid = rope_weights(ws, plan, ss, H // S, G // S, h, cfg.key, bias)
        k_rope.append(k_s)  # (p_g, d[+1])
        q_rope.append(q_s)  # (H/S, p_g, d[+1])
        # dropped dims: no query, no latent; wide: all h query rows (their keys start at zero)
        q_nope.append(ws.wq.view(H // S, h, -1) if cfg.wide else nope_rows(ws.wq.view(H // S, h, -1), plan))
        if bias:
            bq.append(ws.bq.view(H // S, h) if cfg.wide else nope_rows(ws.bq.view(H // S, h), plan))
    k_rope, q_rope = slice_layout(k_rope, q_rope)  # (p, d[+1]), (H, p, d[+1])
    wq = torch.cat([torch.cat(q_nope), q_rope[..., :d]], dim=1).reshape(-1, d)  # (H·(n + p), d)
    bq = torch.cat([torch.cat(bq), q_rope[..., -1]], dim=1).reshape(-1) if bias else None
    query_weights(sd, wq, bq, spec.q_rank)

    # Latent over the kept rows [K_nope; V] of the G KV heads, repeated to the H query heads.
    W, b = latent_rows(w, spec, plans, cfg, stats, resid)  # (G·(n + h), d), (G·(n + h),) or None
    up, down, _ = kv_latent(W, b, n, h, cfg, stats, r)
    up = up.view(G, n + h, r).repeat_interleave(H // G, dim=0)  # (H, n + h, r)
    sd["kv_b_proj.weight"] = up.reshape(H * (n + h), r)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([down, k_rope[:, :d]])
    if bias:
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), k_rope[:, -1]])
        sd["kv_b_proj.bias"] = b.view(G, n + h).repeat_interleave(H // G, dim=0).reshape(-1)
    output_weights(sd, w, spec.latent_norm, r, merged_plan(plans))
    return sd


def latent_rows(w: AttentionWeights, spec: MLASpec, plans, cfg: MethodConfig, stats: LayerStats | None, resid=None):
    """The rows the latent covers, [K_nope; V] per KV head (G·(n + h), d), and their biases (or None).

    ``wide`` (n = h, one RoPE slice): K's RoPE dims hold what the shared key leaves of each head's
    key (``resid`` from ``rope_weights``, computed when not given), unrotated (TransMLA's residual
    keys), or zero with ``wide0``."""
    G, h = spec.num_kv_heads, spec.head_dim
    if not cfg.wide:
        return sliced_kv_rows(w, plans, G, h), sliced_kv_biases(w, plans, G, h)
    if resid is None:
        _, _, resid = rope_weights(w, plans[0], stats, spec.num_heads, G, h, cfg.key, w.bk is not None)
    return wide_kv_rows(w, plans[0], torch.zeros_like(resid) if cfg.wide == "zero" else resid, G, h)


def kv_latent(W: torch.Tensor, b: torch.Tensor | None, n: int, h: int, cfg: MethodConfig, stats, rank: int):
    """Up (rows, r), down (r, d) projections and all output-energy eigenvalues of the kept rows
    W = [K_nope; V] per KV head (G blocks of n + h rows; biases b): the SVD, ``whiten`` (PCA of the
    outputs) or ``bkv`` (balanced PCA; α from the outputs with their biases)."""
    C = stats.cov if cfg.whiten else None
    if not cfg.balance:
        return whitened_factors(W, C, rank)
    k_mask = (torch.arange(W.shape[0]) % (n + h)) < n
    Wb = torch.cat([W, (torch.zeros(W.shape[0]) if b is None else b)[:, None]], dim=1)  # outputs W x + b
    alpha = kv_balance(Wb[k_mask], Wb[~k_mask], stats.cov_aug)
    return balanced_factors(W, k_mask, C, rank, alpha)


def slice_layout(k_rope: list[torch.Tensor], q_rope: list[torch.Tensor]):
    """Join the S slices' RoPE rows in rotate-half layout over p = S·p_g: the first halves (real
    parts) of every slice, then the second halves. Query head rows are zero outside their slice."""
    S = len(k_rope)
    if S == 1:
        return k_rope[0], q_rope[0]
    half = k_rope[0].shape[0] // 2  # p_g/2 pairs per slice
    k = torch.cat([t[:half] for t in k_rope] + [t[half:] for t in k_rope])  # (p, c)
    Hs, c = q_rope[0].shape[0], q_rope[0].shape[-1]
    q = torch.zeros(S * Hs, 2 * S * half, c)  # (H, p, c)
    for s, t in enumerate(q_rope):
        heads = slice(s * Hs, (s + 1) * Hs)
        q[heads, s * half : (s + 1) * half] = t[:, :half]
        q[heads, S * half + s * half : S * half + (s + 1) * half] = t[:, half:]
    return k, q


def layer_energy(w: AttentionWeights, spec: MLASpec, plans, cfg: MethodConfig, stats: LayerStats | None):
    """Output-energy eigenvalues of a layer's kept K/V rows (what ``budget`` allocates by)."""
    W, b = latent_rows(w, spec, plans, cfg, stats)
    return kv_latent(W, b, spec.nope_dim, spec.head_dim, cfg, stats, 0)[2]
