"""What a run measures: the metrics.jsonl log, the pooled step statistics, the run's history and
the final metrics that xecomla.json records.

OUT.run/metrics.jsonl holds one JSON object per logged step ({"event": "train", ...}) or
validation ({"event": "val", ...}); it is copied into the output checkpoint at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .dist import Dist

RECENT = 10  # logged steps whose mean KL is the final train_kl
RECENT_LOSSES = 20  # logged losses whose median the loss guard compares with


class MetricsLog:
    """OUT.run/metrics.jsonl; only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def start(self) -> None:
        """An empty log for a fresh run (creates OUT.run)."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def truncate(self, step: int) -> None:
        """Drop the lines logged after the saved step: the resumed run logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def write_val(self, step: int, metrics: dict[str, float], tokens: int | None = None) -> None:
        """A validation's line: {"event": "val", "step", ("tokens"), val_kl, val_ppl, val_ppl_teacher}."""
        where = {"step": step} | ({"tokens": tokens} if tokens is not None else {})
        self.write({"event": "val", **where, **round_floats(metrics)})


def round_floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def pool_stats(window: list[dict[str, torch.Tensor]], dist: Dist) -> dict[str, float]:
    """Mean of the window's step statistics over steps and processes (one host sync); the LR of the
    last step."""
    keys = [k for k in window[0] if k != "lr"]
    t = torch.stack([torch.stack([s[k].float().to(dist.device) for k in keys]) for s in window]).mean(0)
    dist.all_sum(t)
    t = t / dist.world
    out = dict(zip(keys, t.tolist(), strict=True))
    out["lr"] = float(window[-1]["lr"])
    return out


@dataclass
class TrainHistory:
    """What a run has measured so far; saved with the resumable state (trainer.json "history")."""

    initial: dict[str, float] | None = None  # the validation at step 0
    last_val: dict[str, float] | None = None
    recent_kl: list[float] = field(default_factory=list)  # train KL of the last logged steps (KD)
    recent_loss: list[float] = field(default_factory=list)  # the loss of the last logged steps (the guard's)
    seconds: float = 0.0  # training time until the last save (this run and the ones it resumes)
    initial_norm: float | None = None  # the trained weights' norm at step 0 (the guard's)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainHistory:
        return cls(
            d.get("initial"),
            d.get("last_val"),
            list(d.get("recent_kl", [])),
            list(d.get("recent_loss", [])),
            float(d.get("seconds", 0.0)),
            d.get("initial_norm"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "last_val": self.last_val,
            "recent_kl": self.recent_kl,
            "recent_loss": self.recent_loss,
            "seconds": self.seconds,
            "initial_norm": self.initial_norm,
        }

    def add(self, record: dict[str, float]) -> None:
        """A logged step's statistics."""
        self.recent_loss = (self.recent_loss + [record["loss"]])[-RECENT_LOSSES:]
        if "kl" in record:
            self.recent_kl = (self.recent_kl + [record["kl"]])[-RECENT:]


class Clock:
    """Seconds trained (this run and the runs it resumes), and tokens/s between logged steps."""

    def __init__(self, before: float = 0.0):
        self.before = before
        self.start = time.perf_counter()
        self.last = (self.start, 0)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def start_window(self, step: int) -> None:
        """Measure tokens/s from now and `step` on."""
        self.last = (time.perf_counter(), step)

    def tokens_per_s(self, step: int, tokens_per_step: int) -> float:
        """Training tokens per second since the window started; starts the next window."""
        now = time.perf_counter()
        t, s = self.last
        self.last = (now, step)
        return (step - s) * tokens_per_step / (now - t)


def final_metrics(
    section: str,
    history: TrainHistory,
    final_val: dict[str, float] | None,
    steps: int,
    seconds: float,
    tokens_per_step: int | None,
) -> dict[str, Any]:
    """What every mode's xecomla.json records of its run (the objective adds its own, `summary`):
    tokens and steps, validation before and after (when the mode validates), time and speed."""
    out: dict[str, Any] = {}
    if tokens_per_step:
        out |= {"tokens_seen": steps * tokens_per_step, "steps": steps}
    else:
        out[f"{section}_steps"] = steps
    if history.recent_kl:
        out["train_kl"] = round(sum(history.recent_kl) / len(history.recent_kl), 5)
    if final_val is not None:
        initial = history.initial or {}
        out |= {
            "val_kl": round(final_val["val_kl"], 5),
            "val_ppl": round(final_val["val_ppl"], 3),
            "val_ppl_teacher": round(final_val["val_ppl_teacher"], 3),
            "val_kl_initial": round(initial.get("val_kl", float("nan")), 5),
            "val_ppl_initial": round(initial.get("val_ppl", float("nan")), 3),
        }
    out[f"{section}_seconds"] = round(seconds, 1)
    if tokens_per_step:
        out[f"{section}_tokens_per_s"] = round(steps * tokens_per_step / max(seconds, 1e-9), 1)
    return out


def train_records(path: Path) -> list[dict[str, Any]]:
    """The training lines of a metrics.jsonl."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [x for x in lines if x.get("event") == "train"]
