"""`xecomla distill`: recover an MLA checkpoint's quality by KL distillation from a teacher, layer
by layer (``--local``), or with the stages after KD: DPO (``--dpo``) and on-policy distillation
(``--on-policy``).

Defaults live in the config dataclasses (``DistillConfig``, ``LocalConfig``, ``PolicyConfig``); the
options below show them. Each mode has its own options (``OPTION_MODES``): giving one that the
chosen mode ignores is an error, so ``xecomla.json`` records only what the run used.

The options are gathered once into ``DistillArgs``; one function per mode turns them into its frozen
config: ``kd_config`` (global KD, and --local's data and budget), ``local_config`` (--local's
per-layer training), ``policy_config`` (--dpo, --on-policy).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..choices import Divergence, LocalInputs, Precision
from ..distill.config import DistillConfig
from ..distill.local import LocalConfig
from ..distill.policy_config import PolicyConfig
from ..errors import XecomlaError
from .args import AllowPickleOpt, DeviceOpt, ForceOpt, JsonOpt, read_arg
from .display import emit

KD, LOCAL, DPO, ON_POLICY = "global KD", "--local", "--dpo", "--on-policy"
OPTIMIZER = (KD, DPO, ON_POLICY)  # a full-model AdamW run
OPTION_MODES = {  # the options a mode uses; the others (teacher, steps, batch size, seed, ...) are everyone's
    **dict.fromkeys(
        ("tokens", "data", "seq_len", "val_tokens", "allow_pickle", "sample_temperature", "greedy_answers"), (KD, LOCAL)
    ),
    **dict.fromkeys(("micro_batch", "lr", "warmup", "weight_decay", "clip", "save_every", "resume"), OPTIMIZER),
    **dict.fromkeys(
        (
            "temperature",
            "ce_weight",
            "freeze_non_mla",
            "grad_checkpointing",
            "checkpoint_layers",
            "eval_every",
            "log_every",
            "fsdp",
            "compile",
            "plan",
            "plan_processes",
        ),
        (KD,),
    ),  # fmt: skip
    **dict.fromkeys(("local_batch", "local_lr", "local_epochs", "local_inputs"), (LOCAL,)),
    **dict.fromkeys(("prefs", "beta"), (DPO,)),
    "prompts": (DPO, ON_POLICY),
    **dict.fromkeys(("divergence", "student_fraction", "new_tokens"), (ON_POLICY,)),
}
D, L, P = DistillConfig, LocalConfig, PolicyConfig
MICRO_BATCH_HELP = (
    "blocks (pairs, prompts) per forward/backward on one process; the rest is gradient accumulation "
    "(default: the whole batch on GPU, 2k tokens on CPU; 2 with --dpo / --on-policy)."
)
TEMPERATURE_HELP = "softmax temperature of both distributions (the loss is scaled by T²)."
CHECKPOINTING_HELP = "recompute decoder-layer activations in the backward pass (less memory, ~30% slower)."
LAYERS_HELP = "checkpoint only the first N decoder layers (implies --grad-checkpointing)."
EVAL_EVERY_HELP = "validate every N steps (default: 3 times a run on GPU, once on CPU, plus start and end)."
LOG_EVERY_HELP = "write a metrics line every N steps (default: 1 on CPU, 10 on GPU)."
LR_HELP = "peak learning rate (AdamW; warm-up, cosine decay to 10%; 5e-7 with --dpo, 1e-5 with --on-policy)."
WARMUP_HELP = "a fraction of the steps (<1) or a number of steps (0.1 with --dpo / --on-policy)."
SAVE_EVERY_HELP = "save a resumable state every N steps (0: never; 50 with --dpo / --on-policy)."
PREFS_HELP = (
    "'teacher' (pairs built offline: the teacher's answer chosen, the student's rejected), a .jsonl file "
    "of prompt/chosen/rejected (or ultrafeedback chat messages), or hf:NAME[:SPLIT]."
)
PLAN_HELP = (
    "print the memory one process of this run needs (weights, gradients, AdamW, activations, the KD loss's "
    "logits; per device, against its memory) and exit: no weights are loaded, nothing is written."
)
PRECISION, LOCAL_INPUTS, DIVERGENCE = Precision(D.precision), LocalInputs(L.inputs), Divergence(P.divergence)


def mode_option(flag: str, help: str):
    """An option of the modes ``OPTION_MODES`` names for it (refused in the others)."""
    modes = OPTION_MODES[flag.lstrip("-").replace("-", "_")]
    return typer.Option(flag, help=f"{', '.join(modes)}: {help}")


def distill_command(
    ctx: typer.Context,
    ckpt: Annotated[
        str,
        typer.Argument(help="The student: a stage checkpoint (e.g. from init-svd), or '-' (read the path from stdin)."),
    ],
    tokens: Annotated[
        str | None, mode_option("--tokens", "training budget in tokens: 50k, 2M, 1.5B ... (or give --steps).")
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
        mode_option(
            "--data",
            "'demo' (installed public-domain text), 'teacher' (text sampled from the teacher), a "
            ".txt/.jsonl/.parquet/.arrow file or directory, or hf:NAME[:CONFIG][:SPLIT]; sources joined by '+' "
            "share the training blocks evenly (teacher+demo). auto: demo when installed, else teacher.",
        ),
    ] = D.data,
    seq_len: Annotated[int, mode_option("--seq-len", "tokens per packed training block.")] = D.seq_len,
    sample_temperature: Annotated[
        float, mode_option("--sample-temperature", "temperature of the teacher's sampling with --data teacher.")
    ] = D.sample_temperature,
    greedy_answers: Annotated[
        float,
        mode_option(
            "--greedy-answers",
            "with --data teacher (a chat teacher): this fraction of the training blocks holds the teacher's greedy "
            "answers to its sampled questions (sequence-level KD); the rest, and validation, answers sampled at "
            "--sample-temperature.",
        ),
    ] = D.greedy_answers,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Blocks per optimizer step (all processes together); with --tokens, sets the budget."
        ),
    ] = D.batch_size,
    micro_batch: Annotated[int | None, mode_option("--micro-batch", MICRO_BATCH_HELP)] = D.micro_batch,
    lr: Annotated[float, mode_option("--lr", LR_HELP)] = D.lr,
    warmup: Annotated[float, mode_option("--warmup", WARMUP_HELP)] = D.warmup,
    weight_decay: Annotated[float, mode_option("--weight-decay", "AdamW weight decay on matrices.")] = D.weight_decay,
    clip: Annotated[float, mode_option("--clip", "gradient-norm clipping (0: off).")] = D.clip,
    temperature: Annotated[float, mode_option("--temperature", TEMPERATURE_HELP)] = D.temperature,
    ce_weight: Annotated[float, mode_option("--ce-weight", "add this weight x next-token CE to the KL.")] = D.ce_weight,
    freeze_non_mla: Annotated[
        bool, mode_option("--freeze-non-mla", "train only the MLA attention.")
    ] = D.freeze_non_mla,
    grad_checkpointing: Annotated[bool, mode_option("--grad-checkpointing", CHECKPOINTING_HELP)] = D.grad_checkpointing,
    checkpoint_layers: Annotated[int | None, mode_option("--checkpoint-layers", LAYERS_HELP)] = D.checkpoint_layers,
    save_every: Annotated[int, mode_option("--save-every", SAVE_EVERY_HELP)] = D.save_every,
    eval_every: Annotated[int | None, mode_option("--eval-every", EVAL_EVERY_HELP)] = D.eval_every,
    log_every: Annotated[int | None, mode_option("--log-every", LOG_EVERY_HELP)] = D.log_every,
    val_tokens: Annotated[
        str | None, mode_option("--val-tokens", "held-out validation tokens (default: 4k on CPU, 64k on GPU).")
    ] = None,
    resume: Annotated[bool, mode_option("--resume", "continue the unfinished run of this output.")] = False,
    fsdp: Annotated[bool, mode_option("--fsdp", "under torchrun, shard the models (FSDP2) instead of DDP.")] = D.fsdp,
    compile: Annotated[bool, mode_option("--compile", "torch.compile the layers and the loss (GPU).")] = D.compile,
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
        int, mode_option("--local-batch", "sequences per Adam step (and per chunk of the walk).")
    ] = L.batch,
    local_lr: Annotated[float, mode_option("--local-lr", "Adam's learning rate per layer.")] = L.lr,
    local_epochs: Annotated[int, mode_option("--local-epochs", "passes over the tokens per layer.")] = L.epochs,
    local_inputs: Annotated[
        LocalInputs,
        mode_option(
            "--local-inputs",
            "each layer's inputs are the teacher's hidden states, or the student's own "
            "with the earlier layers already trained.",
        ),
    ] = LOCAL_INPUTS,
    dpo: Annotated[
        bool,
        typer.Option(
            "--dpo",
            help="DPO after KD (X-EcoMLA's last stage): sigmoid loss against a frozen copy of CKPT, one epoch over "
            "--prefs; its budget is --steps.",
        ),
    ] = False,
    prefs: Annotated[str, mode_option("--prefs", PREFS_HELP)] = P.prefs,
    beta: Annotated[float, mode_option("--beta", "DPO's β.")] = P.beta,
    on_policy: Annotated[
        bool,
        typer.Option(
            "--on-policy",
            help="On-policy distillation (GKD): the student answers teacher-written prompts and the teacher scores "
            "every token (--divergence); one pass over --prompts, or --steps.",
        ),
    ] = False,
    prompts: Annotated[
        int, mode_option("--prompts", "teacher-written prompts (--dpo: with --prefs teacher).")
    ] = P.prompts,
    divergence: Annotated[
        Divergence, mode_option("--divergence", "reverse (KL(student ‖ teacher)), forward or jsd.")
    ] = DIVERGENCE,
    student_fraction: Annotated[
        float, mode_option("--student-fraction", "GKD's λ: the share of steps whose answers the student samples.")
    ] = P.student_fraction,
    new_tokens: Annotated[int, mode_option("--new-tokens", "most tokens of a sampled answer.")] = P.new_tokens,
    allow_pickle: AllowPickleOpt = False,
    plan: Annotated[bool, mode_option("--plan", PLAN_HELP)] = False,
    plan_processes: Annotated[
        int | None, mode_option("--plan-processes", "--plan for N processes (default: torchrun's WORLD_SIZE, else 1).")
    ] = None,
) -> None:
    """Distil a checkpoint from a teacher: KL(teacher ‖ student) on next-token distributions, layer by layer (--local), or with DPO (--dpo) or on-policy distillation (--on-policy) after KD.

    Prints the output checkpoint directory; its xecomla.json holds the metrics, metrics.jsonl the training curve.

    Several GPUs: `torchrun --nproc-per-node N $(which xecomla) distill CKPT ...` trains with DDP (FSDP with --fsdp); rank 0 writes.
    """  # noqa: E501 (one help paragraph: Typer keeps a docstring's line breaks)
    from ..distill import run_distill, run_policy
    from ..distill.local_run import run_local_distill

    mode = run_mode(local=local, dpo=dpo, on_policy=on_policy)
    check_mode(ctx, mode)
    args = DistillArgs(
        teacher=teacher, data=data, tokens=tokens, steps=steps, seq_len=seq_len,
        sample_temperature=sample_temperature, greedy_answers=greedy_answers, batch_size=batch_size,
        micro_batch=micro_batch, lr=lr,
        warmup=warmup, weight_decay=weight_decay, clip=clip, temperature=temperature, ce_weight=ce_weight,
        freeze_non_mla=freeze_non_mla, grad_checkpointing=grad_checkpointing, checkpoint_layers=checkpoint_layers,
        save_every=save_every, eval_every=eval_every, log_every=log_every, val_tokens=val_tokens, fsdp=fsdp,
        compile=compile, precision=precision, seed=seed, device=device, allow_pickle=allow_pickle,
        local_batch=local_batch, local_lr=local_lr, local_epochs=local_epochs, local_inputs=local_inputs,
        prefs=prefs, beta=beta, prompts=prompts, divergence=divergence, student_fraction=student_fraction,
        new_tokens=new_tokens,
    )  # fmt: skip
    path = read_arg(ckpt)
    if plan or plan_processes is not None:
        show_plan(path, kd_config(args), plan, plan_processes, as_json)
        return
    if mode in (DPO, ON_POLICY):
        given_names = frozenset(f.name for f in dataclasses.fields(DistillArgs) if given(ctx, f.name))
        cfg = policy_config(args, "dpo" if mode == DPO else "on-policy", given_names)
        out, metrics = run_policy(path, cfg, output=output, resume=resume, force=force)
    elif mode == LOCAL:
        out, metrics = run_local_distill(path, kd_config(args), local_config(args), output=output, force=force)
    else:
        out, metrics = run_distill(path, kd_config(args), output=output, resume=resume, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        emit({"output": str(out), **metrics} if as_json else out)


@dataclass(frozen=True)
class DistillArgs:
    """The distill command's options as parsed (choices as Enums, counts as written): what the
    functions below turn into each mode's frozen config."""

    teacher: str | None
    data: str
    tokens: str | None
    steps: int | None
    seq_len: int
    sample_temperature: float
    greedy_answers: float
    batch_size: int
    micro_batch: int | None
    lr: float
    warmup: float
    weight_decay: float
    clip: float
    temperature: float
    ce_weight: float
    freeze_non_mla: bool
    grad_checkpointing: bool
    checkpoint_layers: int | None
    save_every: int
    eval_every: int | None
    log_every: int | None
    val_tokens: str | None
    fsdp: bool
    compile: bool
    precision: Precision
    seed: int
    device: str
    allow_pickle: bool
    local_batch: int
    local_lr: float
    local_epochs: int
    local_inputs: LocalInputs
    prefs: str
    beta: float
    prompts: int
    divergence: Divergence
    student_fraction: float
    new_tokens: int


def kd_config(a: DistillArgs) -> DistillConfig:
    """Global KD's config (also the data and budget of --local)."""
    from ..counts import parse_count

    return DistillConfig(
        teacher=a.teacher, data=a.data, tokens=parse_count(a.tokens, "--tokens"), steps=a.steps, seq_len=a.seq_len,
        sample_temperature=a.sample_temperature, greedy_answers=a.greedy_answers, batch_size=a.batch_size,
        micro_batch=a.micro_batch, lr=a.lr,
        warmup=a.warmup, weight_decay=a.weight_decay, clip=a.clip, temperature=a.temperature, ce_weight=a.ce_weight,
        freeze_non_mla=a.freeze_non_mla, grad_checkpointing=a.grad_checkpointing,
        checkpoint_layers=a.checkpoint_layers, precision=a.precision.value, device=a.device, fsdp=a.fsdp,
        compile=a.compile, save_every=a.save_every, eval_every=a.eval_every, log_every=a.log_every,
        val_tokens=parse_count(a.val_tokens, "--val-tokens"), seed=a.seed, allow_pickle=a.allow_pickle,
    )  # fmt: skip


def local_config(a: DistillArgs) -> LocalConfig:
    """How --local trains each layer."""
    return LocalConfig(epochs=a.local_epochs, lr=a.local_lr, batch=a.local_batch, inputs=a.local_inputs.value)


def policy_config(a: DistillArgs, mode: str, given_names: frozenset[str]) -> PolicyConfig:
    """--dpo / --on-policy's config: the options given, PolicyConfig's defaults for the rest (the
    options' own defaults are KD's); precision 'auto' resolved here for the device."""
    from ..distill.config import resolve_precision
    from ..loaded import parse_device

    def pick(name: str, value, default):
        return value if name in given_names else default

    return PolicyConfig(
        mode=mode, teacher=a.teacher, prefs=a.prefs, prompts=a.prompts, steps=a.steps,
        batch_size=pick("batch_size", a.batch_size, P.batch_size),
        micro_batch=pick("micro_batch", a.micro_batch, P.micro_batch),
        lr=pick("lr", a.lr, P.lr), warmup=pick("warmup", a.warmup, P.warmup),
        weight_decay=pick("weight_decay", a.weight_decay, P.weight_decay), clip=pick("clip", a.clip, P.clip),
        beta=a.beta, divergence=a.divergence.value, student_fraction=a.student_fraction, new_tokens=a.new_tokens,
        precision=resolve_precision(a.precision.value, parse_device(a.device)), device=a.device,
        save_every=pick("save_every", a.save_every, P.save_every), seed=a.seed,
    )  # fmt: skip


def show_plan(path: str, options: DistillConfig, plan: bool, processes: int | None, as_json: bool) -> None:
    """--plan: the memory table on stderr (the numbers as JSON on stdout with --json)."""
    from .. import console, tables
    from ..distill.model_sizes import plan_distill

    if not plan:
        raise XecomlaError("--plan-processes sizes a --plan: add --plan")
    world = processes if processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise XecomlaError(f"--plan-processes {world}: give at least 1")
    result = plan_distill(path, options, world=world, device=options.device)
    console.err.print(tables.memory_plan_table(result.to_dict()))
    if as_json:
        emit(result.to_dict())


def run_mode(*, local: bool, dpo: bool, on_policy: bool) -> str:
    chosen = [m for m, on in ((LOCAL, local), (DPO, dpo), (ON_POLICY, on_policy)) if on]
    if len(chosen) > 1:
        raise XecomlaError(f"{' and '.join(chosen)} are separate runs: give one (chain them with a pipe)")
    return chosen[0] if chosen else KD


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (rather than leaving its default)."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"


def check_mode(ctx: typer.Context, mode: str) -> None:
    """One line for the options the chosen mode would ignore."""
    unused = [name for name, modes in OPTION_MODES.items() if mode not in modes and given(ctx, name)]
    if not unused:
        return
    flags = ", ".join("--" + name.replace("_", "-") for name in unused)
    own = ", ".join("--" + name.replace("_", "-") for name, modes in OPTION_MODES.items() if modes == (mode,))
    users = [m for m in (KD, LOCAL, DPO, ON_POLICY) if any(m in OPTION_MODES[name] for name in unused)]
    raise XecomlaError(f"{flags}: not used by {mode} (option(s) of {', '.join(users)}); its own: {own or 'none'}")
