"""Progress that shows in logs: plain lines when stderr is not a terminal."""

from __future__ import annotations

import io

from rich.console import Console

from xecomla_cli.console import LoggedProgress, plain_line


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def progress(terminal: bool, clock: Clock) -> tuple[LoggedProgress, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200)
    return LoggedProgress(console=console, get_time=clock, auto_refresh=False, every=30.0), out


def test_plain_lines_every_30_seconds_when_not_a_terminal():
    clock = Clock()
    bar, out = progress(False, clock)
    with bar:
        task = bar.add_task("distil", total=100)
        for step in range(100):
            clock.t += 1.0  # one step a second
            bar.advance(task)
            if step == 49:
                assert "distil: 30/100 (30%), 1/s, elapsed 30s, ETA 1m10s" in out.getvalue()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("distil:")]
    assert [line.split(",")[0] for line in lines] == ["distil: 30/100 (30%)", "distil: 60/100 (60%)"] + [
        "distil: 90/100 (90%)",
        "distil: 100/100 (100%)",
    ]
    assert "ETA" not in lines[-1]


def test_no_plain_lines_on_a_terminal_or_when_quiet():
    clock = Clock()
    bar, out = progress(True, clock)
    assert not bar.plain
    quiet = LoggedProgress(console=Console(file=io.StringIO()), disable=True)
    assert not quiet.plain
    with bar:
        task = bar.add_task("distil", total=10)
        for _ in range(10):
            clock.t += 60.0
            bar.update(task, advance=1)
    assert "distil: " not in out.getvalue().replace("\x1b", "")  # rich draws its bar instead


def test_plain_line_without_a_total():
    assert plain_line("tokenising", 1500, None, 3.0) == "tokenising: 1,500, 500/s, elapsed 3s"
    assert plain_line("init", 0, 10, 0.0) == "init: 0/10 (0%), 0/s, elapsed 0s"
    assert plain_line("x", 1, 3, 3700.0).endswith("elapsed 1h01m40s, ETA 2h03m20s")
