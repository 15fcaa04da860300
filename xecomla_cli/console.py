"""Rich output on stderr (stdout carries only results), with a global quiet switch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
PLAIN_EVERY = 30.0  # seconds between plain progress lines when stderr is not a terminal

err = Console(stderr=True, highlight=False)
_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet
    err.quiet = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """A progress/log line on stderr (silenced by --quiet)."""
    err.print(message)


class LoggedProgress(Progress):
    """A rich progress bar that also shows in logs: when its console is not a terminal (a log file,
    CI, ``nohup``), where rich draws nothing until the end, it writes a plain line per task about
    every ``every`` seconds while the task runs, and one when it completes:

        distil: 120/1,000 (12%), 0.412/s, elapsed 4m51s, ETA 35m36s
    """

    def __init__(self, *columns, every: float = PLAIN_EVERY, **kwargs):
        super().__init__(*columns, **kwargs)
        self.plain = not self.disable and not self.console.is_terminal
        self.every = every
        self._last: dict[TaskID, float] = {}

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._last[task_id] = self.get_time()
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._plain_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._plain_line(task_id)

    def _plain_line(self, task_id: TaskID) -> None:
        if not self.plain or task_id not in self._last:
            return
        task = self._tasks[task_id]
        now = self.get_time()
        if now - self._last[task_id] < self.every and not task.finished:
            return
        self._last[task_id] = math.inf if task.finished else now  # the completed line is written once
        self.console.print(plain_line(task.description, task.completed, task.total, task.elapsed), markup=False)


def plain_line(description: str, done: float, total: float | None, elapsed: float | None) -> str:
    """'step: done/total (pct), rate/s, elapsed, ETA' for a log."""
    elapsed = elapsed or 0.0
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{description}: {done:,.0f}" + (f"/{total:,.0f} ({100 * done / total:.0f}%)" if total else "")]
    parts.append(f"{rate:.3g}/s")
    parts.append(f"elapsed {_duration(elapsed)}")
    if total and rate > 0 and done < total:
        parts.append(f"ETA {_duration((total - done) / rate)}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def make_progress(*extra_columns) -> LoggedProgress:
    """A rich progress bar on stderr (plain lines every ~30 s when stderr is not a terminal);
    disabled under --quiet."""
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=is_quiet(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with make_progress() as progress:
        yield from progress.track(items, description=description, total=total)


@contextlib.contextmanager
def status(message: str):
    """A spinner on stderr for a step of unknown length (e.g. loading a model)."""
    if is_quiet():
        yield
        return
    with err.status(message):
        yield
