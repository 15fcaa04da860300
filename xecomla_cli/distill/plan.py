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
from dataclasses import dataclass
from pathlib import Path

from .. import console
from ..checkpoint import read_meta
from ..errors import XecomlaError
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
    """A checked run: the student checkpoint, the resolved config, the paths, resume or not."""

    ckpt: Path
    cfg: ResolvedConfig
    paths: RunPaths
    resume: bool
    force: bool


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
    """Check the student checkpoint, resolve the options and claim the output (errors before any loading)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)  # a clear error for anything that is not a stage checkpoint
    paths = RunPaths(Path(output) if output else default_output(ckpt))
    student_source = meta.get("source") or str(ckpt.resolve())
    cfg = resolve_config(options, student_source=student_source, device=dist.device, world=dist.world)
    resume = claim_output(paths, dist, resume=resume, force=force, log=log)
    return RunPlan(ckpt, cfg, paths, resume, force)


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
