"""The MLA spec of an init-svd run: which layers, which ranks (fixed, or per layer from the SVD
energy rule), the RoPE dims; one clear error for each impossible option."""

from __future__ import annotations

import torch

from ..errors import XecomlaError
from ..mla.spec import MLASpec, attention_shape
from .common import rank_for_energy
from .methods import parse_method


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
        parse_method(method)  # one clear error for an unknown method
    ranks: list[int | None] = [None] * L
    for i in layers:
        ranks[i] = kv_rank if kv_rank is not None else rank_for_energy(singular_values[i], energy)
    options = {"kv_svd_rows": kv_rows}
    if energy is not None:
        options["energy"] = energy
    spec = MLASpec(
        **shape, rope_dim=p, kv_ranks=ranks, q_rank=q_rank, latent_norm=latent_norm, method=method, options=options
    )
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
