"""TransMLA's RoRoPE with FreqFold (``freqfold[-N]``; see ``init.methods``): which rotated key
channels keep RoPE, at which frequencies, and what is left for the latent.

Notation per layer: G KV heads, H query heads, P = h/2 rotate-half pairs of a head (pair j is the
complex number k_{g,j} = K_{g,j}·x, dims j and j + P, turning at θ_j), p = h/c RoPE dims of the
MLA (c the "collapse"), N the fold (a multiple of c that divides P), m = N/c.

The pairs are cut into P/N fold groups of N neighbouring frequencies, a = 0 … P/N − 1. In group a
the G·N complex channels k_{g,i} (i ∈ group a) are rotated by a real orthogonal U_a (G·N × G·N),
the eigenvectors of the channels' second moment Re(K_a C K_aᴴ) (real and imaginary parts are
samples of one real vector), largest first:

    k'_b       = Σ_{g,i} U_a[(g,i), b] · k_{g,i}            rotated channel b of group a
    q'_{h,b}   = Σ_i U_a[(g(h),i), b] · q_{h,i}             the query that reads it
    r_{g,i}    = k_{g,i} − Σ_{b<m} U_a[(g,i), b] · k'_b     what the RoPE channels leave of head g's key

The first m rotated channels of every group keep RoPE: RoPE slot t = a·m + b turns at θ_{c·t}
(FreqFold treats the group's N frequencies as one; the slot frequencies are then exactly the base
model's RoPE at dim p, DeepSeek-V3's layout). Each head's score becomes

    Σ_t Re(conj(q'_{h,t}) k'_t e^{iθ_{c·t}Δ})  +  Σ_j Re(conj(q_{h,j}) r_{g(h),j})

which equals the original score when every group's frequencies are equal and every channel past
the m-th is zero. The residual keys r (G·h rows, rank G·h − p) go into the latent with V; the
queries keep all h original rows for them (n = h).

With a span K < P (``MLASpec.rope_span``) only the K fastest pairs are folded (c = 2K/p) and the
pairs K … P − 1 keep no RoPE at all: their keys stay whole in the residual r. That is how a source
with Llama 3's scaled RoPE gets a RoPE part every engine reads exactly (``init.engine_ready``): the
slots turn at default RoPE of the unscaled fast pairs, and the slow pairs the scaling changed,
which turn by less than ~0.2 rad over 8K positions, lose RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..threads import single_thread
from .shared_key import complex_rows


def fold_slots(span: int, fold: int, collapse: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold groups (K/N, N) of the K = ``span`` fastest pair indices, and for each of the K/c RoPE slots
    the original pair whose frequency it turns at (c·t). Fold 1, collapse 1: every pair alone, at its
    own frequency."""
    return torch.arange(span).view(span // fold, fold), collapse * torch.arange(span // collapse)


def fold_rotation(K: torch.Tensor, KC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real PCA of complex channels K (m, c) in the input metric C (c, c), given KC = K C (m, c): U (m, m)
    real orthogonal, columns by decreasing eigenvalue of Re(K C Kᴴ) = E[Re k Re kᵀ + Im k Im kᵀ], and
    the eigenvalues."""
    M = (KC @ K.conj().T).real
    with single_thread():
        evals, U = torch.linalg.eigh(M)
    return U.flip(1), evals.flip(0)


@dataclass
class FoldedKeys:
    """A layer's keys and queries after RoRoPE + FreqFold (rows (·, c): d input columns [+ bias])."""

    k_rope: torch.Tensor  # (p, c): the RoPE key, rotate-half [Re of the p/2 slots | Im]
    q_rope: torch.Tensor  # (H, p, c): the queries' RoPE rows
    k_resid: torch.Tensor  # (G, h, c): residual keys r in the original head basis (no RoPE)
    k_nope_channels: torch.Tensor  # (G·h − p, c): the rotated channels without RoPE, as real rows
    slot_pairs: torch.Tensor  # (p/2,): original pair whose frequency each RoPE slot turns at


def freqfold_keys(
    wk: torch.Tensor,
    wq: torch.Tensor,
    C: torch.Tensor,
    H: int,
    G: int,
    h: int,
    p: int,
    fold: int,
    span: int | None = None,
) -> FoldedKeys:
    """RoRoPE + FreqFold of one layer's key rows wk (G·h, c) and query rows wq (H·h, c), over the
    ``span`` fastest pairs (all h/2 by default; the slower ones keep no RoPE)."""
    P = h // 2
    span = span or P
    collapse = 2 * span // p
    m = fold // collapse  # RoPE channels kept per fold group
    K = complex_rows(wk, G, torch.arange(P))  # (G, P, c)
    Q = complex_rows(wq, H, torch.arange(P))  # (H, P, c)
    group_of_head = torch.arange(H) // (H // G)
    groups, slot_pairs = fold_slots(span, fold, collapse)
    k_slots, q_slots, nope = [], [], [K[:, span:].reshape(-1, K.shape[-1])]  # pairs past the span: no RoPE
    resid = K.clone()
    Cd = C.double()  # K C of the span's pairs, once for every fold group: (G, span, c), C real
    KC = torch.complex(K[:, :span].real @ Cd, K[:, :span].imag @ Cd)
    for js in groups:
        Ka = K[:, js].reshape(G * fold, -1)  # (G·N, c): channels (g, i)
        U, _ = fold_rotation(Ka, KC[:, js].reshape(G * fold, -1))
        U = U.to(K.dtype)
        Kr = U.T @ Ka  # (G·N, c): rotated channels, strongest first
        k_slots.append(Kr[:m])
        nope.append(Kr[m:])
        Ug = U.view(G, fold, G * fold)[group_of_head, :, :m]  # (H, N, m): U_a[(g(h), i), b]
        q_slots.append(torch.einsum("hib,hic->hbc", Ug, Q[:, js]))  # (H, m, c)
        resid[:, js] = (Ka - U[:, :m] @ Kr[:m]).view(G, fold, -1)
    ks, qs, nope = torch.cat(k_slots), torch.cat(q_slots, dim=1), torch.cat(nope)  # slot t = a·m + b
    return FoldedKeys(
        k_rope=torch.cat([ks.real, ks.imag]).float(),
        q_rope=torch.cat([qs.real, qs.imag], dim=1).float(),
        k_resid=torch.cat([resid.real, resid.imag], dim=1).float(),
        k_nope_channels=torch.cat([nope.real, nope.imag]).float(),
        slot_pairs=slot_pairs,
    )


def fold_candidates(head_dim: int, rope_dim: int, span: int | None = None) -> list[int]:
    """TransMLA's ``--freqfold auto`` order: N = c, 2c, 4c, … while N divides the span K (h/2 by default),
    c = 2K/p."""
    P = span or head_dim // 2
    n = 2 * P // rope_dim
    out = []
    while n <= P and P % n == 0:
        out.append(n)
        n *= 2
    return out
