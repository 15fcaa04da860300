"""An eval's results in a stage checkpoint: the ``eval`` entry of its xecomla.json metrics, where
each run's results merge with the earlier ones (task by task, the teacher's while it is the same)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from ..checkpoint import META_FILE, read_meta, record_metrics
from .multiple_choice import average


def metrics_for_checkpoint(result: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The ``eval`` entry of xecomla.json metrics: earlier results merged with the new ones."""
    merged = dict(existing or {})
    new = result["results"]["model"]
    for key, value in new.items():
        if key == "tasks":
            merged["tasks"] = {**merged.get("tasks", {}), **value}
        else:
            merged[key] = value
    if "tasks" in merged:
        merged["average"] = average(merged["tasks"])
    if result["results"].get("teacher"):
        old = merged.get("teacher", {}) if merged.get("teacher", {}).get("source") == result["teacher"] else {}
        teacher = {**old, "source": result["teacher"]}
        for key, value in result["results"]["teacher"].items():
            teacher[key] = {**old.get("tasks", {}), **value} if key == "tasks" else value
        if "tasks" in teacher:
            teacher["average"] = average(teacher["tasks"])
        merged["teacher"] = teacher
    merged["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return merged


def record_eval(result: dict[str, Any]) -> Path:
    """Merge `result` into its checkpoint's xecomla.json (``metrics.eval``); returns that file."""
    checkpoint = result["checkpoint"]
    existing = read_meta(checkpoint).get("metrics", {}).get("eval")
    record_metrics(checkpoint, {"eval": metrics_for_checkpoint(result, existing)})
    return Path(checkpoint) / META_FILE
