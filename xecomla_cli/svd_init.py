"""X-EcoMLA initialisation: MLA weights from an SVD of the pretrained attention projections.

Shapes (per layer): d hidden, H query heads, G KV heads, h head dim, p RoPE dims, n = h - p,
r latent rank. Weight matrices are (out, in) as in ``nn.Linear``.

Paper default (``method="paper"``, as the official code does it):
  * KV latent: repeat each KV head's rows of W_k and W_v to all H query heads, stack
    M = [W_k; W_v] (2·H·h, d), SVD M = U S Vᵀ. Down projection W_dkv = S_r V_rᵀ (r, d); up
    projection from U_r: per head the rows of the n no-RoPE K dims and all h V rows.
  * RoPE: the last p dims of every head carry RoPE, re-rotated by a fresh p-dim rotary
    embedding with the model's rope settings; the shared RoPE key is the mean over KV heads of
    those rows of W_k.
  * Queries: per head [n no-RoPE dims | p RoPE dims] (the original order); with ``q_rank`` the
    query projection is factored by SVD as well.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import XecomlaError
from .mla.attention import MLAAttention
from .mla.convert import decoder_layers, has_o_bias, has_qkv_bias, new_mla_attention
from .mla.rope import model_inv_freq
from .mla.spec import MLASpec, attention_shape

METHODS = ("paper", "mha2mla", "rorope", "complex", "whiten", "best")  # presets; see init_methods
KV_SVD_ROWS = ("all", "nope-v")


@dataclass
class AttentionWeights:
    """A layer's original attention weights in fp32 (biases None when absent)."""

    wq: torch.Tensor  # (H·h, d)
    wk: torch.Tensor  # (G·h, d)
    wv: torch.Tensor  # (G·h, d)
    wo: torch.Tensor  # (d, H·h)
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None

    @classmethod
    def of(cls, attn) -> AttentionWeights:
        def f(t):
            return None if t is None else t.detach().float().cpu()

        return cls(
            f(attn.q_proj.weight), f(attn.k_proj.weight), f(attn.v_proj.weight), f(attn.o_proj.weight),
            f(attn.q_proj.bias), f(attn.k_proj.bias), f(attn.v_proj.bias), f(attn.o_proj.bias),
        )  # fmt: skip


@dataclass
class RopePlan:
    """Which of each head's h dims carry RoPE in MLA, and at which frequencies.

    ``rope_idx`` (p,) lists the original dims that become the RoPE dims, in rotate-half order
    (dim j pairs with dim j + p/2); ``nope_idx`` (n,) the rest; ``inv_freq`` (p/2,).
    ``drop`` (n,) bool, optional: no-RoPE dims whose query·key term is dropped (``init_methods``).
    """

    rope_idx: torch.Tensor
    nope_idx: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    drop: torch.Tensor | None = None


def paper_rope_plan(config, head_dim: int, rope_dim: int) -> RopePlan:
    """The last p dims of each head, re-rotated by a fresh p-dim rotary embedding."""
    n = head_dim - rope_dim
    inv_freq, scaling = model_inv_freq(config, rope_dim)
    return RopePlan(torch.arange(n, head_dim), torch.arange(n), inv_freq, scaling)


@contextlib.contextmanager
def single_thread():
    """Run small LAPACK calls on one thread: these matrices gain nothing from threads, and OpenMP
    threads spinning against other busy processes made an SVD 30x slower on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def truncated_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (rows, r), S_r (r,), V_rᵀ (r, cols) of a matrix, computed in fp32."""
    with single_thread():
        u, s, vt = torch.linalg.svd(m.detach().float(), full_matrices=False)
    return u[:, :rank].float(), s[:rank].float(), vt[:rank].float()


def _pad_rank(u, s, vt, rank: int):
    """Zero-pad truncated SVD factors to `rank` components (zero singular values)."""
    extra = rank - s.numel()
    if extra <= 0:
        return u, s, vt
    return (torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([s, s.new_zeros(extra)]),
            torch.cat([vt, vt.new_zeros(extra, vt.shape[1])]))  # fmt: skip


def repeat_heads(w: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """(G·h, …) -> (H, h, …): KV head g serves query heads g·H/G … (g+1)·H/G − 1 (HF repeat_kv)."""
    w = w.view(num_kv_heads, -1, *w.shape[1:])
    return w.repeat_interleave(num_heads // num_kv_heads, dim=0)


def kv_stack(w: AttentionWeights, H: int, G: int, plan: RopePlan, rows: str = "all") -> torch.Tensor:
    """The matrix whose SVD gives the latent: paper [K; V] of all heads, or [K_nope; V]."""
    wk = repeat_heads(w.wk, G, H)  # (H, h, d)
    wv = repeat_heads(w.wv, G, H)  # (H, h, d)
    if rows == "nope-v":
        wk = wk[:, plan.nope_idx]
    return torch.cat([wk.reshape(-1, wk.shape[-1]), wv.reshape(-1, wv.shape[-1])])


def stacked_kv_singular_values(wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """Singular values of [W_k; W_v]. Repeating KV heads to all query heads scales them all by
    sqrt(H/G), so this gives the same energy fractions as the paper's repeated stack."""
    with single_thread():
        return torch.linalg.svdvals(torch.cat([wk, wv]).detach().float())


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of squared singular values kept at rank 1, 2, …"""
    e = (s.double() ** 2).cumsum(0)
    return (e / e[-1]).float()


def rank_for_energy(s: torch.Tensor, delta: float, multiple: int = 8) -> int:
    """Smallest rank whose energy reaches δ, rounded up to a multiple of 8 (capped at len(s))."""
    curve = energy_curve(s)
    r = int(torch.searchsorted(curve, torch.tensor(delta - 1e-7)).item()) + 1
    r = -(-r // multiple) * multiple
    return min(r, s.numel())


def mla_state_dict(
    w: AttentionWeights, spec: MLASpec, layer: int, plan: RopePlan, kv_rows: str = "all"
) -> dict[str, torch.Tensor]:
    """The paper's MLA weights of one layer, as an ``MLAAttention`` state dict (fp32)."""
    H, G, h, p = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
    n, r, d = h - p, spec.kv_ranks[layer], spec.hidden_size
    order = torch.cat([plan.nope_idx, plan.rope_idx])  # per-head dim order [nope | rope]
    sd: dict[str, torch.Tensor] = {}

    # Queries: per head [q_nope | q_rope], optionally factored by SVD.
    wq = w.wq.view(H, h, d)[:, order].reshape(H * h, d)
    if spec.q_rank is None:
        sd["q_proj.weight"] = wq
    else:
        u, s, vt = truncated_svd(wq, spec.q_rank)
        sd["q_a_proj.weight"] = s[:, None] * vt
        sd["q_b_proj.weight"] = u
    if w.bq is not None:
        key = "q_proj.bias" if spec.q_rank is None else "q_b_proj.bias"
        sd[key] = w.bq.view(H, h)[:, order].reshape(-1)

    # KV latent: SVD of the stacked K/V rows; keep K-nope and V rows of U_r.
    # The paper's stack repeats each KV head's rows H/G times. Its SVD follows from the SVD of the
    # unrepeated (G-head) stack, H/G times cheaper: same V, S·sqrt(H/G), rows of U repeated / sqrt(H/G).
    g = H // G
    u, s, vt = truncated_svd(kv_stack(w, G, G, plan, kv_rows), r)
    u, s, vt = _pad_rank(u, s, vt, r)  # ranks above the stack's true rank 2·G·h get zero rows
    w_dkv = (s * g**0.5)[:, None] * vt  # (r, d)
    k_rows = n if kv_rows == "nope-v" else h
    u_k = repeat_heads(u[: G * k_rows], G, H) / g**0.5  # (H, k_rows, r)
    if kv_rows == "all":
        u_k = u_k[:, plan.nope_idx]
    u_v = repeat_heads(u[G * k_rows :], G, H) / g**0.5  # (H, h, r)
    sd["kv_b_proj.weight"] = torch.cat([u_k, u_v], dim=1).reshape(H * (n + h), r)

    # Shared RoPE key: the mean over KV heads of the RoPE rows of W_k.
    w_krope = w.wk.view(G, h, d)[:, plan.rope_idx].mean(0)  # (p, d)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([w_dkv, w_krope])
    if w.bk is not None:
        bk = repeat_heads(w.bk, G, H)  # (H, h)
        bv = repeat_heads(w.bv, G, H)
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), w.bk.view(G, h)[:, plan.rope_idx].mean(0)])
        sd["kv_b_proj.bias"] = torch.cat([bk[:, plan.nope_idx], bv], dim=1).reshape(-1)
    if spec.latent_norm:
        sd["kv_a_layernorm.weight"] = torch.ones(r)
    sd["o_proj.weight"] = w.wo
    if w.bo is not None:
        sd["o_proj.bias"] = w.bo
    sd["rope_inv_freq"] = plan.inv_freq.float()
    return sd


def max_kv_rank(spec: MLASpec) -> int:
    """The largest useful latent rank: the paper's stacked matrix has 2·H·h rows and d columns."""
    return min(2 * spec.num_heads * spec.head_dim, spec.hidden_size)


def validate_spec(spec: MLASpec) -> None:
    """One clear error for each impossible option."""
    h, p = spec.head_dim, spec.rope_dim
    if p <= 0 or p % 2 or p >= h:
        raise XecomlaError(f"--rope-dim {p} is invalid: it must be even, positive and below the head dim {h}")
    if not spec.converted_layers:
        raise XecomlaError("no layer to convert: --layers selected none")
    top = max_kv_rank(spec)
    for i in spec.converted_layers:
        r = spec.kv_ranks[i]
        if r < 1 or r > top:
            raise XecomlaError(
                f"--kv-rank {r} (layer {i}) is outside 1..{top}: the stacked K/V matrix "
                f"(2·H·h = {2 * spec.num_heads * h} rows, d = {spec.hidden_size} columns) has rank at most {top}"
            )
    if spec.q_rank is not None and not 1 <= spec.q_rank <= min(spec.num_heads * h, spec.hidden_size):
        raise XecomlaError(
            f"--q-rank {spec.q_rank} is outside 1..{min(spec.num_heads * h, spec.hidden_size)} for this model"
        )


def convert_layer(
    model, spec: MLASpec, layer: int, method: str = "paper", kv_rows: str = "all", stats=None
) -> MLAAttention:
    """Build the MLA attention of one layer from the model's original attention.

    ``method`` other than "paper" goes to ``init_methods`` (``stats``: the layer's calibration
    ``LayerStats``, needed by the data-aware methods)."""
    if method != "paper":
        from .init_methods import convert_layer_with, parse_method

        return convert_layer_with(model, spec, layer, parse_method(method), stats)
    old = decoder_layers(model)[layer].self_attn
    w = AttentionWeights.of(old)
    plan = paper_rope_plan(model.config, spec.head_dim, spec.rope_dim)
    new = new_mla_attention(model.config, spec, layer, has_qkv_bias(old), has_o_bias(old))
    new.load_state_dict(mla_state_dict(w, spec, layer, plan, kv_rows))
    new.rope_attention_scaling = plan.attention_scaling
    spec.options["rope_attention_scaling"] = plan.attention_scaling
    new.train(old.training)
    return new.to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype)


def build_spec(
    config,
    *,
    kv_rank: int | None = None,
    energy: float | None = None,
    rope_dim: int | None = None,
    q_rank: int | None = None,
    layers: list[int] | None = None,
    latent_norm: bool = False,
    method: str = "paper",
    kv_rows: str = "all",
    singular_values: dict[int, torch.Tensor] | None = None,
) -> MLASpec:
    """The spec for an init-svd run: fixed rank, or per-layer ranks from the energy rule."""
    shape = attention_shape(config)
    p = rope_dim if rope_dim is not None else shape["head_dim"] // 2
    L = shape["num_layers"]
    layers = list(range(L)) if layers is None else layers
    if (kv_rank is None) == (energy is None):
        raise XecomlaError("give exactly one of --kv-rank R or --energy δ")
    if energy is not None and not 0 < energy <= 1:
        raise XecomlaError(f"--energy {energy} is outside (0, 1]: e.g. --energy 0.95")
    if method != "paper":
        from .init_methods import parse_method

        parse_method(method)  # one clear error for an unknown method
    ranks: list[int | None] = [None] * L
    for i in layers:
        ranks[i] = kv_rank if kv_rank is not None else rank_for_energy(singular_values[i], energy)
    options = {"kv_svd_rows": kv_rows}
    if energy is not None:
        options["energy"] = energy
    spec = MLASpec(**shape, rope_dim=p, kv_ranks=ranks, q_rank=q_rank, latent_norm=latent_norm,
                   method=method, options=options)  # fmt: skip
    validate_spec(spec)
    return spec


def parse_layers(text: str | None, num_layers: int) -> list[int] | None:
    """'0-3,8,10' -> [0, 1, 2, 3, 8, 10]; None -> all layers."""
    if text is None or text.strip() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                out.update(range(a, b + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise XecomlaError(f"--layers '{text}' is not a list like '0-3,8,10'") from None
    bad = sorted(i for i in out if not 0 <= i < num_layers)
    if bad:
        raise XecomlaError(f"--layers {bad} out of range: the model has layers 0..{num_layers - 1}")
    if not out:
        raise XecomlaError("--layers selected no layer")
    return sorted(out)


def layer_singular_values(model) -> dict[int, torch.Tensor]:
    """Per layer, singular values of the stacked [W_k; W_v] (for energy-based ranks)."""
    return {
        i: stacked_kv_singular_values(layer.self_attn.k_proj.weight.float(), layer.self_attn.v_proj.weight.float())
        for i, layer in enumerate(decoder_layers(model))
    }


def convert_model(model, spec: MLASpec, method: str = "paper", progress=None, calib_ids=None) -> None:
    """Replace every converted layer's attention by its SVD-initialised MLA, in place.

    ``method`` other than "paper" (see ``init_methods``) calibrates on ``calib_ids`` (B, T);
    ``progress(i)`` is called after each converted layer (and after each calibrated layer)."""
    if method != "paper":
        from .init_methods import convert_model_with, parse_method

        tick = None if progress is None else (lambda phase, i: progress(i))
        convert_model_with(model, spec, parse_method(method), calib_ids, tick)
        return
    layers = decoder_layers(model)
    kv_rows = spec.options.get("kv_svd_rows", "all")
    for i in spec.converted_layers:
        layers[i].self_attn = convert_layer(model, spec, i, method, kv_rows)
        if progress is not None:
            progress(i)
