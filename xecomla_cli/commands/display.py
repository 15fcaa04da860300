"""What a command shows: results on stdout (an output directory, or JSON with --json) so stages chain
in pipes; spinners and progress bars on stderr.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import console


def emit(result) -> None:
    """Write a result to stdout: a path as one line, anything else as JSON."""
    if isinstance(result, (str, Path)):
        print(str(result), flush=True)
    else:
        print(json.dumps(result, indent=2, default=str), flush=True)


def load(source: str, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False):
    """Load a source with a spinner on stderr."""
    from ..sources import load_model

    with console.status(f"loading {source}"):
        return load_model(source, dtype=dtype, device=device, allow_pickle=allow_pickle)


@contextlib.contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[..., None]]]:
    """A factory ``bar(description, total) -> advance(n=1)`` of progress bars on stderr.

    The display starts with the first bar, so spinners (``console.status``) may run before it."""
    progress = console.make_progress()
    started = False

    def bar(description: str, total: int) -> Callable[..., None]:
        nonlocal started
        if not started:
            progress.start()
            started = True
        task = progress.add_task(description, total=total)
        return lambda n=1: progress.advance(task, n)

    try:
        yield bar
    finally:
        if started:
            progress.stop()
