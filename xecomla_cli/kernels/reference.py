"""PyTorch references for absorbed MLA decode: an exact fp32 one for tests and the einsum one X-EcoMLA ships.

Both take the arguments of :func:`xecomla_cli.kernels.mla_decode.mla_decode`:

    q_lat  [B, H, r]   latent queries (q_nope absorbed through the K up-projection)
    q_rope [B, H, p]   rotated RoPE queries
    kv     [B, L, r]   latent cache            (paged: [num_blocks, block_size, r])
    k_rope [B, L, p]   shared RoPE key cache   (paged: [num_blocks, block_size, p])
    seq_lens [B]       int32, attend to positions 0 .. seq_lens[b]-1
    block_table [B, max_blocks] int32, page ids of each sequence (paged cache only)

    score[b, h, j] = sm_scale * (q_lat[b, h] · kv[b, j] + q_rope[b, h] · k_rope[b, j])
    out[b, h]      = softmax_j(score[b, h, :seq_lens[b]]) @ kv[b, :seq_lens[b]]     # [B, H, r]
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


def _length_mask(seq_lens: torch.Tensor, L: int) -> torch.Tensor:
    """True where position j is past the end of sequence b: [B, 1, L]."""
    positions = torch.arange(L, device=seq_lens.device)
    return (positions[None, :] >= seq_lens.to(positions.device).long()[:, None])[:, None, :]


def mla_decode_reference(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
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
    scores = (scores * sm_scale).masked_fill(_length_mask(seq_lens, L), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                     # [B, H]
    # out = softmax(score) @ kv                                               # [B, H, r]
    out = torch.einsum("bhl,blr->bhr", torch.exp(scores - lse[..., None]), kv32).to(q_lat.dtype)
    return (out, lse) if return_lse else out


def mla_decode_einsum(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """X-EcoMLA reference decode (DeepSeek-V3 `absorb` einsums in the input dtype, softmax in fp32)."""
    if block_table is not None:
        kv, k_rope = gather_pages(kv, block_table), gather_pages(k_rope, block_table)
    L = kv.shape[1]
    scores = (torch.einsum("bhc,btc->bht", q_lat, kv) + torch.einsum("bhr,btr->bht", q_rope, k_rope)) * sm_scale
    scores = scores.masked_fill(_length_mask(seq_lens, L), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).type_as(q_lat)
    out = torch.einsum("bht,btc->bhc", probs, kv)
    return (out, torch.logsumexp(scores.float(), dim=-1)) if return_lse else out
