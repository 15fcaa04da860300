"""The KV latent of the data-aware methods: activation-aware low rank (``whiten``) over the rows
that are kept, balanced between K and V (``bkv``), and per-layer ranks under a total budget
(``budget``)."""

from __future__ import annotations

import torch

from ..errors import XecomlaError
from ..threads import single_thread
from .methods import RANK_MULTIPLE


def nope_rows(t: torch.Tensor, plan) -> torch.Tensor:
    """The no-RoPE rows (heads, n, ...) of per-head rows t (heads, h, ...), the dropped ones zeroed."""
    rows = t[:, plan.nope_idx]
    if plan.drop is None:
        return rows
    rows = rows.clone()
    rows[:, plan.drop] = 0
    return rows


def kv_rows_kept(w, plan, G: int, h: int) -> torch.Tensor:
    """[W_k,nope; W_v] per KV head, stacked: (G·(n+h), d) (dropped no-RoPE rows are zero)."""
    wk = nope_rows(w.wk.view(G, h, -1), plan)
    wv = w.wv.view(G, h, -1)
    return torch.cat([wk, wv], dim=1).reshape(-1, wk.shape[-1])


def wide_kv_rows(w, plan, resid: torch.Tensor, G: int, h: int):
    """``wide``'s latent rows [K; V] per KV head (G·2h, d) and their biases (or None): K holds all
    h dims in their original order, the no-RoPE ones as they are (dropped ones zero) and, on the
    RoPE dims, what the shared key leaves of the head's key (``resid`` (G, p, d[+1]))."""
    d = w.wk.shape[1]
    wk = torch.zeros(G, h, d)
    wk[:, plan.nope_idx] = nope_rows(w.wk.view(G, h, d), plan)
    wk[:, plan.rope_idx] = resid[..., :d]
    W = torch.cat([wk, w.wv.view(G, h, d)], dim=1).reshape(-1, d)
    if w.bk is None:
        return W, None
    bk = torch.zeros(G, h)
    bk[:, plan.nope_idx] = nope_rows(w.bk.view(G, h), plan)
    bk[:, plan.rope_idx] = resid[..., -1]
    return W, torch.cat([bk, w.bv.view(G, h)], dim=1).reshape(-1)


def sliced_kv_rows(w, plans, G: int, h: int) -> torch.Tensor:
    """``kv_rows_kept`` of every RoPE slice (each with its own no-RoPE dims), in KV head order."""
    S = len(plans)
    if S == 1:
        return kv_rows_kept(w, plans[0], G, h)
    return torch.cat([kv_rows_kept(w.heads(s, S), plan, G // S, h) for s, plan in enumerate(plans)])


def sliced_kv_biases(w, plans, G: int, h: int) -> torch.Tensor | None:
    """The biases of ``sliced_kv_rows`` (G·(n+h),), or None for a model without biases."""
    if w.bk is None:
        return None
    S = len(plans)
    bk = torch.cat([w.bk.view(G, h)[s * G // S : (s + 1) * G // S, plan.nope_idx] for s, plan in enumerate(plans)])
    return torch.cat([bk, w.bv.view(G, h)], dim=1).reshape(-1)


def kv_balance(k_rows: torch.Tensor, v_rows: torch.Tensor, C: torch.Tensor) -> float:
    """BKV-PCA's α: the mean over K output columns of their L2 norm on the calibration tokens, over
    the same mean for the V columns (TransMLA's ``balance_kv_ratio`` 1). Rows (·, c), metric C (c, c)."""

    def mean_norm(rows):
        rows = rows.double()
        return torch.einsum("ic,cd,id->i", rows, C.double(), rows).clamp_min(0).sqrt().mean()

    return float(mean_norm(k_rows) / mean_norm(v_rows).clamp_min(1e-30))


def balanced_factors(W: torch.Tensor, k_mask: torch.Tensor, C: torch.Tensor | None, rank: int, alpha: float):
    """``whitened_factors`` of W with its K rows (``k_mask``) divided by α, the up-projection's K rows
    multiplied back: minimises E||K − K̂||²/α² + E||V − V̂||² (α = 1: plain ``whiten``)."""
    scale = torch.ones(W.shape[0], dtype=torch.float64)
    scale[k_mask] = 1 / alpha
    up, down, evals = whitened_factors(scale[:, None] * W.double(), C, rank)
    return (up.double() / scale[:, None]).float(), down, evals


def whitened_factors(W: torch.Tensor, C: torch.Tensor | None, rank: int):
    """Rank-r factors minimising E||(W − up·down)x||² for E[xxᵀ] = C (identity when None).

    Returns up = U_r (rows, r), down = U_rᵀ W (r, d) and all eigenvalues of W C Wᵀ (descending):
    the output energy each latent direction keeps (the Eckart-Young error is the sum of the rest).
    """
    Wd = W.double()
    with single_thread():
        evals, evecs = torch.linalg.eigh(Wd @ Wd.T if C is None else Wd @ C.double() @ Wd.T)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    U = evecs[:, :rank]
    return U.float(), (U.T @ Wd).float(), evals.float()


def budget_ranks(
    energies: dict[int, torch.Tensor], rank: int, multiple: int = RANK_MULTIPLE, max_rank: int | None = None
) -> dict[int, int]:
    """Per-layer ranks with Σ r_i = L·rank (multiples of ``multiple``, at least one block each):
    greedily give the next block to the layer whose next block of eigenvalues keeps the largest
    fraction of that layer's output energy (optimal for descending eigenvalues)."""
    layers = sorted(energies)
    total = rank * len(layers)
    blocks = {i: (energies[i].double() / energies[i].double().sum().clamp_min(1e-30)) for i in layers}
    cap = {i: min(blocks[i].numel(), max_rank or blocks[i].numel()) // multiple * multiple for i in layers}
    ranks = {i: multiple for i in layers}
    left = total - multiple * len(layers)
    if left < 0:
        raise XecomlaError(f"--kv-rank {rank} is below the smallest per-layer rank {multiple} of the budget")

    def gain(i: int) -> float:
        r = ranks[i]
        return float(blocks[i][r : r + multiple].sum()) if r + multiple <= cap[i] else -1.0

    while left >= multiple:
        best = max(layers, key=gain)
        if gain(best) < 0:
            break
        ranks[best] += multiple
        left -= multiple
    if left:  # a budget that is not a multiple: the remainder goes to the best layer
        best = max(layers, key=gain)
        ranks[best] += left
    return ranks
