"""The resumable state of a run: model, optimizer, scheduler step, RNG and the run's history.

Written atomically to OUT.run/state/ every --save-every steps, and when a signal stops the run:

    model.safetensors      the trained module (full, unsharded): KD's `DistillModule` ("student."
                           names), the student itself for DPO / on-policy
    optimizer.safetensors  AdamW's moments, as "param name::key"
    rng.safetensors        every process's RNG state, as "cpu.rankN" / "cuda.rankN"
    trainer.json           step, optimizer param groups, fingerprint, history (and "diverged_at"
                           when the run after it diverged: `mark_diverged`)

Any `Resumable` (the one `trainer.Trainer`) is saved and restored here. Data positions are a
function of the step (`BlockSampler`), so a run resumed from this state continues exactly where the
stopped run stopped. It must be made with the same settings: the fingerprint (the resolved config's
`RESUME_KEYS`, and the student) is checked on resume; only --lr may change after a divergence.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_directory
from ..errors import XecomlaError
from .config import RunConfig
from .dist import Dist

STATE_VERSION = 1


class Resumable(Protocol):
    """What `save_state` and `load_state` need of a trainer (`trainer.Trainer` is one)."""

    step: int
    dist: Dist

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state dicts on the CPU, on every process."""
        ...

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], step: int) -> None:
        """Restore what `full_state` returned, and the schedule at `step`."""
        ...


def fingerprint(cfg: RunConfig, ckpt: Path) -> dict[str, Any]:
    """What a resumed run must share with the saved one: the resolved settings and the student."""
    fp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k in cfg.RESUME_KEYS}
    fp["student"] = str(ckpt.resolve())
    return fp


def _tensors_for_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied weights): give each name its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.contiguous().clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer state dict -> (tensors named "param::key", JSON-able param groups)."""
    tensors = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"{name}::{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    """The inverse of `flatten_optimizer`."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_state(trainer: Resumable, state_dir: Path, info: dict[str, Any]) -> None:
    """Atomically write the resumable state (collective: every process must call it)."""
    model_sd, optim_sd = trainer.full_state()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and trainer.dist.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.dist.device)
    rngs = [rng]
    if trainer.dist.distributed:
        rngs = [None] * trainer.dist.world
        torch.distributed.all_gather_object(rngs, rng)
    if trainer.dist.main:
        opt_tensors, groups = flatten_optimizer(optim_sd)
        rng_tensors = {f"{k}.rank{r}": v for r, d in enumerate(rngs) for k, v in d.items()}

        def write(tmp: Path) -> None:
            save_file(_tensors_for_file(model_sd), tmp / "model.safetensors")
            save_file(_tensors_for_file(opt_tensors), tmp / "optimizer.safetensors")
            save_file(rng_tensors, tmp / "rng.safetensors")
            meta = {"state_version": STATE_VERSION, "step": trainer.step, "param_groups": groups, **info}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2) + "\n")

        atomic_directory(state_dir, write, force=True)
    trainer.dist.barrier()


def read_state_info(state_dir: Path) -> dict[str, Any]:
    """trainer.json of a saved state, with one clear error when it cannot be used."""
    path = state_dir / "trainer.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise XecomlaError(f"the saved state '{state_dir}' is unreadable ({exc}): pass --force to start over") from None
    if info.get("state_version") != STATE_VERSION:
        raise XecomlaError(f"the saved state '{state_dir}' has another format version: pass --force to start over")
    return info


def load_state(trainer: Resumable, state_dir: Path, info: dict[str, Any]) -> None:
    """Restore model, optimizer, scheduler step and this process's RNG from a saved state."""
    model_sd = load_file(state_dir / "model.safetensors")
    optim_sd = unflatten_optimizer(load_file(state_dir / "optimizer.safetensors"), info["param_groups"])
    trainer.load_full_state(model_sd, optim_sd, int(info["step"]))
    rng = load_file(state_dir / "rng.safetensors")
    r = trainer.dist.rank
    if f"cpu.rank{r}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{r}"])
    if f"cuda.rank{r}" in rng and trainer.dist.device.type == "cuda":
        torch.cuda.set_rng_state(rng[f"cuda.rank{r}"], trainer.dist.device)


def check_fingerprint(info: dict[str, Any], expected: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a state saved with other settings, naming the first that differs. The state
    of a run stopped because its loss diverged (`mark_diverged`) resumes with another --lr too."""
    saved = info.get("fingerprint", {})
    free = ("lr",) if info.get("diverged_at") is not None else ()
    changed = [k for k in expected if saved.get(k) != expected[k] and k not in free]
    if changed:
        k = changed[0]
        raise XecomlaError(
            f"the saved state in '{run_dir}' was made with {k} = {saved.get(k)!r}, not {expected[k]!r}: "
            "resume with the same settings, or pass --force to start over"
        )


def mark_diverged(state_dir: Path, step: int) -> None:
    """Note in a saved state that the run after it diverged at `step`: it may resume with a lower --lr."""
    path = state_dir / "trainer.json"
    info = json.loads(path.read_text())
    info["diverged_at"] = step
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
