"""`xecomla distill` as one recipe: global knowledge distillation of an MLA student from a teacher.

    plan_run        check the student checkpoint, resolve the options, claim OUT   plan.py, config.py
    load_models     the student (fp32 master weights) and the teacher               models.py
    prepare_data    the packed blocks, cached in OUT.run                            data.py
    Trainer         optimizer steps and validation                                  trainer.py
    train           the loop: steps, metrics lines, validations, resumable states   here
    save_distilled  the stage checkpoint OUT                                        output.py

Under torchrun every rank computes, rank 0 writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..checkpoint import read_meta
from ..counts import human_count
from ..errors import XecomlaError
from ..loaded import LoadedModel
from ..outputs import fault_point
from ..text.packing import BlockSampler, PackedData
from .config import DistillConfig
from .data import prepare_data
from .dist import Dist, setup_distributed
from .metrics import Clock, MetricsLog, TrainHistory, final_metrics, pool_stats, round_floats
from .models import load_models
from .output import cpu_model, run_record, save_distilled
from .plan import RunPlan, plan_run
from .progress import TrainProgress
from .state import check_fingerprint, fingerprint, load_state, read_state_info, save_state
from .trainer import Trainer

Log = Callable[[str], None]
OnStep = Callable[[int, dict[str, float]], None]


def run_distill(
    ckpt: str | Path,
    options: DistillConfig,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    on_step: OnStep | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Distil the student checkpoint `ckpt` from its teacher; returns (output dir, final metrics).

    `on_step(step, metrics)` is called after every logged step (tests use it to stop a run).
    """
    dist = setup_distributed(options.device)
    log: Log = console.log if dist.main else _silent
    plan = plan_run(ckpt, options, dist, output=output, resume=resume, force=force, log=log)
    with plan.claim:  # one writer of OUT and OUT.run until the end
        if plan.finished:
            log(f"the run had already finished: {plan.paths.out}")
            return plan.paths.out, read_meta(plan.paths.out).get("metrics", {})
        return _distill(plan, dist, log, on_step)


def _distill(plan: RunPlan, dist: Dist, log: Log, on_step: OnStep | None) -> tuple[Path, dict[str, Any]]:
    """The recipe's steps, with OUT claimed."""
    cfg = plan.cfg
    student, teacher = load_models(plan.ckpt, cfg, dist.device)
    data = prepare_data(cfg, teacher.tokenizer, teacher.model, dist, plan.paths.data_cache, log)
    trainer = Trainer(student.model, teacher.model, cfg, dist)
    sampler = BlockSampler(data.train.shape[0], cfg.batch_size, cfg.seed)
    log(describe_run(plan, trainer, sampler))
    metrics_log = MetricsLog(plan.paths.metrics, enabled=dist.main)
    history = start_or_resume(trainer, plan, metrics_log, log)
    final_val, seconds = train(trainer, data, sampler, plan, history, metrics_log, log, on_step)
    metrics = {
        **final_metrics(history, final_val, trainer.step, cfg.tokens_per_step, seconds),
        "distill_data": cfg.data,
        "distill_teacher": cfg.teacher,
    }
    model = gather_student(trainer, student)
    if dist.main:
        save_distilled(plan, model=model, student=student, metrics=metrics, record=run_record(cfg, dist, data))
        initial = history.initial or {}
        log(
            f"val KL {initial.get('val_kl', float('nan')):.4f} -> {final_val['val_kl']:.4f}, val ppl "
            f"{initial.get('val_ppl', float('nan')):.2f} -> {final_val['val_ppl']:.2f} (teacher "
            f"{final_val['val_ppl_teacher']:.2f}) after {human_count(metrics['tokens_seen'])} tokens in {seconds:.0f} s"
        )
        log(f"[green]wrote[/] {plan.paths.out}")
    dist.barrier()
    return plan.paths.out, metrics


def _silent(_message: str) -> None:
    """The log of processes other than rank 0."""


def describe_run(plan: RunPlan, trainer: Trainer, sampler: BlockSampler) -> str:
    """One line: budget, epochs, learning rate, precision, trainable parameters, processes."""
    cfg, dist = plan.cfg, trainer.dist
    processes = ""
    if dist.distributed:
        processes = f" x {dist.world} processes" + (" (FSDP)" if cfg.fsdp else " (DDP)")
    return (
        f"distil {plan.ckpt} from {cfg.teacher}: {cfg.total_steps:,} steps x {cfg.batch_size} x {cfg.seq_len} = "
        f"{human_count(cfg.total_steps * cfg.tokens_per_step)} tokens ({sampler.epochs(cfg.total_steps):.2f} epochs), "
        f"lr {cfg.lr:g}, {cfg.precision}, {human_count(trainer.trainable)} trainable parameters on {dist.device}"
        + processes
    )


def start_or_resume(trainer: Trainer, plan: RunPlan, metrics_log: MetricsLog, log: Log) -> TrainHistory:
    """A fresh metrics log, or the saved state loaded into `trainer` (same settings checked) and the
    metrics log cut back to its step. Returns the history so far."""
    if not plan.resume:
        metrics_log.start()
        return TrainHistory()
    state_dir = plan.paths.state_dir
    info = read_state_info(state_dir)
    check_fingerprint(info, fingerprint(plan.cfg, plan.ckpt), plan.paths.run_dir)
    with console.status(f"resuming from {state_dir} (step {info['step']})"):
        load_state(trainer, state_dir, info)
    metrics_log.truncate(trainer.step)
    log(f"resumed at step {trainer.step:,} of {plan.cfg.total_steps:,}")
    return TrainHistory.from_dict(info.get("history", {}))


def train(
    trainer: Trainer,
    data: PackedData,
    sampler: BlockSampler,
    plan: RunPlan,
    history: TrainHistory,
    metrics_log: MetricsLog,
    log: Log,
    on_step: OnStep | None,
) -> tuple[dict[str, float], float]:
    """Optimizer steps up to the last one, with metrics lines, validations and resumable states.
    Returns the final validation and the seconds trained (the resumed runs' included)."""
    cfg, dist = plan.cfg, trainer.dist
    log_every, eval_every = cfg.log_interval(dist.device), cfg.eval_interval(dist.device)
    clock = Clock(history.seconds)
    if trainer.step == 0:
        v0 = history.initial = validate(trainer, data, metrics_log)
        log(f"step 0: val KL {v0['val_kl']:.4f}, val ppl {v0['val_ppl']:.2f} (teacher {v0['val_ppl_teacher']:.2f})")
    history.last_val = history.last_val or history.initial
    window: list[dict[str, torch.Tensor]] = []
    clock.start_window(trainer.step)
    with TrainProgress(cfg.total_steps, trainer.step, disable=not dist.main) as progress:
        while trainer.step < cfg.total_steps:
            window.append(trainer.train_step(local_blocks(trainer, data, sampler)))
            step, last = trainer.step, trainer.step == cfg.total_steps
            if step % log_every == 0 or last:
                record = log_step(trainer, window, clock, metrics_log)
                window = []
                history.add_kl(record["kl"])
                progress.update(step, record)
                if on_step is not None:
                    on_step(step, record)
            if step % eval_every == 0 and not last:
                history.last_val = validate(trainer, data, metrics_log)
                progress.note(history.last_val)
            if cfg.save_every and step % cfg.save_every == 0 and not last:
                history.seconds = clock.seconds()
                info = {"fingerprint": fingerprint(cfg, plan.ckpt), "history": history.to_dict()}
                save_state(trainer, plan.paths.state_dir, {**info, "tokens_seen": step * cfg.tokens_per_step})
                fault_point("state-saved")
            fault_point("step")
    final_val = validate(trainer, data, metrics_log)
    return final_val, clock.seconds()


def local_blocks(trainer: Trainer, data: PackedData, sampler: BlockSampler) -> torch.Tensor:
    """This process's share of the next step's training blocks (local_batch, T)."""
    idx = sampler.indices(trainer.step)
    lb, rank = trainer.local_batch, trainer.dist.rank
    return data.train[idx[rank * lb : (rank + 1) * lb]]


def log_step(
    trainer: Trainer, window: list[dict[str, torch.Tensor]], clock: Clock, metrics_log: MetricsLog
) -> dict[str, float]:
    """Pool the steps since the last line (over processes too), check the loss, write a metrics line."""
    cfg, step = trainer.cfg, trainer.step
    record = pool_stats(window, trainer.dist)
    if not math.isfinite(record["loss"]):
        raise XecomlaError(f"the loss became {record['loss']} at step {step}: lower --lr (now {cfg.lr:g})")
    record.update(
        step=step,
        tokens=step * cfg.tokens_per_step,
        tokens_per_s=round(clock.tokens_per_s(step, cfg.tokens_per_step), 1),
        seconds=round(clock.seconds(), 2),
    )
    metrics_log.write({"event": "train", **round_floats(record)})
    return record


def validate(trainer: Trainer, data: PackedData, metrics_log: MetricsLog) -> dict[str, float]:
    """Validation KL and perplexities at the current step, written as a metrics line."""
    with console.status("validation"):
        v = trainer.evaluate(data.val)
    tokens = trainer.step * trainer.cfg.tokens_per_step
    metrics_log.write({"event": "val", "step": trainer.step, "tokens": tokens, **round_floats(v)})
    return v


def gather_student(trainer: Trainer, student: LoadedModel):
    """The trained student as one model on rank 0 (collective under FSDP: every process calls it)."""
    state = trainer.student_state_dict()
    if not trainer.dist.main:
        return None
    return cpu_model(student, state) if trainer.cfg.fsdp else trainer.student
