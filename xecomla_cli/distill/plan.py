"""What a run will do, decided before any model is loaded: the resolved config, where it writes,
and whether it resumes a saved state.

Files, for an output directory OUT:
    OUT.run/metrics.jsonl     one JSON object per logged step / validation, while training
    OUT.run/data.safetensors  the packed blocks (tokenised once, reused on resume)
    OUT.run/state/            the resumable state, written atomically every --save-every steps
    OUT/                      the final stage checkpoint (+ metrics.jsonl); OUT.run is removed
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import console
from ..checkpoint import read_meta, recorded_source
from ..errors import XecomlaError
from ..outputs import Claim, claim, remove_leftovers
from ..sources import input_paths
from .config import DistillConfig, ResolvedConfig, resolve_config
from .dist import Dist


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
class RunPlan:
    """A checked run: the student checkpoint, the resolved config, the paths, resume or not, and the
    held claim on OUT (released when the run ends: ``with plan.claim:``)."""

    ckpt: Path
    cfg: ResolvedConfig
    paths: RunPaths
    resume: bool
    force: bool
    claim: Claim = field(default_factory=lambda: Claim(Path(), None))
    finished: bool = False  # --resume of a run that had already written OUT: nothing to do


def default_output(ckpt: Path) -> Path:
    """runs/demo-mla-r64 -> runs/demo-mla-r64-distill (a sibling of the student checkpoint)."""
    parent = ckpt.parent if ckpt.name else ckpt.resolve().parent
    return parent / f"{ckpt.resolve().name}-distill"


def plan_run(
    ckpt: str | Path,
    options: DistillConfig,
    dist: Dist,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = console.log,
) -> RunPlan:
    """Check the student checkpoint, resolve the options and claim the output (errors before any loading).

    The output must not overlap the student, the teacher or the data; rank 0 holds its lock."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)  # a clear error for anything that is not a stage checkpoint
    paths = RunPaths(Path(output) if output else default_output(ckpt))
    student_source = recorded_source(ckpt, meta)
    cfg = resolve_config(options, student_source=student_source, device=dist.device, world=dist.world)
    inputs = [ckpt, *input_paths(cfg.teacher), *data_paths(cfg.data)]
    held = claim(paths.out, inputs=inputs, force=True, also=[paths.run_dir], lock=dist.main)
    try:
        if dist.main:
            remove_leftovers(paths.state_dir)
        finished = finished_run(paths, ckpt, cfg, remove_stale=dist.main, log=log)
        dist.barrier()
        if finished and resume and not force:
            return RunPlan(ckpt, cfg, paths, False, force, held, finished=True)
        resume = claim_output(paths, dist, resume=resume, force=force, log=log)
    except BaseException:
        held.release()
        raise
    return RunPlan(ckpt, cfg, paths, resume, force, held)


def data_paths(data: str) -> list[Path]:
    """The local files of --data (none for demo, teacher and Hub datasets)."""
    path = Path(data).expanduser()
    return [path] if data not in ("demo", "teacher") and path.exists() else []


def finished_run(
    paths: RunPaths, ckpt: Path, cfg: ResolvedConfig, *, remove_stale: bool, log: Callable[[str], None]
) -> bool:
    """Whether OUT is this run, finished: a distilled checkpoint of the same student with the same
    settings. Its OUT.run is then the leftover of a run killed after writing OUT (unless it holds the
    state of a run with other settings): removed when `remove_stale`."""
    from .state import RESUME_KEYS, fingerprint, read_state_info

    try:
        meta = read_meta(paths.out)
    except XecomlaError:
        return False
    record = meta.get("local" if meta.get("stage") == "distill-local" else "distill") or {}
    expected = fingerprint(cfg, ckpt)
    same = meta.get("parent") == expected["student"] and all(record.get(k) == expected[k] for k in RESUME_KEYS)
    if not same:
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
