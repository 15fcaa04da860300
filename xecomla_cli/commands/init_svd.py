"""`xecomla init-svd`: convert a model's attention to MLA with the X-EcoMLA SVD initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..choices import DEFAULT_CALIB_DATA, DEFAULT_METHOD, AttentionBias, KvSvdRows, RopeFrequencies
from ..errors import XecomlaError
from .args import AllowPickleOpt, DeviceOpt, ForceOpt, RopeDimOpt, SourceArg, read_arg
from .display import emit, progress_bars

METHOD_HELP = (
    f"a preset ({DEFAULT_METHOD}, the default and the best after training; mha2mla, best, deepseek), "
    "'paper' (the X-EcoMLA paper's data-free SVD) or components joined by '+' (qk-pairs, rot-pairs, "
    "fast-pairs, uniform-pairs, rorope, complex, group-rope, freqfold[-N], drop, whiten, bkv, budget, wide, "
    "wide0, refit). group-rope: one RoPE key slice per KV group (--rope-dim is then the slices' total). "
    "See docs/reference/init-methods.md."
)


def check_method(value: str) -> str:
    """--method is checked while parsing: a preset, 'paper' or known components joined by '+'."""
    from ..init.methods import parse_method

    try:
        parse_method(value)
    except XecomlaError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def init_svd_command(
    source: SourceArg,
    kv_rank: Annotated[int | None, typer.Option("--kv-rank", help="Latent rank r of every converted layer.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy", help="Per-layer rank: smallest keeping this fraction of the stacked K/V SVD energy (e.g. 0.95)."
        ),
    ] = None,
    latent_width: Annotated[
        str | None,
        typer.Option(
            "--latent-width",
            help="Cached values per token per layer r + p instead of --kv-rank (r = W - p); 'vllm': 576, the width "
            "every vLLM MLA backend takes (r 512 + p 64 where the head dim allows). Refused where it would not "
            "save memory.",
        ),
    ] = None,
    q_rank: Annotated[
        int | None, typer.Option("--q-rank", help="Low-rank queries of this rank (saves parameters, not cache).")
    ] = None,
    rope_dim: RopeDimOpt = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers to convert, e.g. '0-11,20' (default: all).")
    ] = None,
    latent_norm: Annotated[
        bool,
        typer.Option(
            "--latent-norm/--no-latent-norm",
            help="RMSNorm on the latent, as DeepSeek-V3 and every engine that runs it (default), initialised with "
            "a norm channel fitted on the calibration text; --no-latent-norm: the paper's un-normed latent, "
            "which export emulates with attention biases that only transformers reads.",
        ),
    ] = True,
    kv_svd_rows: Annotated[
        KvSvdRows,
        typer.Option(
            "--kv-svd-rows",
            help="'all' (paper: SVD of all K and V rows) or 'nope-v' (only the rows that are kept).",
        ),
    ] = KvSvdRows.ALL,
    method: Annotated[str, typer.Option("--method", help=METHOD_HELP, callback=check_method)] = DEFAULT_METHOD,
    calib_data: Annotated[
        str | None,
        typer.Option(
            "--calib-data",
            help="Calibration text for data-aware methods and the latent norm: 'teacher' (text the model "
            "samples itself, cached), 'shakespeare' (a slice of the bundled public-domain plays), or a .txt, "
            ".jsonl file or a directory; sources joined by '+' share the tokens evenly (teacher+shakespeare) "
            f"(default: {DEFAULT_CALIB_DATA}).",
        ),
    ] = None,
    rope_frequencies: Annotated[
        RopeFrequencies,
        typer.Option(
            "--rope-frequencies",
            help="A source with scaled RoPE (Llama 3.x): 'default' (the MLA's RoPE dims turn as default RoPE and the "
            "pairs the scaling slows lose RoPE: llama.cpp, vLLM and SGLang read it exactly) or 'source' (its own "
            "scaled frequencies: exact in transformers only). No effect on an unscaled source.",
        ),
    ] = RopeFrequencies.DEFAULT,
    rope_span: Annotated[
        int | None,
        typer.Option(
            "--rope-span",
            help="--method transmla: fold only the K fastest frequency pairs into the RoPE dims (a multiple of p/2); "
            "the slower ones keep no RoPE (default: all pairs; for a scaled RoPE the unscaled ones).",
        ),
    ] = None,
    attention_bias: Annotated[
        AttentionBias,
        typer.Option(
            "--attention-bias",
            help="A source with q/k/v biases (Qwen2.x): 'fold' them into the weights (the no-RoPE key bias dropped "
            "exactly, the rest approximately; every engine then loads the export) or 'keep' them exactly "
            "(xecomla and --format xecomla only). No effect without biases.",
        ),
    ] = AttentionBias.FOLD,
    calib_tokens: Annotated[
        int, typer.Option("--calib-tokens", help="Calibration tokens for data-aware methods and the latent norm.")
    ] = 8192,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output checkpoint directory (default: runs/<source>-mla-<rank>)."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="The checkpoint's dtype: auto (the source's: bf16 in, bf16 out; the math is fp32 per layer), float32, "
            "bfloat16 or float16.",
        ),
    ] = "auto",
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Convert a model's attention to MLA with the X-EcoMLA SVD initialisation."""
    from .. import tables
    from ..checkpoint import read_meta
    from ..init.run import InitOptions, run_init
    from ..mla.spec import MLASpec

    opts = InitOptions(
        kv_rank=kv_rank,
        energy=energy,
        latent_width=latent_width,
        q_rank=q_rank,
        rope_dim=rope_dim,
        layers=layers,
        latent_norm=latent_norm,
        kv_svd_rows=kv_svd_rows.value,
        method=method,
        calib_data=calib_data,
        calib_tokens=calib_tokens,
        rope_frequencies=rope_frequencies.value,
        rope_span=rope_span,
        attention_bias=attention_bias.value,
        output=output,
        dtype=dtype,
        device=device,
        force=force,
        allow_pickle=allow_pickle,
    )
    source = read_arg(source)
    with progress_bars() as bar:
        path = run_init(source, opts, progress=bar, status=console.status)
    meta = read_meta(path)
    console.err.print(tables.spec_table(MLASpec.from_dict(meta["mla"]), f"init-svd: {source} -> {path}"))
    console.log(f"[green]wrote[/] {path} in {meta['metrics']['init_seconds']:.1f} s")
    emit(path)
