"""Data-aware MLA initialisations, better than the paper's data-free one (``init-svd --method``).

Notation per layer: d hidden, H query heads, G KV heads (group g(h) of query head h), h head
dim, P = h/2 rotate-half pairs (original dim j pairs with j + P and turns at θ_j), p RoPE dims
of the MLA (p/2 "slots"), n = h - p, r latent rank; C = E[x xᵀ] over the calibration tokens.
A pair j of a head is a complex number: row K_{g,j} = W_k[g,j] + i·W_k[g,j+P], key value
k_{g,j} = K_{g,j}·x, RoPE multiplies it by e^{iθ_j·m}, and the pair's score is Re(conj(q)·k).

Components (joined with '+', e.g. ``rot-pairs+complex+whiten+budget``):

* ``qk-pairs`` (MHA2MLA): keep RoPE on the p/2 original pairs of largest
  Σ_h E||q_{h,j}||·E||k_{g(h),j}||, at their original frequencies; the other pairs become the n
  no-RoPE dims, unchanged.
* ``rot-pairs``: the same score times how much pair j rotates over the context,
  w_j = E_{Δ~U[0,T)} |e^{iθ_jΔ} − 1| = E 2|sin(θ_jΔ/2)|: a pair that barely turns loses
  nothing when it loses RoPE, so its RoPE slot goes to a pair that turns.
* ``fast-pairs``: RoPE on the p/2 fastest-turning original pairs j = 0..p/2-1 in every layer, at
  their original frequencies θ^{-2j/h}. These are exactly the frequencies DeepSeek-V3's RoPE
  computes at dim p from rope_theta' = θ^{p/h} (Llama-3 scaling acts per frequency, so it agrees
  too), which is what makes the result exportable; ``rot-pairs`` picks per layer and is not.
* ``rorope`` (TransMLA's RoRoPE): per kept pair, rotate the G heads' keys by a real orthogonal
  G×G matrix (commutes with RoPE, as it acts on real and imaginary parts alike) so that the
  first rotated key holds the most energy; it becomes the shared RoPE key, the query heads get
  the rotation's row as factors, the remaining rotated keys are dropped.
* ``complex``: per kept pair, fit every head's key as a complex multiple of one shared key,
  k_{g,j} ≈ z_{g,j}·s_j, minimising Σ_g ω_g E|k_{g,j} − z_{g,j} s_j|² (ω_g: the group's query
  energy Σ_{h∈g} E|q_{h,j}|²): z is the top eigenvector of the Hermitian G×G matrix
  Ω^{1/2} K_j C K_jᴴ Ω^{1/2} (scaled by Ω^{-1/2}) and s_j = uᴴΩ^{1/2}K_j. The conjugate factor
  is folded into the queries, q'_{h,j} = conj(z_{g(h),j})·q_{h,j} (a 2×2 rotation-scaling of the
  pair's two query rows): exact for the shared part, since RoPE (a complex phase) commutes
  with complex scalars. Strictly better than ``rorope`` (a real rotation is a special case).
* ``whiten`` (activation-aware low rank): the latent is fitted only on the rows that are kept
  (K no-RoPE rows and V rows, W = [W_k,nope; W_v], G(n+h) rows) and minimises the output error
  E||(W − W_r)x||² = tr((W − W_r) C (W − W_r)ᵀ): with U_r the top-r eigenvectors of W C Wᵀ
  (equivalently the left singular vectors of W C^{1/2}, i.e. PCA of the K/V outputs),
  W_dkv = U_rᵀ W and the up projection is U_r. No C^{-1/2} is needed.
* ``budget``: per-layer ranks under the total budget Σ_i r_i = L·r (multiples of 8, at least
  8), greedily giving each next block of 8 to the layer whose block of eigenvalues of W C Wᵀ
  removes the largest fraction of that layer's output energy.
* ``uniform-pairs`` (MHA2MLA's uniform strategy): RoPE on the pairs 0, s, 2s, … (s = ⌊h/p⌋), at
  their original frequencies. (MHA2MLA's high-frequency strategy is ``fast-pairs``.)
* ``group-rope`` (per-group RoPE slices; TransMLA's observation that MLA represents GQA exactly):
  the RoPE key is split into G slices of p_g = p/G dims, one per KV group, and query head h reads
  only its group's slice (the rest of its p RoPE query dims start at zero). Each group keeps its
  own key rows on its own p_g/2 pairs (chosen per group), so no shared-key fit is needed; each head
  keeps n = h − p_g no-RoPE dims. The cache holds r + G·p_g values; at p_g = h (every pair) and
  full rank the layer is the original GQA layer. MHA2MLA's partial RoPE keeps such a per-KV-head
  RoPE key, so ``mha2mla`` uses it.
* ``freqfold[-N]`` (TransMLA's RoRoPE + FreqFold; ``init.freqfold``): with p = h/c (c the
  "collapse"), the P = h/2 pairs are cut into P/N groups of N neighbouring frequencies (N a
  multiple of c). Per group, a real PCA of the G·N complex key channels (uncentred second moment
  of the keys, real and imaginary parts as samples) rotates them; the top N/c rotated channels keep
  RoPE, slot t at the original frequency θ_{c·t} (folding treats a group's frequencies as one),
  and the queries take the rotation's rows; every other rotated channel becomes a no-RoPE key in
  the latent, which TransMLA keeps in the original head basis (n = h). ``freqfold`` alone searches
  N = c, 2c, 4c, … while the calibration perplexity of the full-rank conversion improves, as
  TransMLA's ``--freqfold auto``. N = c = 1 is RoRoPE per frequency with no folding.
* ``bkv`` (TransMLA's BKV-PCA): ``whiten`` with the K rows scaled by 1/α first, α = the mean L2
  norm of the K (no-RoPE) output columns over that of the V columns on the calibration tokens, and
  the up-projection's K rows by α: the PCA then weighs the K and V reconstruction errors equally,
  E||K − K̂||²/α² + E||V − V̂||².
* ``drop``: with RoPE on chosen pairs, the pairs left without a RoPE slot keep their score term
  unrotated, Re(conj(q)·k) instead of Re(conj(q)·k·e^{iθΔ}). For a term of random phase that costs
  E|q·k|²(1 − E cos θΔ) in mean square, while dropping it (zero query and key rows, and no
  latent spent on them) costs E|q·k|²/2: drop the pairs with E_{Δ~U[0,T)} cos θΔ < 1/2. With
  ``freqfold`` the same rule zeroes those pairs' residual keys r (what the RoPE channels leave),
  and their queries stay, so training can grow the keys back.
* ``wide``: every head keeps all h of its query dims without RoPE (n = h, as TransMLA does); on the
  dims that went to the shared RoPE key, the no-RoPE key is what that key leaves of the head's
  key, k_g − z_g·s, unrotated (TransMLA's residual keys), and the latent covers it with the rest.
  ``wide0``: those keys start at zero instead, so the scores are exactly those without it and the
  extra query and key rows are trainable capacity at no cache cost (a zero key row receives the
  gradient of its non-zero query row).
* ``refit``: after the layer is converted, refit its output projection by ridge regression so
  that it reproduces the original attention output on the calibration tokens (see
  ``refit_output``).

Statistics are those of the original model (one calibration pass, layer by layer).

Presets: ``mha2mla`` = qk-pairs+group-rope (MHA2MLA: 2-norm partial RoPE per KV head, joint SVD
of [K_nope; V]), ``transmla`` = freqfold+bkv (TransMLA), ``rorope`` = rot-pairs+rorope, ``complex`` = rot-pairs+complex,
``whiten`` = paper RoPE + whiten, ``best`` = rot-pairs+complex+whiten+budget, ``deepseek`` =
fast-pairs+complex+whiten (the best that ``export`` can write in the DeepSeek-V3 layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import XecomlaError

PAIRS = ("qk-pairs", "rot-pairs", "fast-pairs", "uniform-pairs")
COMPONENTS = (
    *PAIRS,
    "rorope",
    "complex",
    "group-rope",
    "freqfold",
    "drop",
    "whiten",
    "bkv",
    "budget",
    "wide",
    "wide0",
    "refit",
)


PRESETS = {
    "mha2mla": "qk-pairs+group-rope",
    "transmla": "freqfold+bkv",
    "best": "rot-pairs+complex+whiten+budget",
    "deepseek": "fast-pairs+complex+whiten",
}


ROPE_CONTEXT = 2048  # T of the rotation weight: the context over which a pair must keep turning


RANK_MULTIPLE = 8


@dataclass(frozen=True)
class MethodConfig:
    """What a ``--method`` string asks for."""

    pairs: str | None = None  # None (paper: last p dims, fresh frequencies), "qk", "rot", "fast" or "uniform"
    key: str = "mean"  # shared RoPE key: "mean" of heads, "rorope" or "complex"
    whiten: bool = False
    budget: bool = False
    refit: bool = False  # least-squares refit of o_proj to the original attention output
    drop: bool = False  # drop the score terms of fast-turning pairs that get no RoPE slot
    group_rope: bool = False  # one RoPE key slice per KV group
    freqfold: int | None = None  # TransMLA's RoRoPE + FreqFold over all pairs: the fold N (0: search)
    balance: bool = False  # BKV-PCA: K and V balanced before the latent's PCA
    wide: str | None = None  # n = h: "resid" (RoPE dims' keys = the shared key's residual) or "zero"

    @property
    def is_paper(self) -> bool:
        return self == MethodConfig()


def split_components(text: str) -> list[str]:
    """'best+refit' -> its components, presets expanded; one clear error for an unknown name."""
    parts = [c for part in text.split("+") for c in (PRESETS[part].split("+") if part in PRESETS else [part])]
    bad = [p for p in parts if p not in COMPONENTS and not re.fullmatch(r"freqfold-[1-9][0-9]*", p)]
    if bad or not parts:
        raise XecomlaError(
            f"unknown --method '{text}': use paper, {', '.join(PRESETS)}, or components joined by '+' "
            f"({', '.join(COMPONENTS)}, freqfold-N), e.g. rot-pairs+complex+whiten"
        )
    return parts


def parse_method(text: str) -> MethodConfig:
    """'paper' | a preset | components joined by '+' -> MethodConfig (one clear error otherwise)."""
    text = text.strip().lower()
    if text == "paper":
        return MethodConfig()
    parts = split_components(text)
    fold = next((0 if c == "freqfold" else int(c[len("freqfold-") :]) for c in parts if c.startswith("freqfold")), None)
    if sum(c in parts for c in PAIRS) > 1:
        raise XecomlaError(f"--method: choose one of {', '.join(PAIRS)}")
    if "rorope" in parts and "complex" in parts:
        raise XecomlaError("--method: choose one of rorope and complex")
    if fold is not None and any(c in parts for c in (*PAIRS, "rorope", "complex", "group-rope")):
        raise XecomlaError(
            "--method freqfold rotates every frequency pair (TransMLA): "
            "combine it only with whiten, bkv, budget, drop, refit"
        )
    if ("wide" in parts or "wide0" in parts) and "group-rope" in parts:
        raise XecomlaError("--method: wide keeps one shared RoPE key; it cannot be combined with group-rope")
    key = "rorope" if "rorope" in parts else "complex" if "complex" in parts else "mean"
    pairs = next((c[: -len("-pairs")] for c in PAIRS if c in parts), None)
    wide = None if fold is not None else "zero" if "wide0" in parts else "resid" if "wide" in parts else None
    if pairs is None and fold is None and (key != "mean" or "drop" in parts or "group-rope" in parts or wide):
        pairs = "rot"  # a per-frequency key, dropped pairs or per-group slices need the original pairs
    return MethodConfig(
        pairs,
        key,
        whiten="whiten" in parts or "bkv" in parts,
        budget="budget" in parts,
        refit="refit" in parts,
        drop="drop" in parts,
        group_rope="group-rope" in parts,
        freqfold=fold,
        balance="bkv" in parts,
        wide=wide,
    )
