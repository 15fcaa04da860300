"""The MLA spec of an init-svd run: which layers, which ranks (fixed, or per layer from the SVD
energy rule), the RoPE dims; one clear error for each impossible option."""

from __future__ import annotations

import torch

from ..errors import XecomlaError
from ..mla.kv_spectrum import rank_for_energy
from ..mla.rope import rope_type, unscaled_pairs
from ..mla.spec import MLASpec, attention_shape, source_biases
from .engine_ready import default_rope_span
from .methods import parse_method

ROPE_FREQUENCIES = ("default", "source")  # --rope-frequencies
ATTENTION_BIAS = ("fold", "keep")  # --attention-bias


def max_kv_rank(spec: MLASpec) -> int:
    """The largest useful latent rank: the paper's stacked matrix has 2·H·h rows and d columns."""
    return min(2 * spec.num_heads * spec.head_dim, spec.hidden_size)


def validate_spec(spec: MLASpec) -> None:
    """One clear error for each impossible option."""
    h, p, S, G = spec.head_dim, spec.rope_dim, spec.rope_groups, spec.num_kv_heads
    if S < 1 or G % S:
        raise XecomlaError(f"{S} RoPE key slices do not divide the {G} KV heads: use one per KV group, or one key")
    if spec.rope_span is not None:
        if parse_method(spec.method).freqfold is None:
            raise XecomlaError(
                "--rope-span K is TransMLA's fold over the K fastest pairs: use it with --method transmla"
            )
        if p <= 0 or p % 2 or spec.rope_span % (p // 2) or not p // 2 <= spec.rope_span <= h // 2:
            raise XecomlaError(
                f"--rope-span {spec.rope_span} must be a multiple of p/2 = {p // 2} between p/2 and h/2 = {h // 2}"
            )
    elif spec.qk_nope_dim is not None and parse_method(spec.method).freqfold is not None:
        # TransMLA: n = h, RoPE on p = h/c rotated channels
        if p <= 0 or p % 2 or h % p or (h // 2) % (h // p):
            raise XecomlaError(
                f"--rope-dim {p} is invalid for --method transmla: it must divide the head dim {h} "
                f"(p = h/c with c dividing h/2), e.g. {h // 2} or {h // 4}"
            )
    elif S > 1:
        if p <= 0 or p % (2 * S) or p // S > h:
            raise XecomlaError(
                f"--rope-dim {p} is invalid with group-rope: it must be a positive multiple of 2·{S} = {2 * S} "
                f"(one slice of whole pairs per KV group) and at most {S}·{h}, e.g. {rope_dim_default(h, S)}"
            )
    elif p <= 0 or p % 2 or p >= h:
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


def rope_dim_default(head_dim: int, slices: int) -> int:
    """The default p: h/2 for one shared key; with S slices the largest multiple of 2S up to h/2."""
    return head_dim // 2 // (2 * slices) * (2 * slices) or 2 * slices


def validate_fold(fold: int, head_dim: int, rope_dim: int, span: int | None = None) -> None:
    """freqfold-N: N must be a multiple of the collapse c = 2K/p and divide the span K (h/2 by default)."""
    K = span or head_dim // 2
    c = 2 * K // rope_dim
    if fold % c or K % fold:
        raise XecomlaError(
            f"--method freqfold-{fold}: the fold must be a multiple of 2K/p = {c} that divides K = {K} pairs "
            f"(e.g. freqfold-{2 * c if K % (2 * c) == 0 else c}), or plain freqfold to search it"
        )


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
    rope_frequencies: str | None = None,
    rope_span: int | None = None,
    attention_bias: str | None = None,
) -> MLASpec:
    """The spec for an init-svd run: fixed rank, or per-layer ranks from the energy rule.

    The method shapes the attention: ``group-rope`` splits the RoPE key into one slice per KV group,
    ``freqfold`` (TransMLA) keeps all h query/key dims without RoPE (n = h).

    What the engines read (``init.engine_ready``): a source with scaled RoPE gets default RoPE
    frequencies unless ``rope_frequencies`` is "source" (with TransMLA's fold over the fastest
    ``rope_span`` pairs, by default the unscaled ones); a source with q/k/v biases has them folded
    when ``attention_bias`` is "fold" (init-svd's default; it needs calibration data), else kept."""
    shape = attention_shape(config)
    cfg = parse_method(method)  # one clear error for an unknown method
    slices = shape["num_kv_heads"] if cfg.group_rope else 1
    p = rope_dim if rope_dim is not None else rope_dim_default(shape["head_dim"], slices)
    L = shape["num_layers"]
    layers = list(range(L)) if layers is None else layers
    if (kv_rank is None) == (energy is None):
        raise XecomlaError("give exactly one of --kv-rank R or --energy δ")
    if energy is not None and not 0 < energy <= 1:
        raise XecomlaError(f"--energy {energy} is outside (0, 1]: e.g. --energy 0.95")
    ranks: list[int | None] = [None] * L
    for i in layers:
        ranks[i] = kv_rank if kv_rank is not None else rank_for_energy(singular_values[i], energy)
    spec = MLASpec(
        **shape,
        rope_dim=p,
        kv_ranks=ranks,
        q_rank=q_rank,
        latent_norm=latent_norm,
        method=method,
        kv_svd_rows=kv_rows,
        energy=energy,
        rope_groups=slices,
        qk_nope_dim=shape["head_dim"] if cfg.freqfold is not None or cfg.wide else None,
        **engine_choices(config, cfg.freqfold is not None, p, q_rank, rope_frequencies, rope_span, attention_bias),
    )
    validate_spec(spec)
    if cfg.freqfold:
        validate_fold(cfg.freqfold, spec.head_dim, spec.rope_dim, spec.rope_span)
    return spec


def engine_choices(
    config,
    folds: bool,
    rope_dim: int,
    q_rank: int | None,
    rope_frequencies: str | None,
    rope_span: int | None,
    attention_bias: str | None,
) -> dict:
    """The spec's RoPE frequencies, span and bias treatment (``init.engine_ready``), one line per bad choice."""
    if rope_frequencies not in (None, *ROPE_FREQUENCIES):
        raise XecomlaError(f"--rope-frequencies '{rope_frequencies}': use {' or '.join(ROPE_FREQUENCIES)}")
    if attention_bias not in (None, *ATTENTION_BIAS):
        raise XecomlaError(f"--attention-bias '{attention_bias}': use {' or '.join(ATTENTION_BIAS)}")
    h = attention_shape(config)["head_dim"]
    scaled = rope_type(config) != "default"
    frequencies = "default" if scaled and rope_frequencies != "source" else None
    if rope_span is None and frequencies == "default" and folds:
        rope_span = default_rope_span(unscaled_pairs(config, h), h, rope_dim)
    elif rope_span == h // 2:
        rope_span = None
    qkv_bias, o_bias = source_biases(config)
    bias = None
    if qkv_bias:  # the library keeps them unless asked (folding needs calibration data); init-svd asks
        bias = "folded" if attention_bias == "fold" else "kept"
        if bias == "folded" and o_bias:
            raise XecomlaError(
                "the attention output has a bias, which no engine loads and which cannot be folded: "
                "--attention-bias keep (xecomla and --format xecomla only)"
            )
        if bias == "folded" and q_rank is not None:
            raise XecomlaError("--q-rank with --attention-bias fold cannot fold the query bias: drop --q-rank")
    return {"rope_frequencies": frequencies, "rope_span": rope_span, "attention_bias": bias}


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
