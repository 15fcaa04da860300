"""`xecomla export`: a stage checkpoint -> a Hugging Face model directory (DeepSeek-V3 layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export_command(
    ckpt: Annotated[str, typer.Argument(help="A stage checkpoint directory, or '-' (read the path from stdin).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory (default: <checkpoint>-hf).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="'hf': DeepSeek-V3 layout for stock transformers/vLLM; 'xecomla': our own format (any checkpoint).")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype: auto (the checkpoint's), float32 or bfloat16.")] = "auto",
    pad_ranks: Annotated[bool, typer.Option("--pad-ranks", help="Pad per-layer latent ranks to the largest with zero channels (DeepSeek-V3 has one kv_lora_rank).")] = False,
    latent_width: Annotated[Optional[int], typer.Option("--latent-width", help="Pad so that kv_lora_rank + qk_rope_head_dim equals this (vLLM's MLA kernels take 320, 512 or 576).")] = None,
    portable: Annotated[bool, typer.Option("--portable", help="Refuse exports that need attention biases (vLLM and SGLang drop them).")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Load the export with stock transformers and compare logits before writing it.")] = True,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload to this Hub repo (owner/name) with your login or HF_TOKEN.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch to upload to (created if missing).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Export a checkpoint for stock transformers / vLLM (DeepSeek-V3 layout) with a model card."""
    from .. import console
    from .common import emit, read_arg
    from ..errors import XecomlaError
    from ..export import export_checkpoint, push_to_hub as push

    if (private or revision) and not push_to_hub:
        raise XecomlaError("--private and --revision apply to --push-to-hub REPO: add it, or drop them")
    path = Path(read_arg(ckpt))
    out = output or path.parent / f"{path.name.rstrip('/')}-{'hf' if fmt == 'hf' else 'xecomla'}"
    with console.status(f"exporting {path}"):
        result = export_checkpoint(path, out, fmt=fmt, dtype=dtype, pad_ranks=pad_ranks, portable=portable,
                                   latent_width=latent_width, verify=verify, force=force)  # fmt: skip
    plan = result.plan
    if plan is not None:
        console.log(
            f"DeepSeek-V3 layout: kv_lora_rank {plan.kv_lora_rank}, q_lora_rank {plan.q_lora_rank}, "
            f"latent norm '{plan.latent}', queries '{plan.queries}', {plan.dtype}"
        )
        for note in plan.notes:
            console.log(f"  {note}")
        if not plan.portable:
            console.log(
                "[yellow]note:[/] attention biases carry the latent-norm emulation: exact in transformers; vLLM and "
                "SGLang drop them (use a --latent-norm checkpoint there, or --portable to enforce it)"
            )
    if result.verify:
        v = result.verify
        console.log(
            f"verified with stock transformers: max |Δlogit| {v['max_abs_logit_diff']:.2e} "
            f"(max |logit| {v['max_abs_logit']:.3g}; ours SDPA vs eager {v['noise_sdpa_vs_eager']:.2e}), "
            f"greedy {'identical' if v['greedy_tokens_equal'] else 'DIFFERENT'}"
        )
    console.log(f"[green]wrote[/] {result.path}")
    if push_to_hub:
        with console.status(f"uploading to {push_to_hub}"):
            result.hub_url = push(result.path, push_to_hub, private=private, revision=revision)
        console.log(f"[green]pushed[/] {result.path} -> {result.hub_url}")
    emit(result.to_dict() if as_json else result.path)
