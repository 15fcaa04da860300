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
* ``drop``: with RoPE on chosen pairs, the pairs left without a RoPE slot keep their score term
  unrotated, Re(conj(q)·k) instead of Re(conj(q)·k·e^{iθΔ}). For a term of random phase that costs
  E|q·k|²(1 − E cos θΔ) in mean square, while dropping it (zero query and key rows, and no
  latent spent on them) costs E|q·k|²/2: drop the pairs with E_{Δ~U[0,T)} cos θΔ < 1/2.
* ``refit``: after the layer is converted, refit its output projection by ridge regression so
  that it reproduces the original attention output on the calibration tokens (see
  ``refit_output``).

Statistics are those of the original model (one calibration pass, layer by layer).

Presets: ``mha2mla`` = qk-pairs, ``rorope`` = rot-pairs+rorope, ``complex`` = rot-pairs+complex,
``whiten`` = paper RoPE + whiten, ``best`` = rot-pairs+complex+whiten+budget, ``deepseek`` =
fast-pairs+complex+whiten (the best that ``export`` can write in the DeepSeek-V3 layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .calibration import LayerRunner, LayerStats
from .errors import XecomlaError
from .mla.convert import decoder_layers, has_o_bias, has_qkv_bias, new_mla_attention
from .mla.rope import model_inv_freq
from .mla.spec import MLASpec
from .svd_init import AttentionWeights, single_thread

COMPONENTS = ("qk-pairs", "rot-pairs", "fast-pairs", "rorope", "complex", "drop", "whiten", "budget", "refit")
PRESETS = {
    "mha2mla": "qk-pairs",
    "rorope": "rot-pairs+rorope",
    "complex": "rot-pairs+complex",
    "whiten": "whiten",
    "best": "rot-pairs+complex+whiten+budget",
    "deepseek": "fast-pairs+complex+whiten",
}
ROPE_CONTEXT = 2048  # T of the rotation weight: the context over which a pair must keep turning
RANK_MULTIPLE = 8


@dataclass(frozen=True)
class MethodConfig:
    """What a ``--method`` string asks for."""

    pairs: str | None = None  # None (paper: last p dims, fresh frequencies), "qk", "rot" or "fast"
    key: str = "mean"  # shared RoPE key: "mean" of heads, "rorope" or "complex"
    whiten: bool = False
    budget: bool = False
    refit: bool = False  # least-squares refit of o_proj to the original attention output
    drop: bool = False  # drop the score terms of fast-turning pairs that get no RoPE slot

    @property
    def is_paper(self) -> bool:
        return self == MethodConfig()


def parse_method(text: str) -> MethodConfig:
    """'paper' | a preset | components joined by '+' -> MethodConfig (one clear error otherwise)."""
    text = text.strip().lower()
    if text == "paper":
        return MethodConfig()
    parts = [c for part in text.split("+") for c in (PRESETS[part].split("+") if part in PRESETS and part not in COMPONENTS else [part])]
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise XecomlaError(
            f"unknown --method '{text}': use paper, {', '.join(PRESETS)}, or components joined by '+' "
            f"({', '.join(COMPONENTS)}), e.g. rot-pairs+complex+whiten"
        )
    if sum(c in parts for c in ("qk-pairs", "rot-pairs", "fast-pairs")) > 1:
        raise XecomlaError("--method: choose one of qk-pairs, rot-pairs and fast-pairs")
    if "rorope" in parts and "complex" in parts:
        raise XecomlaError("--method: choose one of rorope and complex")
    key = "rorope" if "rorope" in parts else "complex" if "complex" in parts else "mean"
    pairs = next((c[: -len("-pairs")] for c in ("qk-pairs", "rot-pairs", "fast-pairs") if c in parts), None)
    if key != "mean" and pairs is None:
        pairs = "rot"  # a shared key per frequency needs the original pairs
    if "drop" in parts and pairs is None:
        pairs = "rot"
    return MethodConfig(pairs, key, "whiten" in parts, "budget" in parts, "refit" in parts, "drop" in parts)


# ---- RoPE pairs ------------------------------------------------------------------------------
def rotation_weight(inv_freq: torch.Tensor, context: int = ROPE_CONTEXT) -> torch.Tensor:
    """w_j = mean over Δ = 0..T-1 of |e^{iθ_jΔ} − 1| = 2|sin(θ_jΔ/2)|: what pair j loses without RoPE."""
    delta = torch.arange(context, dtype=torch.float64)
    return (2 * torch.sin(inv_freq.double()[:, None] * delta / 2).abs()).mean(1)


def pair_scores(stats: LayerStats, H: int, G: int, inv_freq: torch.Tensor | None = None,
                context: int = ROPE_CONTEXT) -> torch.Tensor:  # fmt: skip
    """Per original pair j (P,): Σ_h E||q_{h,j}||·E||k_{g(h),j}||, times w_j when inv_freq is given."""
    k = stats.k_pair_norm.repeat_interleave(H // G, dim=0)  # (H, P)
    s = (stats.q_pair_norm * k).sum(0)
    return s if inv_freq is None else s * rotation_weight(inv_freq, context)


def select_pairs(scores: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The p/2 pairs of largest score, in increasing pair order."""
    return scores.topk(rope_dim // 2).indices.sort().values


def pair_plan(pairs: torch.Tensor, head_dim: int, inv_freq: torch.Tensor, scaling: float = 1.0):
    """A RopePlan keeping whole original pairs at their original frequencies."""
    from .svd_init import RopePlan

    P = head_dim // 2
    rope_idx = torch.cat([pairs, pairs + P])
    keep = torch.ones(head_dim, dtype=torch.bool)
    keep[rope_idx] = False
    return RopePlan(rope_idx, keep.nonzero().flatten(), inv_freq[pairs].float(), scaling)


# ---- shared RoPE key -------------------------------------------------------------------------
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
    """Shared key rows (p, d[+1]) and query RoPE rows (H, p, d[+1]) for the kept pairs.

    Rows carry the bias as an extra last column when ``bias``. ``key``: mean | rorope | complex.
    """
    p2 = plan.rope_idx.numel() // 2
    pairs = plan.rope_idx[:p2]
    wk, wq = w.wk, w.wq
    if bias:
        wk, wq = torch.cat([wk, w.bk[:, None]], 1), torch.cat([wq, w.bq[:, None]], 1)
    if key == "mean":
        k_rows = wk.view(G, h, -1)[:, plan.rope_idx].mean(0)
        q_rows = wq.view(H, h, -1)[:, plan.rope_idx]
        return k_rows.float(), q_rows.float()
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
    return k_rows.float(), q_rows.float()


# ---- latent -----------------------------------------------------------------------------------
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


def budget_ranks(energies: dict[int, torch.Tensor], rank: int, multiple: int = RANK_MULTIPLE,
                 max_rank: int | None = None) -> dict[int, int]:  # fmt: skip
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


# ---- one layer -------------------------------------------------------------------------------
def layer_plan(model, spec: MLASpec, cfg: MethodConfig, stats: LayerStats | None, context: int = ROPE_CONTEXT):
    """The RoPE plan of one layer for ``cfg`` (paper plan when no pair selection)."""
    from .svd_init import paper_rope_plan

    if cfg.pairs is None:
        return paper_rope_plan(model.config, spec.head_dim, spec.rope_dim)
    inv_freq, scaling = model_inv_freq(model.config, spec.head_dim)
    if cfg.pairs == "fast":  # the same p/2 fastest pairs in every layer: DeepSeek-V3's RoPE at theta^(p/h)
        pairs = torch.arange(spec.rope_dim // 2)
    else:
        scores = pair_scores(stats, spec.num_heads, spec.num_kv_heads, inv_freq if cfg.pairs == "rot" else None, context)
        pairs = select_pairs(scores, spec.rope_dim)
    plan = pair_plan(pairs, spec.head_dim, inv_freq, scaling)
    if cfg.drop:
        plan.drop = drop_pairs(inv_freq, context)[plan.nope_idx % (spec.head_dim // 2)]
    return plan


def drop_pairs(inv_freq: torch.Tensor, context: int = ROPE_CONTEXT) -> torch.Tensor:
    """Pairs (P,) bool that turn so fast that dropping their score term beats keeping it unrotated.

    For a score term Re(a·e^{iθΔ}) with a of random phase, keeping it without RoPE costs
    E|a|²(1 − cos θΔ) in mean square, dropping it costs E|a|²/2: drop when E_Δ[cos θΔ] < 1/2.
    """
    delta = torch.arange(context, dtype=torch.float64)
    return torch.cos(inv_freq.double()[:, None] * delta).mean(1) < 0.5


def method_state_dict(w, spec: MLASpec, layer: int, plan, cfg: MethodConfig,
                      stats: LayerStats | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """MLA weights of one layer for a data-aware method, as an ``MLAAttention`` state dict."""
    H, G, h, p = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
    n, r = h - p, spec.kv_ranks[layer]
    bias = w.bk is not None
    sd: dict[str, torch.Tensor] = {}

    # Queries [nope | rope] and the shared RoPE key.
    k_rope, q_rope = rope_weights(w, plan, stats, H, G, h, cfg.key, bias)
    q_nope = nope_rows(w.wq.view(H, h, -1), plan)  # dropped dims: no query, and no latent spent on their keys
    wq = torch.cat([q_nope, q_rope[..., : spec.hidden_size]], dim=1).reshape(H * h, -1)
    if spec.q_rank is None:
        sd["q_proj.weight"] = wq
    else:
        from .svd_init import truncated_svd

        u, s, vt = truncated_svd(wq, spec.q_rank)
        sd["q_a_proj.weight"] = s[:, None] * vt
        sd["q_b_proj.weight"] = u
    if bias:
        bq = torch.cat([nope_rows(w.bq.view(H, h), plan), q_rope[..., -1]], dim=1).reshape(-1)
        sd["q_proj.bias" if spec.q_rank is None else "q_b_proj.bias"] = bq

    # Latent over the kept rows [K_nope; V] of the G KV heads, repeated to the H query heads.
    W = kv_rows_kept(w, plan, G, h)
    up, down, _ = whitened_factors(W, stats.cov if cfg.whiten else None, r)
    up = up.view(G, n + h, r).repeat_interleave(H // G, dim=0)  # (H, n + h, r)
    sd["kv_b_proj.weight"] = up.reshape(H * (n + h), r)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([down, k_rope[:, : spec.hidden_size]])
    if bias:
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), k_rope[:, -1]])
        bk = w.bk.view(G, h)[:, plan.nope_idx]
        bkv = torch.cat([bk, w.bv.view(G, h)], dim=1).repeat_interleave(H // G, dim=0)
        sd["kv_b_proj.bias"] = bkv.reshape(-1)
    if spec.latent_norm:
        sd["kv_a_layernorm.weight"] = torch.ones(r)
    sd["o_proj.weight"] = w.wo
    if w.bo is not None:
        sd["o_proj.bias"] = w.bo
    sd["rope_inv_freq"] = plan.inv_freq.float()
    return sd


def convert_layer_with(model, spec: MLASpec, layer: int, cfg: MethodConfig, stats: LayerStats | None):
    """Build the MLA attention of one layer with a data-aware method."""
    old = decoder_layers(model)[layer].self_attn
    w = AttentionWeights.of(old)
    plan = layer_plan(model, spec, cfg, stats, spec.options.get("rope_context", ROPE_CONTEXT))
    new = new_mla_attention(model.config, spec, layer, has_qkv_bias(old), has_o_bias(old))
    new.load_state_dict(method_state_dict(w, spec, layer, plan, cfg, stats))
    new.rope_attention_scaling = plan.attention_scaling
    spec.options["rope_attention_scaling"] = plan.attention_scaling
    if cfg.pairs is not None:
        spec.options.setdefault("rope_pairs", {})[str(layer)] = plan.rope_idx[: spec.rope_dim // 2].tolist()
    return new.to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype)


def layer_energy(model, spec: MLASpec, layer: int, cfg: MethodConfig, stats: LayerStats | None) -> torch.Tensor:
    """Output-energy eigenvalues of a layer's kept K/V rows (what ``budget`` allocates by)."""
    w = AttentionWeights.of(decoder_layers(model)[layer].self_attn)
    plan = layer_plan(model, spec, cfg, stats, spec.options.get("rope_context", ROPE_CONTEXT))
    C = stats.cov if cfg.whiten else None
    return whitened_factors(kv_rows_kept(w, plan, spec.num_kv_heads, spec.head_dim), C, 0)[2]


# ---- whole model -----------------------------------------------------------------------------
def convert_model_with(model, spec: MLASpec, cfg: MethodConfig, input_ids: torch.Tensor | None,
                       progress: Callable[[str, int], None] | None = None) -> None:  # fmt: skip
    """Convert every layer of ``spec`` in place with a data-aware method.

    ``input_ids`` (B, T) is the calibration batch: one pass of the original model collects each
    converted layer's statistics (and, for ``refit``, keeps its attention inputs in fp16). With
    ``budget`` the spec's ranks are replaced by the budgeted per-layer ranks.
    ``progress(phase, layer)`` is called after each layer of each phase.
    """
    layers = spec.converted_layers
    tick = progress or (lambda phase, i: None)
    if input_ids is None:
        raise XecomlaError("this --method needs calibration data: pass calibration token ids")
    runner = LayerRunner(model, input_ids)
    stats: dict[int, LayerStats] = {}
    inputs: dict[int, list[torch.Tensor]] = {}
    for i in range(max(layers) + 1):
        if i in layers:
            stats[i] = runner.stats(i)
            if cfg.refit:
                inputs[i] = runner.attention_inputs(i)
        if i < max(layers):
            runner.advance(i)
        tick("calibrate", i)
    if cfg.budget:
        energies = {i: layer_energy(model, spec, i, cfg, stats[i]) for i in layers}
        ranks = budget_ranks(energies, _budget_rank(spec), max_rank=min(spec.hidden_size, energies[layers[0]].numel()))
        for i in layers:
            spec.kv_ranks[i] = ranks[i]
        spec.options["rank_budget"] = _budget_rank(spec) * len(layers)
    for i in layers:
        old = decoder_layers(model)[i].self_attn
        new = convert_layer_with(model, spec, i, cfg, stats[i])
        if cfg.refit:
            refit_output(old, new, inputs.pop(i), runner.chunks)
        decoder_layers(model)[i].self_attn = new
        tick("convert", i)


def attention_head_outputs(attn, x: torch.Tensor, chunk: dict) -> torch.Tensor:
    """The input of ``attn.o_proj`` (N, H·h) for attention inputs x (B, T, d): the heads' outputs."""
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        attn(hidden_states=x, position_embeddings=chunk["emb"], attention_mask=chunk["mask"],
             position_ids=chunk["pos"])  # fmt: skip
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


@torch.no_grad()
def refit_output(old, new, inputs: list[torch.Tensor], chunks: list[dict], ridge: float = 1e-3) -> None:
    """Refit the MLA's output projection so that it reproduces the original attention output:

        W_o' = argmin Σ_x ||W_o' y'(x) − W_o y(x)||² + λ||W_o' − W_o||²
             = W_o (Σ y y'ᵀ + λI)(Σ y' y'ᵀ + λI)^{-1},   λ = ridge · tr(Σ y' y'ᵀ)/(H·h)

    with y, y' the original and MLA heads' outputs (before o_proj) on the calibration inputs. It
    absorbs what the latent and the shared RoPE key change systematically (e.g. a shrunken V).
    """
    A = B = None
    for x, chunk in zip(inputs, chunks):
        x = x.to(new.o_proj.weight.dtype)
        y = attention_head_outputs(old, x, chunk)
        y2 = attention_head_outputs(new, x, chunk)
        A = y.T @ y2 if A is None else A + y.T @ y2
        B = y2.T @ y2 if B is None else B + y2.T @ y2
    eye = torch.eye(B.shape[0], dtype=B.dtype)
    lam = ridge * torch.trace(B) / B.shape[0]
    wo = new.o_proj.weight.double()
    with single_thread():
        w_new = torch.linalg.solve(B + lam * eye, (wo @ (A + lam * eye)).T).T  # B, λI symmetric
    new.o_proj.weight.copy_(w_new.to(new.o_proj.weight.dtype))


def calibration_steps(spec: MLASpec, cfg: MethodConfig) -> int:
    """How many calibration-pass layer steps ``convert_model_with`` reports (for a progress bar)."""
    return 0 if cfg.is_paper else max(spec.converted_layers) + 1


def _budget_rank(spec: MLASpec) -> int:
    """The average rank the budget keeps: the spec's rank before budgeting (recorded once)."""
    if "budget_rank" not in spec.options:
        ranks = [spec.kv_ranks[i] for i in spec.converted_layers]
        spec.options["budget_rank"] = round(sum(ranks) / len(ranks))
    return spec.options["budget_rank"]
