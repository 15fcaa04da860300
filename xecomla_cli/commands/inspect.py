"""`xecomla inspect`: architecture, KV cache size and the latent-rank budget table of a model."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import console, tables
from ..errors import XecomlaError
from ..inspection import inspect as inspect_model
from ..inspection import inspect_source
from .args import AllowPickleOpt, JsonOpt, RopeDimOpt, SourceArg, parse_ints, read_arg
from .display import emit, load


def inspect_command(
    source: SourceArg,
    ranks: Annotated[str | None, typer.Option("--ranks", help="Candidate latent ranks, e.g. '64,128,256'.")] = None,
    rope_dim: RopeDimOpt = None,
    context: Annotated[int, typer.Option("--context", help="Context length for the GB column.")] = 8192,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for the GB column.")] = 1,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the SVD energy of every layer.")] = False,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Architecture, KV cache size and the latent-rank budget table of a model."""
    rank_list = parse_ints(ranks, "--ranks") if ranks else None
    if context < 1 or batch < 1:
        raise XecomlaError("--context and --batch must be at least 1")
    source = read_arg(source)
    options = dict(ranks=rank_list, rope_dim=rope_dim, context=context, batch=batch)
    with console.status("SVD of every layer's stacked K/V, one layer at a time"):
        report = inspect_source(source, allow_pickle=allow_pickle, **options)
    if report is None:  # pickle weights, or a GGUF whose cache could not be written: in memory
        loaded = load(source, allow_pickle=allow_pickle)
        with console.status("SVD of every layer's stacked K/V"):
            report = inspect_model(loaded, **options)
    console.err.print(tables.architecture_table(report))
    console.err.print(tables.budget_table(report, per_layer))
    console.err.print(tables.energy_rank_table(report))
    console.err.print(tables.engines_by_rank_table(report))
    if as_json:
        emit(report)
