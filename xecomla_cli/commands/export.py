"""`xecomla export`: a stage checkpoint -> a Hugging Face model directory (DeepSeek-V3 layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..choices import ExportFormat
from ..errors import XecomlaError
from ..export.gguf_writer import OutType
from .args import CkptArg, ForceOpt, JsonOpt, read_arg
from .display import emit


def export_command(
    ckpt: CkptArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output directory (default: <checkpoint>-hf).")
    ] = None,
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="'hf': DeepSeek-V3 layout for stock transformers/vLLM; 'gguf': one llama.cpp file (deepseek2, or "
            "llama for an original model); 'xecomla': our own format (any checkpoint).",
        ),
    ] = ExportFormat.HF,
    outtype: Annotated[
        OutType, typer.Option("--outtype", help="--format gguf: weight type, as llama.cpp's converter names it.")
    ] = OutType.f16,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights dtype: auto (the checkpoint's), float32 or bfloat16.")
    ] = "auto",
    pad_ranks: Annotated[
        bool,
        typer.Option(
            "--pad-ranks",
            help="Pad per-layer latent ranks to the largest with zero channels (DeepSeek-V3 has one kv_lora_rank).",
        ),
    ] = False,
    latent_width: Annotated[
        int | None,
        typer.Option(
            "--latent-width",
            help="Pad so that kv_lora_rank + qk_rope_head_dim equals this (vLLM's MLA kernels take 320, 512 or 576).",
        ),
    ] = None,
    portable: Annotated[
        bool, typer.Option("--portable", help="Refuse exports that need attention biases (vLLM and SGLang drop them).")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="Load the export with stock transformers and compare logits before writing it."
        ),
    ] = True,
    push_to_hub: Annotated[
        str | None,
        typer.Option("--push-to-hub", help="Upload to this Hub repo (owner/name) with your login or HF_TOKEN."),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Hub branch to upload to (created if missing).")
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a checkpoint for stock transformers / vLLM (DeepSeek-V3 layout) with a model card."""
    from ..export import export_checkpoint
    from ..export import push_to_hub as push

    if (private or revision) and not push_to_hub:
        raise XecomlaError("--private and --revision apply to --push-to-hub REPO: add it, or drop them")
    if fmt == "gguf":
        _export_gguf(
            read_arg(ckpt), output, outtype, dtype, pad_ranks, latent_width, push_to_hub, verify, force, as_json
        )
        return
    path = Path(read_arg(ckpt))
    with console.status(f"exporting {path}"):
        result = export_checkpoint(
            path,
            output,
            fmt=fmt.value,
            dtype=dtype,
            pad_ranks=pad_ranks,
            portable=portable,
            latent_width=latent_width,
            verify=verify,
            force=force,
        )
    for line in result.summary_lines():
        console.log(line)
    if result.engines:
        from .. import tables

        where = "this export" if result.format == "hf" else "this checkpoint, once exported for each engine"
        console.err.print(tables.engines_table(result.engines, f"Where the saving holds ({where})"))
    console.log(f"[green]wrote[/] {result.path}")
    if push_to_hub:
        try:
            with console.status(f"uploading to {push_to_hub}"):
                result.hub_url = push(result.path, push_to_hub, private=private, revision=revision)
        except XecomlaError:
            emit(result.path)  # the export is written: the pipe gets its path, the exit status says the push failed
            raise
        console.log(f"[green]pushed[/] {result.path} -> {result.hub_url}")
    emit(result.to_dict() if as_json else result.path)


def _export_gguf(source, output, outtype, dtype, pad_ranks, latent_width, push_to_hub, verify, force, as_json) -> None:
    """--format gguf: one llama.cpp file, verified in llama.cpp before it is renamed into place."""
    from ..export.gguf_export import export_gguf

    if dtype != "auto" or latent_width is not None or push_to_hub:
        raise XecomlaError("--format gguf takes --outtype (not --dtype, --latent-width or --push-to-hub)")
    with console.status(f"exporting {source} to GGUF ({outtype.value}) and checking it in llama.cpp"):
        result = export_gguf(source, output, outtype=outtype, pad_ranks=pad_ranks, verify=verify, force=force)
    for line in result.summary_lines():
        console.log(line)
    console.log(f"[green]wrote[/] {result.path}")
    emit(result.to_dict() if as_json else result.path)
