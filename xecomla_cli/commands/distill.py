"""`xecomla distill`: recover an MLA checkpoint's quality by KL distillation from a teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import AllowPickleOpt, DeviceOpt, emit, read_arg

DATA_HELP = (
    "'demo' (installed public-domain text), 'teacher' (text sampled from the teacher), a .txt/.jsonl/.parquet/.arrow "
    "file or directory, or hf:NAME[:CONFIG][:SPLIT]. Default: demo when installed, else teacher."
)
LOCAL_HELP = (
    "Local (layer-wise) distillation: train each converted layer's attention to reproduce the teacher's "
    "attention output, one layer at a time (no full-model backward); --tokens of --data."
)
MICRO_BATCH_HELP = (
    "Blocks per forward/backward on one process; the rest is gradient accumulation "
    "(default: the whole batch on GPU, 2k tokens on CPU)."
)


CkptArg = Annotated[
    str,
    typer.Argument(help="The student: a stage checkpoint (e.g. from init-svd), or '-' (read the path from stdin)."),
]
TokensOpt = Annotated[
    str | None, typer.Option("--tokens", help="Training budget in tokens: 50k, 2M, 1.5B ... (or give --steps).")
]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Training budget in optimizer steps.")]
TeacherOpt = Annotated[
    str | None,
    typer.Option(
        "--teacher", help="Teacher model source (default: the checkpoint's source model). Must share the tokenizer."
    ),
]
DataOpt = Annotated[
    str,
    typer.Option("--data", help=DATA_HELP),
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per packed training block.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Blocks per optimizer step (all processes together).")]
MicroBatchOpt = Annotated[
    int | None,
    typer.Option("--micro-batch", help=MICRO_BATCH_HELP),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Peak learning rate (AdamW; linear warm-up, cosine decay to 10%; default 3e-4). "
        "With --local: Adam's rate per layer (default 1e-3).",
    ),
]
WarmupOpt = Annotated[
    float, typer.Option("--warmup", help="Warm-up: a fraction of the steps (<1) or a number of steps.")
]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay on matrices.")]
ClipOpt = Annotated[float, typer.Option("--clip", help="Gradient-norm clipping (0: off).")]
TemperatureOpt = Annotated[
    float,
    typer.Option("--temperature", help="Softmax temperature of both distributions (the loss is scaled by T²)."),
]
CeWeightOpt = Annotated[
    float, typer.Option("--ce-weight", help="Add this weight x next-token cross-entropy to the KL loss.")
]
FreezeNonMlaOpt = Annotated[bool, typer.Option("--freeze-non-mla", help="Train only the MLA attention modules.")]
GradCheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--grad-checkpointing",
        help="Recompute decoder-layer activations in the backward pass (less memory, ~30% slower).",
    ),
]
CheckpointLayersOpt = Annotated[
    int | None,
    typer.Option(
        "--checkpoint-layers",
        help="Checkpoint only the first N decoder layers (implies --grad-checkpointing): trades memory for speed.",
    ),
]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Save a resumable state every N steps (0: never).")]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--eval-every",
        help="Validate every N steps (default: 3 times per run on GPU, once on CPU, plus start and end).",
    ),
]
LogEveryOpt = Annotated[
    int | None,
    typer.Option("--log-every", help="Write a metrics line every N steps (default: 1 on CPU, 10 on GPU)."),
]
ValTokensOpt = Annotated[
    str | None, typer.Option("--val-tokens", help="Held-out validation tokens (default: 4k on CPU, 64k on GPU).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the unfinished run of the same output from its last saved state.")
]
FsdpOpt = Annotated[
    bool,
    typer.Option("--fsdp", help="Under torchrun: shard student and teacher (FSDP2) instead of replicating them (DDP)."),
]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the decoder layers and the loss (GPU).")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 autocast over fp32 weights on GPU and on CPUs with AMX, else fp32), bf16 or fp32.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data order (and of teacher sampling).")]
OutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Output checkpoint directory (default: <ckpt>-distill beside the input)."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output, and discard an unfinished run's state.")
]
AsJsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the final metrics as JSON on stdout instead of the path.")
]
LocalOpt = Annotated[bool, typer.Option("--local", help=LOCAL_HELP)]
LocalEpochsOpt = Annotated[int, typer.Option("--local-epochs", help="With --local: passes over the tokens per layer.")]
LocalInputsOpt = Annotated[
    str,
    typer.Option(
        "--local-inputs",
        help="With --local: each layer's inputs are the teacher's hidden states ('teacher') or the "
        "student's own, with the earlier layers already trained ('student').",
    ),
]


def distill_command(
    ckpt: CkptArg,
    tokens: TokensOpt = None,
    steps: StepsOpt = None,
    teacher: TeacherOpt = None,
    data: DataOpt = "auto",
    seq_len: SeqLenOpt = 512,
    batch_size: BatchSizeOpt = 8,
    micro_batch: MicroBatchOpt = None,
    lr: LrOpt = None,
    warmup: WarmupOpt = 0.05,
    weight_decay: WeightDecayOpt = 0.0,
    clip: ClipOpt = 1.0,
    temperature: TemperatureOpt = 1.0,
    ce_weight: CeWeightOpt = 0.0,
    freeze_non_mla: FreezeNonMlaOpt = False,
    grad_checkpointing: GradCheckpointingOpt = False,
    checkpoint_layers: CheckpointLayersOpt = None,
    save_every: SaveEveryOpt = 1000,
    eval_every: EvalEveryOpt = None,
    log_every: LogEveryOpt = None,
    val_tokens: ValTokensOpt = None,
    resume: ResumeOpt = False,
    fsdp: FsdpOpt = False,
    compile: CompileOpt = False,
    precision: PrecisionOpt = "auto",
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    as_json: AsJsonOpt = False,
    local: LocalOpt = False,
    local_epochs: LocalEpochsOpt = 4,
    local_inputs: LocalInputsOpt = "teacher",
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Distil a checkpoint from a teacher: KL(teacher ‖ student) on next-token distributions, or layer by layer (--local).

    Prints the output checkpoint directory; its xecomla.json holds the metrics, metrics.jsonl the training curve.

    Several GPUs: `torchrun --nproc-per-node N $(which xecomla) distill CKPT ...` trains with DDP (FSDP with --fsdp); rank 0 writes.
    """  # noqa: E501 (one help paragraph: Typer keeps a docstring's line breaks)
    from ..data import parse_count
    from ..distill import DistillConfig, run_distill
    from ..distill.local import LocalConfig
    from ..distill.local_run import run_local_distill

    cfg = DistillConfig(
        teacher=teacher,
        data=data,
        tokens=parse_count(tokens, "--tokens"),
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr if lr is not None else 3e-4,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        temperature=temperature,
        ce_weight=ce_weight,
        freeze_non_mla=freeze_non_mla,
        grad_checkpointing=grad_checkpointing,
        checkpoint_layers=checkpoint_layers,
        precision=precision,
        device=device,
        fsdp=fsdp,
        compile=compile,
        save_every=save_every,
        eval_every=eval_every,
        log_every=log_every,
        val_tokens=parse_count(val_tokens, "--val-tokens"),
        seed=seed,
        allow_pickle=allow_pickle,
    )
    if local:
        layer_cfg = LocalConfig(
            epochs=local_epochs, lr=lr if lr is not None else 1e-3, micro_batch=micro_batch or 1, inputs=local_inputs
        )
        out, metrics = run_local_distill(read_arg(ckpt), cfg, layer_cfg, output=output, resume=resume, force=force)
    else:
        out, metrics = run_distill(read_arg(ckpt), cfg, output=output, resume=resume, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        emit({"output": str(out), **metrics} if as_json else out)
