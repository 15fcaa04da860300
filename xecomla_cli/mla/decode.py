"""Absorbed attention over the latent cache: the Triton kernel on CUDA, PyTorch elsewhere."""

from __future__ import annotations

import torch


def latent_attention_reference(q_lat, q_rope, c, k_rope, attention_mask, scale):
    """softmax(scale · (q_lat·cᵀ + q_rope·k_ropeᵀ) + mask) · c.

    q_lat (B, H, T, r), q_rope (B, H, T, p), c (B, 1, L, r), k_rope (B, 1, L, p);
    attention_mask: None, bool (B, 1, T, ≥L) with True = attend, or additive float.
    Returns (B, H, T, r).
    """
    scores = (q_lat.float() @ c.float().transpose(-1, -2) + q_rope.float() @ k_rope.float().transpose(-1, -2)) * scale
    L = c.shape[-2]
    if attention_mask is not None:
        mask = attention_mask[..., :L]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    return (probs @ c.float()).to(q_lat.dtype)


def latent_attention(q_lat, q_rope, c, k_rope, attention_mask, scale):
    """Dispatch: the Triton decode kernel when it applies (CUDA, or forced with
    XECOMLA_DECODE_KERNEL=triton; one query token; no padding mask), else the PyTorch reference.
    Shapes as in `latent_attention_reference`."""
    from ..kernels import decode_backend

    if q_lat.shape[2] == 1 and decode_backend(q_lat.device) == "triton" and _mask_is_trivial(attention_mask, c.shape[-2]):
        from ..kernels.mla_decode import mla_decode

        B, L = c.shape[0], c.shape[-2]
        seq_lens = torch.full((B,), L, dtype=torch.int32, device=c.device)
        out = mla_decode(
            q_lat[:, :, 0].contiguous(),
            q_rope[:, :, 0].contiguous(),
            c[:, 0],
            k_rope[:, 0],
            seq_lens,
            scale,
        )
        return out.unsqueeze(2)
    return latent_attention_reference(q_lat, q_rope, c, k_rope, attention_mask, scale)


def _mask_is_trivial(mask, L: int) -> bool:
    """True when the mask lets every cached position be seen (no padding)."""
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask[..., :L].all())
    return bool((mask[..., :L] == 0).all())
