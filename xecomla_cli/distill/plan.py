"""What a run will do, decided before any model is loaded: the resolved config, where it writes,
and whether it resumes a saved state. Every mode (KD, --local, --dpo, --on-policy) plans here.

Files, for an output directory OUT:
    OUT.run/metrics.jsonl     one JSON object per logged step / validation, while training
    OUT.run/data.safetensors  the packed blocks (tokenised once, reused on resume)
    OUT.run/state/            the resumable state, written atomically every --save-every steps
    OUT/                      the final stage checkpoint (+ metrics.jsonl); OUT.run is removed
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from .. import console
from ..checkpoint import CheckpointInfo, read_meta
from ..errors import XecomlaError
from ..outputs import Claim, claim, default_output, remove_leftovers
from .config import RunConfig, data_parts
from .dist import Dist

# the section of xecomla.json that records each stage's settings
SECTIONS = {"distill": "distill", "distill-local": "local", "dpo": "dpo", "on-policy": "on_policy"}


C = TypeVar("C", bound=RunConfig)


@dataclass(frozen=True)
class RunPaths:
    """The output checkpoint OUT and the run's working directory OUT.run beside it."""

    out: Path

    @property
    def run_dir(self) -> Path:
        return self.out.parent / f"{self.out.name}.run"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def data_cache(self) -> Path:
        return self.run_dir / "data.safetensors"

    @property
    def has_state(self) -> bool:
        return (self.state_dir / "trainer.json").is_file()


@dataclass(frozen=True)
class RunPlan(Generic[C]):
    """A checked run: the student checkpoint (read once), the resolved config, the paths, resume or
    not, and the held claim on OUT (released when the run ends: ``with plan.claim:``)."""

    student: CheckpointInfo
    cfg: C
    stage: str  # "distill", "distill-local", "dpo" or "on-policy"
    paths: RunPaths
    resume: bool
    force: bool
    claim: Claim = field(default_factory=lambda: Claim(Path(), None))
    finished: bool = False  # --resume of a run that had already written OUT: nothing to do

    @property
    def ckpt(self) -> Path:
        return self.student.path

    @property
    def section(self) -> str:
        return SECTIONS[self.stage]

    def with_cfg(self, cfg: C) -> RunPlan[C]:
        """The plan with the config completed (DPO / on-policy know their steps once the data is made)."""
        return dataclasses.replace(self, cfg=cfg)


def output_suffix(stage: str) -> str:
    """runs/demo-mla-r64 -> runs/demo-mla-r64-distill (-dpo, -on-policy): --local writes -distill too,
    being a distillation of the same student."""
    return "distill" if stage.startswith("distill") else stage


def plan_run(
    student: CheckpointInfo,
    cfg: C,
    dist: Dist,
    *,
    stage: str,
    inputs: Iterable[Path] = (),
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = console.log,
) -> RunPlan[C]:
    """Claim the output (errors before any loading): it must not overlap the student or the other
    `inputs` (teacher, data); rank 0 holds its lock. A --resume of a run that had finished is
    recognised (`finished_run`)."""
    paths = RunPaths(Path(output) if output else default_output(student.path, output_suffix(stage)))
    held = claim(paths.out, inputs=[student.path, *inputs], force=True, also=[paths.run_dir], lock=dist.main)
    try:
        if dist.main:
            remove_leftovers(paths.state_dir)
        finished = finished_run(paths, student, cfg, stage, remove_stale=dist.main, log=log)
        dist.barrier()
        if finished and resume and not force:
            return RunPlan(student, cfg, stage, paths, False, force, held, finished=True)
        resume = claim_output(paths, dist, resume=resume, force=force, log=log)
    except BaseException:
        held.release()
        raise
    return RunPlan(student, cfg, stage, paths, resume, force, held)


def data_paths(data: str) -> list[Path]:
    """The local files of --data (each source of a mix) or --prefs (none for demo, teacher and Hub datasets)."""
    paths = [Path(part).expanduser() for part in data_parts(data)]
    return [p for p in paths if str(p) not in ("demo", "teacher") and p.exists()]


def finished_run(
    paths: RunPaths,
    student: CheckpointInfo,
    cfg: RunConfig,
    stage: str,
    *,
    remove_stale: bool,
    log: Callable[[str], None],
) -> bool:
    """Whether OUT is this run, finished: a checkpoint of this stage from the same student with the
    same settings. Its OUT.run is then the leftover of a run killed after writing OUT (unless it holds
    the state of a run with other settings): removed when `remove_stale`."""
    from .state import fingerprint, read_state_info

    try:
        meta = read_meta(paths.out)
    except XecomlaError:
        return False
    record = meta.get(SECTIONS.get(meta.get("stage", ""), "distill")) or {}
    expected = fingerprint(cfg, student.path)
    same = meta.get("stage") == stage and meta.get("parent") == expected["student"]
    if not (same and all(record.get(k) == expected[k] for k in cfg.RESUME_KEYS)):
        return False
    if paths.run_dir.exists() and remove_stale:
        if paths.has_state and read_state_info(paths.state_dir).get("fingerprint") != expected:
            return True  # the state of another run: left for --force
        shutil.rmtree(paths.run_dir, ignore_errors=True)
        log(f"removed {paths.run_dir}: the run had finished writing {paths.out}")
    return True


def claim_output(paths: RunPaths, dist: Dist, *, resume: bool, force: bool, log: Callable[[str], None]) -> bool:
    """Refuse an existing output or an unfinished run's state unless told (--force, --resume); with
    --force, remove that state. Returns whether the run resumes a saved state."""
    if paths.out.exists() and not force:
        raise XecomlaError(f"output '{paths.out}' already exists: pass --force to replace it, or choose another -o")
    if paths.has_state and not resume:
        if not force:
            raise XecomlaError(
                f"an unfinished run left its state in '{paths.run_dir}': pass --resume to continue it, "
                "or --force to start over"
            )
        if dist.main:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
        dist.barrier()
    if resume and not paths.has_state:
        log(f"[yellow]no saved state in {paths.run_dir}: starting from step 0[/]")
        return False
    return resume
