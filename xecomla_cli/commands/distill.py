"""`xecomla distill`: recover an MLA checkpoint's quality by KL distillation from a teacher.

Defaults live in the config dataclasses (``DistillConfig``, ``LocalConfig``); the options below
show them. Global KD's own options and ``--local``'s own options exclude each other: giving one
that the chosen mode ignores is an error, so ``xecomla.json`` records only what the run used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..choices import LocalInputs, Precision
from ..distill.config import DistillConfig
from ..distill.local import LocalConfig
from ..errors import XecomlaError
from .common import DeviceOpt, ForceOpt, JsonOpt, emit, read_arg

GLOBAL_ONLY = (
    "micro_batch", "lr", "warmup", "weight_decay", "clip", "temperature", "ce_weight", "freeze_non_mla",
    "grad_checkpointing", "checkpoint_layers", "save_every", "eval_every", "log_every", "resume", "fsdp", "compile",
)  # fmt: skip
LOCAL_ONLY = ("local_batch", "local_lr", "local_epochs", "local_inputs")
D, L = DistillConfig, LocalConfig
MICRO_BATCH_HELP = (
    "blocks per forward/backward on one process; the rest is gradient accumulation "
    "(default: the whole batch on GPU, 2k tokens on CPU)."
)
TEMPERATURE_HELP = "softmax temperature of both distributions (the loss is scaled by T²)."
CHECKPOINTING_HELP = "recompute decoder-layer activations in the backward pass (less memory, ~30% slower)."
LAYERS_HELP = "checkpoint only the first N decoder layers (implies --grad-checkpointing)."
EVAL_EVERY_HELP = "validate every N steps (default: 3 times a run on GPU, once on CPU, plus start and end)."
LOG_EVERY_HELP = "write a metrics line every N steps (default: 1 on CPU, 10 on GPU)."
PRECISION, LOCAL_INPUTS = Precision(D.precision), LocalInputs(L.inputs)  # the configs' defaults as choices


def kd_option(flag: str, help: str):
    """An option of global KD only (refused with --local)."""
    return typer.Option(flag, help=f"Global KD only: {help}")


def local_option(flag: str, help: str):
    """An option of --local only."""
    return typer.Option(flag, help=f"With --local: {help}")


def distill_command(
    ctx: typer.Context,
    ckpt: Annotated[
        str,
        typer.Argument(help="The student: a stage checkpoint (e.g. from init-svd), or '-' (read the path from stdin)."),
    ],
    tokens: Annotated[
        str | None, typer.Option("--tokens", help="Training budget in tokens: 50k, 2M, 1.5B ... (or give --steps).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Training budget in optimizer steps.")] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher", help="Teacher model source (default: the checkpoint's source model). Must share the tokenizer."
        ),
    ] = D.teacher,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="'demo' (installed public-domain text), 'teacher' (text sampled from the teacher), a "
            ".txt/.jsonl/.parquet/.arrow file or directory, or hf:NAME[:CONFIG][:SPLIT]. "
            "auto: demo when installed, else teacher.",
        ),
    ] = D.data,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed training block.")] = D.seq_len,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Blocks per optimizer step (all processes together); with --tokens, sets the budget."
        ),
    ] = D.batch_size,
    micro_batch: Annotated[int | None, kd_option("--micro-batch", MICRO_BATCH_HELP)] = D.micro_batch,
    lr: Annotated[float, kd_option("--lr", "peak learning rate (AdamW; warm-up, cosine decay to 10%).")] = D.lr,
    warmup: Annotated[float, kd_option("--warmup", "a fraction of the steps (<1) or a number of steps.")] = D.warmup,
    weight_decay: Annotated[float, kd_option("--weight-decay", "AdamW weight decay on matrices.")] = D.weight_decay,
    clip: Annotated[float, kd_option("--clip", "gradient-norm clipping (0: off).")] = D.clip,
    temperature: Annotated[float, kd_option("--temperature", TEMPERATURE_HELP)] = D.temperature,
    ce_weight: Annotated[float, kd_option("--ce-weight", "add this weight x next-token CE to the KL.")] = D.ce_weight,
    freeze_non_mla: Annotated[bool, kd_option("--freeze-non-mla", "train only the MLA attention.")] = D.freeze_non_mla,
    grad_checkpointing: Annotated[bool, kd_option("--grad-checkpointing", CHECKPOINTING_HELP)] = D.grad_checkpointing,
    checkpoint_layers: Annotated[int | None, kd_option("--checkpoint-layers", LAYERS_HELP)] = D.checkpoint_layers,
    save_every: Annotated[
        int, kd_option("--save-every", "save a resumable state every N steps (0: never).")
    ] = D.save_every,
    eval_every: Annotated[int | None, kd_option("--eval-every", EVAL_EVERY_HELP)] = D.eval_every,
    log_every: Annotated[int | None, kd_option("--log-every", LOG_EVERY_HELP)] = D.log_every,
    val_tokens: Annotated[
        str | None,
        typer.Option("--val-tokens", help="Held-out validation tokens (default: 4k on CPU, 64k on GPU)."),
    ] = None,
    resume: Annotated[bool, kd_option("--resume", "continue the unfinished run of this output.")] = False,
    fsdp: Annotated[bool, kd_option("--fsdp", "under torchrun, shard the models (FSDP2) instead of DDP.")] = D.fsdp,
    compile: Annotated[bool, kd_option("--compile", "torch.compile the layers and the loss (GPU).")] = D.compile,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision", help="auto: bf16 autocast over fp32 weights on GPU and on CPUs with AMX, else fp32."
        ),
    ] = PRECISION,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order (and of teacher sampling).")] = D.seed,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output checkpoint directory (default: <ckpt>-distill beside the input)."),
    ] = None,
    device: DeviceOpt = D.device,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Local (layer-wise) distillation: train each converted layer's attention to reproduce the teacher's "
            "attention output, one layer at a time (no full-model backward); --tokens of --data.",
        ),
    ] = False,
    local_batch: Annotated[
        int, local_option("--local-batch", "sequences per Adam step (and per chunk of the walk).")
    ] = L.batch,
    local_lr: Annotated[float, local_option("--local-lr", "Adam's learning rate per layer.")] = L.lr,
    local_epochs: Annotated[int, local_option("--local-epochs", "passes over the tokens per layer.")] = L.epochs,
    local_inputs: Annotated[
        LocalInputs,
        local_option(
            "--local-inputs",
            "each layer's inputs are the teacher's hidden states, or the student's own "
            "with the earlier layers already trained.",
        ),
    ] = LOCAL_INPUTS,
) -> None:
    """Distil a checkpoint from a teacher: KL(teacher ‖ student) on next-token distributions, or layer by layer (--local).

    Prints the output checkpoint directory; its xecomla.json holds the metrics, metrics.jsonl the training curve.

    Several GPUs: `torchrun --nproc-per-node N $(which xecomla) distill CKPT ...` trains with DDP (FSDP with --fsdp); rank 0 writes.
    """  # noqa: E501 (one help paragraph: Typer keeps a docstring's line breaks)
    from ..counts import parse_count
    from ..distill import run_distill
    from ..distill.local_run import run_local_distill

    check_mode(ctx, local)
    cfg = DistillConfig(
        teacher=teacher,
        data=data,
        tokens=parse_count(tokens, "--tokens"),
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        temperature=temperature,
        ce_weight=ce_weight,
        freeze_non_mla=freeze_non_mla,
        grad_checkpointing=grad_checkpointing,
        checkpoint_layers=checkpoint_layers,
        precision=precision.value,
        device=device,
        fsdp=fsdp,
        compile=compile,
        save_every=save_every,
        eval_every=eval_every,
        log_every=log_every,
        val_tokens=parse_count(val_tokens, "--val-tokens"),
        seed=seed,
    )
    if local:
        layer_cfg = LocalConfig(epochs=local_epochs, lr=local_lr, batch=local_batch, inputs=local_inputs.value)
        out, metrics = run_local_distill(read_arg(ckpt), cfg, layer_cfg, output=output, force=force)
    else:
        out, metrics = run_distill(read_arg(ckpt), cfg, output=output, resume=resume, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        emit({"output": str(out), **metrics} if as_json else out)


def check_mode(ctx: typer.Context, local: bool) -> None:
    """One line for an option the chosen mode (global KD or --local) would ignore."""
    given = [
        name
        for name in (GLOBAL_ONLY if local else LOCAL_ONLY)
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"  # given, not defaulted
    ]
    if not given:
        return
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    if local:
        raise XecomlaError(
            f"{flags}: global KD's option(s), unused by --local (its own: --local-batch, --local-lr, "
            "--local-epochs, --local-inputs)"
        )
    raise XecomlaError(f"{flags}: option(s) of --local; add --local, or leave them out for global KD")
