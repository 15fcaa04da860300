"""TransMLA's conversion (``--method transmla`` = freqfold+bkv; Meng et al., arXiv 2502.07864):
one layer's MLA weights from RoRoPE + FreqFold (``init.freqfold``) and the latent over the
residual keys and the values, and the search for the fold (``--freqfold auto``).

Per layer (see ``init.freqfold`` for the notation):

    q      = [W_q x (h, no RoPE) | q' (p, RoPE)]          per head, n = h
    k      = [W_ukr c (h, no RoPE) | k' (p, RoPE, shared)]
    c      = W_dkv x,  [W_ukr; W_uv] ≈ [R; W_v] as PCA of their outputs (``bkv``: R balanced to V)

R = the residual key rows r_{g,·} of every KV head, V = W_v. The softmax scale stays h^-0.5
(TransMLA writes (h + p)^-0.5 and scales its queries by sqrt((h + p)/h) instead).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from ..mla.rope import mla_inv_freq
from ..mla.spec import MLASpec
from .freqfold import FoldedKeys, fold_candidates, freqfold_keys
from .latent import balanced_factors, kv_balance, whitened_factors
from .layer_weights import AttentionWeights, RopePlan, output_weights, query_weights
from .methods import ROPE_CONTEXT, MethodConfig
from .rope_pairs import drop_pairs
from .stats import LayerStats


def fold_layer(w: AttentionWeights, spec: MLASpec, stats: LayerStats, cfg: MethodConfig, inv_freq) -> FoldedKeys:
    """RoRoPE + FreqFold of one layer's keys (bias as a last column when the model has biases);
    with ``drop``, the residual keys of the pairs that turn too fast to keep unrotated are zero
    (their queries stay: the zero key rows of the latent's up projection can still train)."""
    wk, wq, C = w.wk, w.wq, stats.cov
    if w.bk is not None:
        wk, wq, C = torch.cat([wk, w.bk[:, None]], 1), torch.cat([wq, w.bq[:, None]], 1), stats.cov_aug
    H, G, h = spec.num_heads, spec.num_kv_heads, spec.head_dim
    f = freqfold_keys(wk, wq, C, H, G, h, spec.rope_dim, cfg.freqfold, spec.rope_span)
    if cfg.drop:
        fast = drop_pairs(inv_freq, ROPE_CONTEXT)  # (h/2,)
        f.k_resid[:, torch.cat([fast, fast])] = 0
    return f


def residual_kv_rows(w: AttentionWeights, f: FoldedKeys, G: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R_g; W_v,g] per KV head, stacked (G·2h, d), and the mask of its K rows."""
    d = w.wv.shape[1]
    W = torch.cat([f.k_resid[..., :d], w.wv.view(G, h, d)], dim=1).reshape(-1, d)
    return W, (torch.arange(W.shape[0]) % (2 * h)) < h


def bkv_alpha(w: AttentionWeights, f: FoldedKeys, stats: LayerStats) -> float:
    """BKV-PCA's α over TransMLA's columns: the rotated no-RoPE key channels against the values."""
    if w.bv is None:
        return kv_balance(f.k_nope_channels, w.wv, stats.cov)
    return kv_balance(f.k_nope_channels, torch.cat([w.wv, w.bv[:, None]], 1), stats.cov_aug)


def transmla_state_dict(
    config, w: AttentionWeights, spec: MLASpec, layer: int, cfg: MethodConfig, stats: LayerStats
) -> tuple[dict[str, torch.Tensor], RopePlan]:
    """TransMLA's MLA weights of one layer of a model of this ``config``, as an ``MLAAttention`` state
    dict, and its RoPE plan."""
    H, G, h, p = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
    r, d = spec.kv_ranks[layer], spec.hidden_size
    inv_freq, scaling = mla_inv_freq(config, h, spec.rope_frequencies)
    f = fold_layer(w, spec, stats, cfg, inv_freq)
    bias = w.bk is not None
    sd: dict[str, torch.Tensor] = {}

    # Queries: all h original rows (read the residual keys, no RoPE) | p RoPE rows.
    wq = torch.cat([w.wq.view(H, h, d), f.q_rope[..., :d]], dim=1).reshape(H * (h + p), d)
    bq = torch.cat([w.bq.view(H, h), f.q_rope[..., -1]], dim=1).reshape(-1) if bias else None
    query_weights(sd, wq, bq, spec.q_rank)

    # Latent: PCA of the residual keys and the values (balanced with bkv), repeated to the H heads.
    W, k_mask = residual_kv_rows(w, f, G, h)
    C = stats.cov if cfg.whiten else None
    if r >= W.shape[0] and not spec.latent_norm:  # full rank (the fold search): every basis is exact
        up, down = torch.eye(W.shape[0]), W.float()  # (skips an eigendecomposition per layer and fold)
    elif cfg.balance:
        up, down, _ = balanced_factors(W, k_mask, C, r, bkv_alpha(w, f, stats))
    else:
        up, down, _ = whitened_factors(W, C, r)
    sd["kv_b_proj.weight"] = up.view(G, 2 * h, r).repeat_interleave(H // G, dim=0).reshape(H * 2 * h, r)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([down, f.k_rope[:, :d]])
    if bias:
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), f.k_rope[:, -1]])
        bkv = torch.cat([f.k_resid[..., -1], w.bv.view(G, h)], dim=1).repeat_interleave(H // G, dim=0)
        sd["kv_b_proj.bias"] = bkv.reshape(-1)
    plan = RopePlan(torch.arange(0), torch.arange(h), inv_freq[f.slot_pairs].float(), scaling)
    output_weights(sd, w, spec.latent_norm, r, plan)
    return sd, plan


def transmla_energy(config, w: AttentionWeights, spec: MLASpec, cfg: MethodConfig, stats: LayerStats) -> torch.Tensor:
    """Output-energy eigenvalues of a layer's latent rows (what ``budget`` allocates by)."""
    f = fold_layer(w, spec, stats, cfg, mla_inv_freq(config, spec.head_dim, spec.rope_frequencies)[0])
    W, k_mask = residual_kv_rows(w, f, spec.num_kv_heads, spec.head_dim)
    alpha = bkv_alpha(w, f, stats) if cfg.balance else 1.0
    return balanced_factors(W, k_mask, stats.cov if cfg.whiten else None, 0, alpha)[2]


def full_rank_spec(spec: MLASpec) -> MLASpec:
    """The spec at the largest useful latent rank: TransMLA's partial-RoPE model (no rank cut)."""
    full = copy.deepcopy(spec)
    full.latent_norm = False  # the fold is chosen for the keys; the latent norm's channel plays no part
    rank = min(spec.hidden_size, 2 * spec.num_kv_heads * spec.head_dim)
    full.kv_ranks = [None if r is None else rank for r in spec.kv_ranks]
    return full


def search_freqfold(
    spec: MLASpec,
    convert_all: Callable[[MLASpec, int], Callable[[], None]],
    loss: Callable[[], float],
) -> tuple[int, dict[int, float]]:
    """TransMLA's ``--freqfold auto``: N = c, 2c, 4c, … while the calibration loss of the full-rank
    conversion improves; returns the best N and the loss of each N tried.

    ``convert_all(spec, N)`` converts the model at fold N and returns an undo; ``loss()`` is the
    model's mean next-token loss on the calibration tokens."""
    full = full_rank_spec(spec)
    tried: dict[int, float] = {}
    best = None
    for fold in fold_candidates(spec.head_dim, spec.rope_dim, spec.rope_span):
        undo = convert_all(full, fold)
        try:
            tried[fold] = loss()
        finally:
            undo()
        if best is not None and not tried[fold] < tried[best]:
            break
        best = fold
    return best, {k: round(v, 4) if math.isfinite(v) else v for k, v in tried.items()}
