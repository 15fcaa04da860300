"""The KV latent of the data-aware methods: activation-aware low rank (``whiten``) over the rows
that are kept, and per-layer ranks under a total budget (``budget``)."""

from __future__ import annotations

import torch

from ..errors import XecomlaError
from .common import single_thread
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
