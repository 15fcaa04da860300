"""SVD helpers of every initialisation: truncated SVD, rank padding
(the K/V spectrum that chooses ranks is ``mla/kv_spectrum.py``).

Matrices are (out, in) as in ``nn.Linear``; r is the latent rank.
"""

from __future__ import annotations

import torch

from ..threads import single_thread


def truncated_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (rows, r), S_r (r,), V_rᵀ (r, cols) of a matrix, computed in fp32."""
    with single_thread():
        u, s, vt = torch.linalg.svd(m.detach().float(), full_matrices=False)
    return u[:, :rank].float(), s[:rank].float(), vt[:rank].float()


def pad_rank(u, s, vt, rank: int):
    """Zero-pad truncated SVD factors to `rank` components (zero singular values)."""
    extra = rank - s.numel()
    if extra <= 0:
        return u, s, vt
    return (
        torch.cat([u, u.new_zeros(u.shape[0], extra)], 1),
        torch.cat([s, s.new_zeros(extra)]),
        torch.cat([vt, vt.new_zeros(extra, vt.shape[1])]),
    )
