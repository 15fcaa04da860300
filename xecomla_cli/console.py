"""Rich output on stderr (stdout carries only results), with a global quiet switch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

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


def make_progress(*extra_columns) -> Progress:
    """A rich progress bar on stderr; disabled under --quiet."""
    return Progress(
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
