"""The X-EcoMLA paper's data-free initialisation, as the official code does it.

* KV latent: repeat each KV head's rows of W_k and W_v to all H query heads, stack
  M = [W_k; W_v] (2·H·h, d), SVD M = U S Vᵀ. Down projection W_dkv = S_r V_rᵀ (r, d); up
  projection from U_r: per head the rows of the n no-RoPE K dims and all h V rows
  (``kv_rows="nope-v"``: the SVD of only the rows that are kept, [W_k,nope; W_v]).
* RoPE: the last p dims of every head carry RoPE, re-rotated by a fresh p-dim rotary
  embedding with the model's rope settings; the shared RoPE key is the mean over KV heads of
  those rows of W_k.
* Queries: per head [n no-RoPE dims | p RoPE dims] (the original order); with ``q_rank`` the
  query projection is factored by SVD as well.
"""

from __future__ import annotations

import torch

from ..choices import KvSvdRows, values
from ..mla.rope import mla_inv_freq
from ..mla.spec import MLASpec
from .layer_weights import AttentionWeights, RopePlan, output_weights, query_weights, repeat_heads
from .svd import pad_rank, truncated_svd

KV_SVD_ROWS = values(KvSvdRows)


def paper_rope_plan(config, head_dim: int, rope_dim: int, frequencies: str | None = None) -> RopePlan:
    """The last p dims of each head, re-rotated by a fresh p-dim rotary embedding (``frequencies``:
    ``mla.rope.mla_inv_freq``)."""
    n = head_dim - rope_dim
    inv_freq, scaling = mla_inv_freq(config, rope_dim, frequencies)
    return RopePlan(torch.arange(n, head_dim), torch.arange(n), inv_freq, scaling)


def kv_stack(w: AttentionWeights, H: int, G: int, plan: RopePlan, rows: str = "all") -> torch.Tensor:
    """The matrix whose SVD gives the latent: paper [K; V] of all heads, or [K_nope; V]."""
    wk = repeat_heads(w.wk, G, H)  # (H, h, d)
    wv = repeat_heads(w.wv, G, H)  # (H, h, d)
    if rows == "nope-v":
        wk = wk[:, plan.nope_idx]
    return torch.cat([wk.reshape(-1, wk.shape[-1]), wv.reshape(-1, wv.shape[-1])])


def paper_state_dict(
    w: AttentionWeights, spec: MLASpec, layer: int, plan: RopePlan, kv_rows: str = "all"
) -> dict[str, torch.Tensor]:
    """The paper's MLA weights of one layer, as an ``MLAAttention`` state dict (fp32)."""
    H, G, h, p = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
    n, r, d = h - p, spec.kv_ranks[layer], spec.hidden_size
    order = torch.cat([plan.nope_idx, plan.rope_idx])  # per-head dim order [nope | rope]
    sd: dict[str, torch.Tensor] = {}

    # Queries: per head [q_nope | q_rope], optionally factored by SVD.
    wq = w.wq.view(H, h, d)[:, order].reshape(H * h, d)
    bq = None if w.bq is None else w.bq.view(H, h)[:, order].reshape(-1)
    query_weights(sd, wq, bq, spec.q_rank)

    # KV latent: SVD of the stacked K/V rows; keep K-nope and V rows of U_r.
    # The paper's stack repeats each KV head's rows H/G times. Its SVD follows from the SVD of the
    # unrepeated (G-head) stack, H/G times cheaper: same V, S·sqrt(H/G), rows of U repeated / sqrt(H/G).
    g = H // G
    u, s, vt = truncated_svd(kv_stack(w, G, G, plan, kv_rows), r)
    u, s, vt = pad_rank(u, s, vt, r)  # ranks above the stack's true rank 2·G·h get zero rows
    w_dkv = (s * g**0.5)[:, None] * vt  # (r, d)
    k_rows = n if kv_rows == "nope-v" else h
    u_k = repeat_heads(u[: G * k_rows], G, H) / g**0.5  # (H, k_rows, r)
    if kv_rows == "all":
        u_k = u_k[:, plan.nope_idx]
    u_v = repeat_heads(u[G * k_rows :], G, H) / g**0.5  # (H, h, r)
    sd["kv_b_proj.weight"] = torch.cat([u_k, u_v], dim=1).reshape(H * (n + h), r)

    # Shared RoPE key: the mean over KV heads of the RoPE rows of W_k.
    w_krope = w.wk.view(G, h, d)[:, plan.rope_idx].mean(0)  # (p, d)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([w_dkv, w_krope])
    if w.bk is not None:
        bk = repeat_heads(w.bk, G, H)  # (H, h)
        bv = repeat_heads(w.bv, G, H)
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), w.bk.view(G, h)[:, plan.rope_idx].mean(0)])
        sd["kv_b_proj.bias"] = torch.cat([bk[:, plan.nope_idx], bv], dim=1).reshape(-1)
    output_weights(sd, w, spec.latent_norm, r, plan)
    return sd
