"""`xecomla distill` (global KD), `--dpo` and `--on-policy` as one recipe over the components:

    read_checkpoint_info  the student checkpoint, read once                          checkpoint.py
    resolve_*config       the options, resolved once into a frozen config             config.py, policy_config.py
    plan_run              where it writes, resume or not; OUT claimed                 plan.py
    load_models           the student (fp32 master weights) and the teacher          models.py
    the batch source      KD: packed blocks (data.py); DPO: pairs, on-policy: prompts (policy.py)
    the objective         KD: kd.py; DPO, on-policy: policy.py (the loss on a batch)
    Trainer               the optimizer step                                          trainer.py
    train                 the loop: steps, metrics lines, validations, states, faults loop.py, faults.py
    save_distilled        the stage checkpoint OUT                                    output.py

Under torchrun (KD only) every rank computes, rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import console
from ..checkpoint import read_checkpoint_info, read_meta
from ..errors import XecomlaError
from ..loaded import LoadedModel
from ..sources import input_paths
from ..text.packing import BlockSampler
from .config import DistillConfig, resolve_config
from .data import prepare_data
from .dist import setup_distributed
from .kd import KDObjective, local_blocks
from .loop import OnStep, start_or_resume, train
from .metrics import MetricsLog, final_metrics
from .models import load_models
from .objective import Objective
from .output import save_distilled
from .plan import RunPlan, data_paths, plan_run
from .policy import n_items, objective_for, prepare_items
from .policy_config import PolicyConfig, resolve_policy_config
from .trainer import Trainer

Log = Callable[[str], None]


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

    `on_step(step, metrics)` is called after every logged step (tests use it to stop a run)."""
    dist = setup_distributed(options.device)
    log: Log = console.log if dist.main else silent
    student_ckpt = read_checkpoint_info(ckpt)
    cfg = resolve_config(options, student_source=student_ckpt.source, device=dist.device, world=dist.world)
    inputs = [*input_paths(cfg.teacher), *data_paths(cfg.data)]
    plan = plan_run(
        student_ckpt, cfg, dist, stage="distill", inputs=inputs, output=output, resume=resume, force=force, log=log
    )
    with plan.claim:  # one writer of OUT and OUT.run until the end
        if plan.finished:
            return finished(plan, log)
        teacher_dtype = "bfloat16" if cfg.precision == "bf16" else "float32"
        student, teacher = load_models(
            student_ckpt, cfg.teacher, dist.device, teacher_dtype=teacher_dtype, allow_pickle=cfg.allow_pickle
        )
        assert teacher is not None
        data = prepare_data(cfg, teacher.tokenizer, teacher.model, dist, plan.paths.data_cache, log)
        sampler = BlockSampler(data.train.shape[0], cfg.batch_size, cfg.seed)
        blocks = local_blocks(data.train, sampler, dist, cfg.batch_size // dist.world)
        objective = KDObjective(student.model, teacher.model, cfg, dist, blocks, data)
        trainer = Trainer(objective, cfg, dist, fused=dist.device.type == "cuda" and not cfg.fsdp)
        return run_recipe(plan, trainer, student, log, on_step)


def run_policy(
    ckpt: str | Path,
    options: PolicyConfig,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    on_step: OnStep | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train the student checkpoint `ckpt` with DPO or on-policy distillation; (output dir, metrics)."""
    dist = setup_distributed(options.device)
    if dist.distributed:
        raise XecomlaError("--dpo and --on-policy run on one process: start them without torchrun")
    student_ckpt = read_checkpoint_info(ckpt)
    cfg = resolve_policy_config(options, student_source=student_ckpt.source)
    inputs = [*input_paths(cfg.teacher), *(data_paths(cfg.prefs) if cfg.mode == "dpo" else [])]
    plan = plan_run(student_ckpt, cfg, dist, stage=cfg.mode, inputs=inputs, output=output, resume=resume, force=force)
    with plan.claim:  # one writer, inputs never written
        if plan.finished:
            return finished(plan, console.log)
        needs_teacher = cfg.mode == "on-policy" or cfg.prefs == "teacher"
        student, teacher = load_models(student_ckpt, cfg.teacher if needs_teacher else None, dist.device)
        items = prepare_items(cfg, student, teacher, plan.paths.run_dir / "items.safetensors")
        plan = plan.with_cfg(cfg.with_steps(n_items(cfg, items)))
        objective = objective_for(
            student.model, teacher.model if teacher else None, plan.cfg, items, student.tokenizer, dist
        )
        trainer = Trainer(objective, plan.cfg, dist)
        return run_recipe(plan, trainer, student, console.log, on_step)


def run_recipe(
    plan: RunPlan, trainer: Trainer, student: LoadedModel, log: Log, on_step: OnStep | None
) -> tuple[Path, dict[str, Any]]:
    """The steps every mode shares once its objective is built: resume or start, the loop, the
    final metrics, the stage checkpoint OUT (rank 0)."""
    objective: Objective = trainer.objective
    dist = trainer.dist
    log(objective.describe(plan.ckpt))
    metrics_log = MetricsLog(plan.paths.metrics, enabled=dist.main)
    history = start_or_resume(trainer, plan, metrics_log, log)
    final_val, seconds = train(trainer, plan, history, metrics_log, log, on_step)
    metrics = final_metrics(plan.section, history, final_val, trainer.step, seconds, objective.tokens_per_step)
    metrics |= objective.summary(history, final_val, plan.paths.metrics)
    model = objective.trained_student(student)
    if dist.main:
        save_distilled(plan, model=model, student=student, metrics=metrics, record=objective.record())
        log(objective.final_line(metrics, history))
        log(f"[green]wrote[/] {plan.paths.out}")
    dist.barrier()
    return plan.paths.out, metrics


def finished(plan: RunPlan, log: Log) -> tuple[Path, dict[str, Any]]:
    """--resume of a run that had written OUT already: its output and metrics."""
    log(f"the run had already finished: {plan.paths.out}")
    return plan.paths.out, read_meta(plan.paths.out).get("metrics", {})


def silent(_message: str) -> None:
    """The log of processes other than rank 0."""
