"""Absorbed MLA decode in PyTorch as multi-query attention: the H heads are the queries of one shared KV head.

The decode path wherever the Triton kernel does not run (CPU). Same arguments and result as the
reference (see ``reference.py``); every row of the cache is read once per step, by two batched
matrix products over the shared rows, with no per-head expansion of the cache and no host sync:

    score = sm_scale * (q_lat @ kvᵀ + q_rope @ k_ropeᵀ)        [B, H, r] x [B, r, L] -> [B, H, L]
    out   = softmax(score) @ kv                                [B, H, L] x [B, L, r] -> [B, H, r]

The products run in the cache's dtype (fp32 accumulation inside the GEMM), the softmax in fp32:
DeepSeek-V3's ``absorb`` decode, which X-EcoMLA ships. ``kv`` and ``k_rope`` may be strided views
(rows of a preallocated cache, or halves of one [B, L, r + p] buffer): a GEMM reads them in place.
"""

from __future__ import annotations

import torch

from .reference import gather_pages, hidden_positions


def mla_decode_torch(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor | None,
    sm_scale: float,
    *,
    mask: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Absorbed MLA decode as two batched GEMMs over the shared latent: out [B, H, r] (and lse [B, H])."""
    if block_table is not None:
        kv, k_rope = gather_pages(kv, block_table), gather_pages(k_rope, block_table)
    L = kv.shape[1]
    # score = q_lat · kvᵀ + q_rope · k_ropeᵀ                                     [B, H, L]
    scores = torch.bmm(q_lat, kv.transpose(1, 2)).baddbmm_(q_rope, k_rope.transpose(1, 2))
    scores = scores.float().mul_(sm_scale)
    hidden = hidden_positions(seq_lens, mask, L)
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if return_lse else None
    probs = torch.softmax(scores, dim=-1)
    if hidden is not None:
        probs.nan_to_num_(0.0)  # a sequence that sees nothing: out = 0, as the reference
    # out = softmax(score) · kv  (the latent is also the value)                 [B, H, r]
    out = torch.bmm(probs.to(kv.dtype), kv).to(q_lat.dtype)
    return (out, lse) if return_lse else out
