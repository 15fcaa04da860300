"""The `xecomla` command line: each command parses options, calls one module, prints the result.

stdout carries only results (an output directory, or JSON with --json) so stages chain in
pipes; progress, tables and logs go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console
from .errors import XecomlaError

app = typer.Typer(
    name="xecomla",
    help="Upcycle a pretrained LLM's attention into multi-head latent attention (X-EcoMLA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}

SourceArg = Annotated[str, typer.Argument(help="'demo', a Hub id, a local HF directory, a .gguf file, a checkpoint, or '-' (read from stdin).")]
CkptArg = Annotated[str, typer.Argument(help="A stage checkpoint directory, or '-' (read the path from stdin).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]


@app.callback()
def _global(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, tables or logs on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    console.set_quiet(quiet)
    _state["debug"] = debug
    _quiet_libraries(quiet)


def _quiet_libraries(quiet: bool) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # read when tqdm is imported: e.g. transformers' GGUF loader uses tqdm directly
        os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def read_arg(value: str) -> str:
    """'-' means: the path is the last non-empty line on stdin (the previous stage's output)."""
    if value != "-":
        return value
    if sys.stdin.isatty():
        raise XecomlaError("'-' reads the input path from stdin, but nothing was piped in")
    lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not lines:
        raise XecomlaError("'-' reads the input path from stdin, but stdin was empty: did the previous stage fail?")
    return lines[-1]


def emit(result) -> None:
    """Write a result to stdout: a path as one line, anything else as JSON."""
    if isinstance(result, (str, Path)):
        print(str(result), flush=True)
    else:
        print(json.dumps(result, indent=2, default=str), flush=True)


def load(source: str, dtype: str = "float32", device: str = "cpu"):
    from .sources import load_model

    with console.status(f"loading {source}"):
        return load_model(source, dtype=dtype, device=device)


# ---- inspect ------------------------------------------------------------------------------
@app.command()
def inspect(
    source: SourceArg,
    ranks: Annotated[Optional[str], typer.Option("--ranks", help="Candidate latent ranks, e.g. '64,128,256'.")] = None,
    rope_dim: Annotated[Optional[int], typer.Option("--rope-dim", help="Decoupled RoPE dims p (default: half the head dim).")] = None,
    context: Annotated[int, typer.Option("--context", help="Context length for the GB column.")] = 8192,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for the GB column.")] = 1,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show the SVD energy of every layer.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Architecture, KV cache size and the latent-rank budget table of a model."""
    from . import tables
    from .inspect_model import inspect as run_inspect

    rank_list = _parse_ints(ranks, "--ranks") if ranks else None
    if context < 1 or batch < 1:
        raise XecomlaError("--context and --batch must be at least 1")
    loaded = load(read_arg(source))
    with console.status("SVD of every layer's stacked K/V"):
        report = run_inspect(loaded, ranks=rank_list, rope_dim=rope_dim, context=context, batch=batch)
    console.err.print(tables.architecture_table(report))
    console.err.print(tables.budget_table(report, per_layer))
    console.err.print(tables.energy_rank_table(report))
    if as_json:
        emit(report)


# ---- init-svd -----------------------------------------------------------------------------
@app.command("init-svd")
def init_svd(
    source: SourceArg,
    kv_rank: Annotated[Optional[int], typer.Option("--kv-rank", help="Latent rank r of every converted layer.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="Per-layer rank: smallest keeping this fraction of the stacked K/V SVD energy (e.g. 0.95).")] = None,
    q_rank: Annotated[Optional[int], typer.Option("--q-rank", help="Low-rank queries of this rank (saves parameters, not cache).")] = None,
    rope_dim: Annotated[Optional[int], typer.Option("--rope-dim", help="Decoupled RoPE dims p (default: half the head dim).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Layers to convert, e.g. '0-11,20' (default: all).")] = None,
    latent_norm: Annotated[bool, typer.Option("--latent-norm", help="RMSNorm on the latent (as DeepSeek-V3).")] = False,
    kv_svd_rows: Annotated[str, typer.Option("--kv-svd-rows", help="'all' (paper: SVD of all K and V rows) or 'nope-v' (only the rows that are kept).")] = "all",
    method: Annotated[str, typer.Option("--method", help="'paper' (default, data-free), a preset (mha2mla, rorope, complex, whiten, best, deepseek) or components joined by '+' (qk-pairs, rot-pairs, fast-pairs, rorope, complex, drop, whiten, budget, refit).")] = "paper",
    calib_data: Annotated[Optional[Path], typer.Option("--calib-data", help="Calibration text for data-aware methods: .txt, .jsonl or a directory (default: a slice of the bundled public-domain Shakespeare).")] = None,
    calib_tokens: Annotated[int, typer.Option("--calib-tokens", help="Calibration tokens for data-aware methods.")] = 8192,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output checkpoint directory (default: runs/<source>-mla-<rank>).")] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Convert a model's attention to MLA with the X-EcoMLA SVD initialisation."""
    from . import tables
    from .checkpoint import save_checkpoint
    from .svd_init import KV_SVD_ROWS, build_spec, convert_model, layer_singular_values, parse_layers

    if kv_svd_rows not in KV_SVD_ROWS:
        raise XecomlaError(f"--kv-svd-rows must be one of {', '.join(KV_SVD_ROWS)}")
    if (kv_rank is None) == (energy is None):
        raise XecomlaError("give exactly one of --kv-rank R or --energy δ")
    from .init_methods import calibration_steps, parse_method

    cfg = parse_method(method)
    if cfg.is_paper and calib_data is not None:
        raise XecomlaError("--calib-data is only used by a data-aware --method (e.g. --method best): the paper init is data-free")
    if cfg.budget and kv_rank is None:
        raise XecomlaError("--method ...+budget spreads a total of layers x --kv-rank: give --kv-rank, not --energy")
    if not cfg.is_paper:
        kv_svd_rows = "nope-v"  # the data-aware latent is fitted on the kept rows only
    method = "paper" if cfg.is_paper else method
    source = read_arg(source)
    start = time.perf_counter()
    loaded = load(source, dtype="float32", device=device)
    model = loaded.model
    if loaded.is_mla:
        raise XecomlaError(f"'{source}' is already an MLA checkpoint: init-svd takes an original model")
    layer_list = parse_layers(layers, model.config.num_hidden_layers)
    sv = layer_singular_values(model) if energy is not None else None
    spec = build_spec(model.config, kv_rank=kv_rank, energy=energy, rope_dim=rope_dim, q_rank=q_rank,
                      layers=layer_list, latent_norm=latent_norm, method=method, kv_rows=kv_svd_rows,
                      singular_values=sv)  # fmt: skip
    calib_ids = None
    if not cfg.is_paper:
        from .calibration import calibration_ids

        calib_ids = calibration_ids(loaded.tokenizer, calib_data, calib_tokens)
        spec.options["calibration"] = {"data": str(calib_data) if calib_data else "shakespeare", "tokens": calib_ids.numel()}
    out = output or Path("runs") / f"{_slug(source)}-mla-{f'r{kv_rank}' if kv_rank else f'e{energy:g}'}{'' if cfg.is_paper else '-' + method.replace('+', '-')}"
    with console.make_progress() as progress:
        task = progress.add_task("SVD init" if cfg.is_paper else f"{method} init",
                                 total=len(spec.converted_layers) + calibration_steps(spec, cfg))  # fmt: skip
        convert_model(model, spec, method=method, calib_ids=calib_ids, progress=lambda i: progress.advance(task))
    from .sources import parse_dtype

    if dtype != "float32":
        model.to(parse_dtype(dtype))
    seconds = time.perf_counter() - start
    path = save_checkpoint(out, model=model, tokenizer=loaded.tokenizer, stage="init-svd", spec=spec,
                           source=loaded.source, parent=None, metrics={"init_seconds": round(seconds, 2)},
                           force=force)  # fmt: skip
    console.err.print(tables.spec_table(spec, f"init-svd: {source} -> {path}"))
    console.log(f"[green]wrote[/] {path} in {seconds:.1f} s")
    emit(path)


# ---- helpers ------------------------------------------------------------------------------
def _parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise XecomlaError(f"{name} '{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise XecomlaError(f"{name} '{text}' must list positive integers")
    return values


def _slug(source: str) -> str:
    name = Path(source.rstrip("/")).name or source
    for suffix in (".gguf",):
        name = name.removesuffix(suffix)
    return name.replace("/", "-")


# ---- other stages register here -----------------------------------------------------------
from .commands import register_all  # noqa: E402

register_all(app)


def _errors():
    """Errors are printed even under --quiet (which silences only progress and tables)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def main() -> None:
    """Console-script entry: one line per error, non-zero exit, traceback only with --debug."""
    import click

    try:
        app(standalone_mode=False)
    except XecomlaError as exc:
        if _state["debug"]:
            raise
        _errors().print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        console.err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if _state["debug"]:
            raise
        _errors().print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (re-run with --debug for the traceback)")
        sys.exit(1)
