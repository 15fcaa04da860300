"""`xecomla distill --local` as one recipe: layer-wise distillation of the converted layers.

    read_checkpoint_info the student checkpoint, read once                              checkpoint.py
    plan_run             resolve the options, claim OUT                                 plan.py, config.py
    load_models          the student (fp32) and the teacher                             models.py
    prepare_data         the packed blocks (the same --data as global distillation)     data.py
    Validator            validation KL and perplexities before and after (as KD's)      validation.py
    held_out_blocks      the guard's blocks: training-stream blocks no layer trains on  (here)
    local_distill        each converted layer's attention trained to match the teacher  local.py
    MetricsLog           metrics.jsonl: the validations and one line per layer          metrics.py
    save_distilled       the stage checkpoint OUT ("distill-local")                     output.py

One process: layers are trained in order (with the student's own inputs, each layer sees the
layers before it as trained). With teacher inputs the layers are independent, so they could be
spread over torchrun ranks; this is not built: under torchrun the run refuses with one line.
A killed run restarts from the start (``--resume`` is refused): each layer takes seconds to
minutes and nothing is saved between layers.

The guard (local.py) decides per layer on held-out blocks of the training stream, never on the
validation blocks, so that the validation perplexity reported before and after stays an unseen
measure.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..checkpoint import read_checkpoint_info
from ..counts import human_count
from ..errors import XecomlaError
from ..mla.rebuild import mla_layers
from ..sources import input_paths
from .config import DistillConfig, ResolvedConfig, resolve_config
from .data import prepare_data
from .dist import Dist, setup_distributed
from .kd import run_record
from .local import LayerResult, LocalConfig, local_distill
from .metrics import MetricsLog, round_floats
from .models import load_models
from .module import DistillModule
from .output import save_distilled
from .plan import RunPlan, data_paths, plan_run
from .validation import Validator, default_micro_batch

Log = Callable[[str], None]
HELD_SHARE = 4  # the guard holds out one block per 4 training blocks
# DistillConfig fields that only global KD reads: xecomla.json's "local" section leaves them out
GLOBAL_ONLY = frozenset(
    {"micro_batch", "lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "clip", "temperature", "ce_weight"}
    | {"freeze_non_mla", "grad_checkpointing", "checkpoint_layers", "fsdp", "compile", "kd_kernel"}
    | {"save_every", "eval_every", "log_every"}
)


def run_local_distill(
    ckpt: str | Path,
    options: DistillConfig,
    local: LocalConfig,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    log: Log = console.log,
) -> tuple[Path, dict[str, Any]]:
    """Distil every converted layer of the checkpoint `ckpt` locally; returns (output dir, metrics)."""
    dist = setup_distributed(options.device)
    if dist.distributed:
        raise XecomlaError("distill --local runs in one process: launch it without torchrun")
    if resume:
        raise XecomlaError("distill --local has no saved state to resume: run it again (with --force)")
    student_ckpt = read_checkpoint_info(ckpt)
    cfg = resolve_config(options, student_source=student_ckpt.source, device=dist.device, world=dist.world)
    inputs = [*input_paths(cfg.teacher), *data_paths(cfg.data)]
    plan = plan_run(student_ckpt, cfg, dist, stage="distill-local", inputs=inputs, output=output, force=force, log=log)
    with plan.claim:  # one writer of OUT and OUT.run until the end
        return _local_distill(plan, local, dist, log)


def _local_distill(
    plan: RunPlan[ResolvedConfig], local: LocalConfig, dist: Dist, log: Log
) -> tuple[Path, dict[str, Any]]:
    """The recipe's steps, with OUT claimed."""
    cfg = plan.cfg
    local = dataclasses.replace(local, bf16=cfg.precision == "bf16")
    student, teacher = load_models(plan.student, cfg.teacher, dist.device, allow_pickle=cfg.allow_pickle)  # fp32: exact
    assert teacher is not None
    data = prepare_data(cfg, teacher.tokenizer, teacher.model, dist, plan.paths.data_cache, log)
    ids, held = held_out_blocks(data.train, cfg.budget_blocks)
    log(
        f"local distillation of {plan.ckpt} from {cfg.teacher}: {human_count(ids.numel())} tokens of {cfg.data} "
        f"(+ {human_count(held.numel())} held out per layer), {local.epochs} epochs per layer, lr {local.lr:g}, "
        f"{local.inputs} inputs, {cfg.precision}"
    )
    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    student_and_loss = DistillModule(student.model, temperature=1.0, ce_weight=0.0, autocast=autocast)
    micro = default_micro_batch(dist.device, len(data.val), cfg.seq_len)
    validate = Validator(student_and_loss, teacher.model, data.val, dist, micro)
    metrics_log = MetricsLog(plan.paths.metrics)
    metrics_log.start()
    with console.status("validation"):
        before = validate()
    metrics_log.write_val(0, before)
    log(f"before: val KL {before['val_kl']:.4f}, val ppl {before['val_ppl']:.2f}")
    start = time.perf_counter()
    results = train_layers(student.model, teacher.model, ids, held, local)
    seconds = time.perf_counter() - start
    for r in results:
        metrics_log.write({"event": "layer", **round_floats(r.to_dict())})
    with console.status("validation"):
        after = validate()
    metrics_log.write_val(len(results), after)  # a layer is --local's step
    metrics = local_metrics(results, before, after, ids.numel(), seconds, cfg.teacher, cfg.data)
    metrics["local_held_tokens"] = held.numel()
    record = {k: v for k, v in run_record(cfg, dist, data).items() if k not in GLOBAL_ONLY} | local.to_dict()
    save_distilled(plan, model=student.model, student=student, metrics=metrics, record=record)
    log(
        f"kept {metrics['local_layers_kept']} of {len(results)} layers; mean layer error "
        f"{metrics['local_error_before']:.3f} -> {metrics['local_error_after']:.3f} (held out "
        f"{metrics['local_held_error_before']:.3f} -> {metrics['local_held_error_after']:.3f}); val ppl "
        f"{before['val_ppl']:.2f} -> {after['val_ppl']:.2f} (teacher {after['val_ppl_teacher']:.2f}) in {seconds:.0f} s"
    )
    log(f"[green]wrote[/] {plan.paths.out}")
    return plan.paths.out, metrics


def held_out_blocks(train, budget: int, share: int = HELD_SHARE) -> tuple:
    """(training blocks, the guard's held-out blocks): up to ``budget`` blocks train and the
    ceil(budget / share) blocks after them are held out; where the stream is too short for both,
    training gives up the blocks the guard needs."""
    n = min(budget, train.shape[0] - 1)
    if n < 1:
        raise XecomlaError("distill --local needs at least 2 training blocks: pass more --data or a shorter --seq-len")
    g = math.ceil(n / share)
    n = min(n, train.shape[0] - g)
    return train[:n], train[n : n + g]


def train_layers(student, teacher, ids, held, local: LocalConfig) -> list[LayerResult]:
    """local_distill with a progress bar over the converted layers and a line per layer."""
    layers = mla_layers(student)
    with console.make_progress() as progress:
        task = progress.add_task("local distillation", total=len(layers))

        def report(r: LayerResult) -> None:
            if not r.trained:
                note = " (exact already: unchanged)"
            elif r.kept:
                note = f"; held out {r.held_before:.4f} -> {r.held_after:.4f}: kept (epoch {r.epoch})"
            else:
                note = f"; held out {r.held_before:.4f} -> {r.held_after:.4f}: restored"
            progress.console.print(
                f"layer {r.layer:>3}: error {r.error_before:.4f} -> {r.error_after:.4f} in {r.seconds:.1f} s{note}"
            )
            progress.advance(task)

        return local_distill(student, teacher, ids, local, progress=report, held_ids=held)


def local_metrics(results: list[LayerResult], before, after, tokens: int, seconds: float, teacher, data):
    """What xecomla.json records: per-layer errors (before, after training, held out, kept), the
    means of what stays, validation before and after."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    held = [r for r in results if r.held_before is not None]
    out = {
        "local_layers": [r.to_dict() for r in results],
        "local_error_before": round(mean([r.error_before for r in results]), 6),
        "local_error_after": round(mean([r.final_error for r in results]), 6),
        "local_layers_kept": sum(r.kept for r in results),
        "local_tokens": tokens,
        "local_seconds": round(seconds, 1),
    }
    if held:
        out["local_held_error_before"] = round(mean([r.held_before for r in held]), 6)
        out["local_held_error_after"] = round(mean([r.final_held for r in held]), 6)
    return out | {
        "val_kl_initial": round(before["val_kl"], 5),
        "val_ppl_initial": round(before["val_ppl"], 3),
        "val_kl": round(after["val_kl"], 5),
        "val_ppl": round(after["val_ppl"], 3),
        "val_ppl_teacher": round(after["val_ppl_teacher"], 3),
        "distill_data": data,
        "distill_teacher": teacher,
    }
