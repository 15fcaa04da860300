"""The one training loop, for every mode (KD, DPO, on-policy): steps up to the last one, metrics
lines, the progress bar, validations, resumable states, and the faults (`faults.py`).

    start_or_resume   a fresh metrics log, or the saved state loaded (same settings checked)
    train             per step: trainer.train_step(); every --log-every steps a metrics line (the
                      loss checked by the guard), every --eval-every a validation, every
                      --save-every a resumable state; a signal saves and stops at the step's end,
                      a diverging loss or weights stop the run (`faults.py`)
    validate          the objective's held-out metrics, written as a metrics line

Under torchrun every rank runs it, rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import console
from ..errors import XecomlaError
from ..outputs import fault_point
from .dist import Dist
from .faults import Diverged, DivergenceGuard, StopSignals, resume_command
from .metrics import Clock, MetricsLog, TrainHistory, pool_stats, round_floats
from .plan import RunPlan
from .progress import TrainProgress
from .state import check_fingerprint, fingerprint, load_state, mark_diverged, read_state_info, save_state
from .trainer import Trainer

Log = Callable[[str], None]
OnStep = Callable[[int, dict[str, float]], None]


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
    plan: RunPlan,
    history: TrainHistory,
    metrics_log: MetricsLog,
    log: Log,
    on_step: OnStep | None = None,
) -> tuple[dict[str, float] | None, float]:
    """Optimizer steps up to the last one, with metrics lines, validations and resumable states.
    Returns the final validation (None for a mode without one) and the seconds trained (the resumed
    runs' included). `on_step(step, record)` is called after every logged step."""
    cfg, dist, objective = plan.cfg, trainer.dist, trainer.objective
    log_every, eval_every = objective.log_interval(), objective.eval_interval()
    clock = Clock(history.seconds)
    guard = DivergenceGuard(float(cfg.lr))
    if trainer.step == 0:
        history.initial_norm = trainer.weight_norm()
        history.initial = validate(trainer, metrics_log)
        if history.initial is not None:
            v0 = history.initial
            log(f"step 0: val KL {v0['val_kl']:.4f}, val ppl {v0['val_ppl']:.2f} (teacher {v0['val_ppl_teacher']:.2f})")
    history.last_val = history.last_val or history.initial
    window: list[dict[str, torch.Tensor]] = []
    clock.start_window(trainer.step)
    label, metric = objective.label, objective.metric
    progress = TrainProgress(cfg.total_steps, trainer.step, disable=not dist.main, label=label, metric=metric)
    with StopSignals() as signals, progress:
        while trainer.step < cfg.total_steps:
            window.append(trainer.train_step())
            step, last = trainer.step, trainer.step == cfg.total_steps
            saving = bool(cfg.save_every) and step % cfg.save_every == 0 and not last
            logged = step % log_every == 0 or last or saving  # a state is saved after a checked loss
            if logged:
                record = log_step(trainer, window, clock, metrics_log)
                window = []
                problem = guard.problem(
                    record["loss"], history.recent_loss, record["weight_norm"], history.initial_norm
                )
                if problem is not None:
                    raise diverged(plan, guard, problem, step, dist)
                history.add(record)
                progress.update(step, record)
                if on_step is not None:
                    on_step(step, record)
            if eval_every and step % eval_every == 0 and not last:
                history.last_val = validate(trainer, metrics_log)
                if history.last_val is not None:
                    progress.note(history.last_val)
            stop = signals.requested(dist, collective=logged)
            if saving or stop:
                history.seconds = clock.seconds()
                save(trainer, plan, history)
                fault_point("state-saved")
            if stop:
                raise XecomlaError(
                    f"stopped by {signals.name} at step {step:,} of {cfg.total_steps:,}; its state is saved in "
                    f"{plan.paths.run_dir}: continue with {resume_command(plan.ckpt, plan.paths.out, dist.world)}"
                )
            fault_point("step")
    final_val = validate(trainer, metrics_log)
    return final_val, clock.seconds()


def save(trainer: Trainer, plan: RunPlan, history: TrainHistory) -> None:
    """The resumable state at the trainer's step (collective)."""
    tokens = trainer.step * (trainer.objective.tokens_per_step or 0)
    info: dict[str, Any] = {"fingerprint": fingerprint(plan.cfg, plan.ckpt), "history": history.to_dict()}
    save_state(trainer, plan.paths.state_dir, {**info, "tokens_seen": tokens})


def diverged(plan: RunPlan, guard: DivergenceGuard, problem: str, step: int, dist: Dist) -> Diverged:
    """The error that stops a diverged run; the last saved state is kept and marked so that --resume
    accepts another --lr."""
    saved = None
    if plan.paths.has_state:
        saved = int(read_state_info(plan.paths.state_dir)["step"])
        if dist.main:
            mark_diverged(plan.paths.state_dir, step)
    return Diverged(guard.message(problem, step, saved, resume_command(plan.ckpt, plan.paths.out, dist.world)))


def log_step(
    trainer: Trainer, window: list[dict[str, torch.Tensor]], clock: Clock, metrics_log: MetricsLog
) -> dict[str, float]:
    """Pool the steps since the last line (over processes too), add the weights' norm and write a
    metrics line."""
    step, tokens_per_step = trainer.step, trainer.objective.tokens_per_step
    record: dict[str, Any] = pool_stats(window, trainer.dist)
    record["weight_norm"] = trainer.weight_norm()
    record["step"] = step
    if tokens_per_step:
        record["tokens"] = step * tokens_per_step
        record["tokens_per_s"] = round(clock.tokens_per_s(step, tokens_per_step), 1)
    record["seconds"] = round(clock.seconds(), 2)
    metrics_log.write({"event": "train", **round_floats(record), "lr": record["lr"]})  # an lr of 5e-7 survives
    return record


def validate(trainer: Trainer, metrics_log: MetricsLog) -> dict[str, float] | None:
    """The objective's validation at the current step, written as a metrics line (None: it has none)."""
    if not trainer.objective.validates:
        return None
    with console.status("validation"):
        v = trainer.objective.validate()
    metrics_log.write_val(trainer.step, v, tokens=trainer.step * (trainer.objective.tokens_per_step or 0))
    return v
