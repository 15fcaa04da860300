"""The PyTorch reference for absorbed MLA decode: exact fp32 math, what the kernel and the fast path are tested against.

It takes the arguments of every decode backend (see ``xecomla_cli.kernels``):

    q_lat  [B, H, r]   latent queries (q_nope absorbed through the K up-projection)
    q_rope [B, H, p]   rotated RoPE queries
    kv     [B, L, r]   latent cache            (paged: [num_blocks, block_size, r])
    k_rope [B, L, p]   shared RoPE key cache   (paged: [num_blocks, block_size, p])
    seq_lens [B]       int32, attend to positions 0 .. seq_lens[b]-1 (None: all L positions)
    mask   [B, ≥L]     bool, True where a position may be attended (padding); None: no mask
    block_table [B, max_blocks] int32, page ids of each sequence (paged cache only)

    score[b, h, j] = sm_scale * (q_lat[b, h] · kv[b, j] + q_rope[b, h] · k_rope[b, j])
    out[b, h]      = softmax_j(score[b, h, visible j]) @ kv[b, visible j]                 # [B, H, r]

A sequence that sees no position at all gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import torch


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Lay a paged cache [num_blocks, block_size, d] out per sequence: [B, max_blocks * block_size, d]."""
    num_blocks, block_size, d = pages.shape
    B, max_blocks = block_table.shape
    # unused table entries may hold anything (-1, stale ids); their positions are masked later
    ids = block_table.long().clamp(0, num_blocks - 1)
    return pages[ids].reshape(B, max_blocks * block_size, d)


def hidden_positions(seq_lens: torch.Tensor | None, mask: torch.Tensor | None, L: int) -> torch.Tensor | None:
    """True where position j of sequence b must not be attended: [B, 1, L] (None when nothing is hidden)."""
    hidden = None
    if seq_lens is not None:
        positions = torch.arange(L, device=seq_lens.device)
        hidden = positions[None, :] >= seq_lens.long()[:, None]
    if mask is not None:
        hidden = ~mask[:, :L] if hidden is None else hidden | ~mask[:, :L]
    return None if hidden is None else hidden[:, None, :]


def mla_decode_reference(
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
    """Absorbed MLA decode in plain PyTorch with fp32 math (num_splits is accepted and ignored)."""
    if block_table is not None:
        kv, k_rope = gather_pages(kv, block_table), gather_pages(k_rope, block_table)
    L = kv.shape[1]
    q_lat32, q_rope32, kv32, k_rope32 = (t.float() for t in (q_lat, q_rope, kv, k_rope))
    # score = sm_scale * (q_lat · kvᵀ + q_rope · k_ropeᵀ)                      # [B, H, L]
    scores = torch.einsum("bhr,blr->bhl", q_lat32, kv32) + torch.einsum("bhp,blp->bhl", q_rope32, k_rope32)
    scores = scores * sm_scale
    hidden = hidden_positions(seq_lens, mask, L)
    if hidden is not None:
        scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H]
    # out = softmax(score) @ kv                                               # [B, H, r]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with nothing visible: 0
    out = torch.einsum("bhl,blr->bhr", probs, kv32).to(q_lat.dtype)
    return (out, lse) if return_lse else out
