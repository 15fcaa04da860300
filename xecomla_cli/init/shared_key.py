"""The shared RoPE key: one key of p dims for all heads, fitted per frequency pair (``rorope``,
``complex``; see ``init.methods``), with the conjugate factors folded into the queries."""

from __future__ import annotations

import torch

from ..threads import single_thread
from .stats import LayerStats


def complex_rows(w: torch.Tensor, heads: int, pairs: torch.Tensor) -> torch.Tensor:
    """(heads·h, c) real rows -> (heads, len(pairs), c) complex: row j + i·row j+P of each head."""
    w = w.view(heads, -1, w.shape[-1]).double()
    P = w.shape[1] // 2
    return torch.complex(w[:, pairs], w[:, pairs + P])


def head_rotation(K: torch.Tensor, C: torch.Tensor, omega: torch.Tensor | None = None, real: bool = False):
    """Rotation across the G heads of one pair's complex key rows K (G, c), metric C (c, c).

    Returns (U, sq): U (G, G) unitary (real orthogonal when ``real``: RoRoPE), columns by
    decreasing energy of the rotated keys k'_c = Σ_g conj(U_{g,c})·sq_g·k_g, with sq = ω^{1/2}
    the heads' weights. Since RoPE multiplies every head's pair j by the same phase e^{iθ_j m},
    the rotation commutes with it: with queries q'_{h,c} = conj(U_{g(h),c})·q_h/sq_g,
    Σ_c Re(conj(q'_{h,c})·k'_c) = Re(conj(q_h)·k_{g(h)}) at every position.
    """
    G = K.shape[0]
    sq = torch.ones(G, dtype=torch.float64) if omega is None else omega.double().clamp_min(1e-12).sqrt()
    Kw = sq[:, None].to(K.dtype) * K
    M = Kw @ C.to(K.dtype) @ Kw.conj().T  # (G, G) Hermitian: energy of the weighted keys
    with single_thread():
        _, vec = torch.linalg.eigh(M.real if real else M)
    return vec.flip(1).to(K.dtype), sq


def shared_key_fit(K: torch.Tensor, C: torch.Tensor, omega: torch.Tensor | None = None, real: bool = False):
    """Best rank-1 fit K_g ≈ z_g·s of one pair's G complex key rows (G, c) in the metric C (c, c).

    Minimises Σ_g ω_g (K_g − z_g s) C (K_g − z_g s)ᴴ (``real``: z a real unit vector, i.e. the
    first component of a real orthogonal rotation across heads, RoRoPE). Returns z (G,), s (c,).
    """
    U, sq = head_rotation(K, C, omega, real)
    u = U[:, 0]
    s = u.conj() @ (sq[:, None].to(K.dtype) * K)  # (c,)
    return u / sq.to(K.dtype), s


def rope_weights(w, plan, stats: LayerStats | None, H: int, G: int, h: int, key: str, bias: bool):
    """Shared key rows (p, d[+1]) and query RoPE rows (H, p, d[+1]) for the kept pairs, and what
    the shared key leaves of each KV head's key on them (G, p, d[+1]): k_g − z_g·s (``wide``).

    Rows carry the bias as an extra last column when ``bias``. ``key``: mean | rorope | complex.
    """
    p2 = plan.rope_idx.numel() // 2
    pairs = plan.rope_idx[:p2]
    wk, wq = w.wk, w.wq
    if bias:
        wk, wq = torch.cat([wk, w.bk[:, None]], 1), torch.cat([wq, w.bq[:, None]], 1)
    if key == "mean":
        k_heads = wk.view(G, h, -1)[:, plan.rope_idx]  # (G, p, c)
        k_rows = k_heads.mean(0)
        q_rows = wq.view(H, h, -1)[:, plan.rope_idx]
        return k_rows.float(), q_rows.float(), (k_heads - k_rows).float()
    K = complex_rows(wk, G, pairs)  # (G, p/2, c)
    Q = complex_rows(wq, H, pairs)  # (H, p/2, c)
    C = stats.cov_aug if bias else stats.cov
    s_all, z_all = [], []
    for t in range(p2):
        Qt = Q[:, t]  # (H, c)
        q_energy = torch.einsum("hc,cd,hd->h", Qt, C.to(Qt.dtype), Qt.conj()).real
        omega = q_energy.view(G, H // G).sum(1)
        z, s = shared_key_fit(K[:, t], C, omega, real=key == "rorope")
        z_all.append(z)
        s_all.append(s)
    z = torch.stack(z_all, 1)  # (G, p/2)
    s = torch.stack(s_all)  # (p/2, c)
    zq = z.repeat_interleave(H // G, dim=0)  # (H, p/2)
    Qf = zq.conj()[..., None] * Q  # q' = conj(z)·q
    k_rows = torch.cat([s.real, s.imag])  # (p, c): rotate-half halves
    q_rows = torch.cat([Qf.real, Qf.imag], dim=1)  # (H, p, c)
    resid = K - z[..., None] * s  # (G, p/2, c): k_g − z_g·s per pair
    return k_rows.float(), q_rows.float(), torch.cat([resid.real, resid.imag], dim=1).float()
