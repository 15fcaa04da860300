"""The distilled stage checkpoint: written by rank 0 at the end of a run, then OUT.run is removed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import build_model, save_checkpoint
from ..loaded import LoadedModel
from ..outputs import fault_point
from .plan import RunPlan


def save_distilled(
    plan: RunPlan,
    *,
    model,
    student: LoadedModel,
    metrics: dict[str, Any],
    record: dict[str, Any],
) -> Path:
    """Write `model` (the trained student) as the stage checkpoint OUT of the plan's stage, with the
    run's metrics.jsonl, and remove OUT.run. `record` goes into xecomla.json under the stage's section.
    Call on rank 0 only."""
    paths = plan.paths

    def copy_metrics(tmp: Path) -> None:
        if paths.metrics.is_file():
            shutil.copyfile(paths.metrics, tmp / "metrics.jsonl")

    save_checkpoint(
        paths.out,
        model=model,
        tokenizer=student.tokenizer,
        stage=plan.stage,
        spec=student.spec,
        source=student.source,
        parent=str(plan.ckpt.resolve()),
        metrics=metrics,
        force=plan.force,
        extra={plan.section: record},
        write_extra=copy_metrics,
    )
    fault_point("distilled")
    shutil.rmtree(paths.run_dir, ignore_errors=True)
    return paths.out


def cpu_model(student: LoadedModel, state: dict[str, torch.Tensor]):
    """The student's architecture on the CPU with the weights `state` (gathered from FSDP shards)."""
    model = build_model(student.model.config, student.spec, torch.float32)
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
