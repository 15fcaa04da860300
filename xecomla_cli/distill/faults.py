"""Faults the loop handles, once for every mode: a stop asked for by a signal, and a run that diverges.

Ctrl-C / SIGTERM    noted by `StopSignals`; at the next step boundary (the next logged step
                    under torchrun, where the processes agree on it) the loop saves a resumable
                    state and stops with one line giving the --resume command. A second signal
                    acts at once (the handlers are the previous ones again).
a diverging run     `DivergenceGuard`, at every logged step: a loss that is not finite, or more
                    than `SPIKE` times the median of the last logged losses (after `WARMUP` of
                    them), or weights whose norm grew `GROWTH` times since the start (too high a
                    learning rate can blow the weights up while the loss stays low: on a tiny
                    model --lr 1e4 once wrote weights of magnitude 5e4 with a falling KL) stops
                    the run with one line naming the step and the learning rate; the last state
                    saved before it is kept, marked so that --resume accepts a lower --lr
                    (`state.mark_diverged`).
"""

from __future__ import annotations

import math
import shlex
import signal
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import XecomlaError
from .dist import Dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SPIKE = 10.0  # a loss this many times the running median is a divergence ...
SPIKE_MARGIN = 1.0  # ... when it is also this much above it (small losses jitter by large factors)
WARMUP = 3  # logged losses before the median is trusted
GROWTH = 10.0  # weights whose norm grew this many times since the start have diverged


class StopSignals:
    """SIGINT and SIGTERM, noted while training (a context manager; only in the main thread)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # the handlers to give back

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _note(self, signum: int, _frame) -> None:
        self.received = signum
        self._restore()  # a second Ctrl-C interrupts at once

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self, dist: Dist, *, collective: bool) -> bool:
        """Whether a signal asked to stop. Under torchrun only where `collective` (every process
        at the same step): there the processes agree (one all-reduce)."""
        if not dist.distributed:
            return self.received is not None
        if not collective:
            return False
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=dist.device)
        dist.all_sum(flag)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal"


class Diverged(XecomlaError):
    """The loss diverged: one line naming the step, the loss and the learning rate."""


class DivergenceGuard:
    """Stops a diverging run: a loss not finite or far above the median of the last logged losses,
    or weights grown far beyond their norm at the start."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def problem(self, loss: float, recent: list[float], norm: float, initial_norm: float | None) -> str | None:
        """What is wrong at a logged step with `loss` after the logged losses `recent` and the weights'
        norm `norm` (`initial_norm` at the start), or None."""
        if not math.isfinite(loss):
            return f"the loss became {loss}"
        if not math.isfinite(norm):
            return f"the weights' norm became {norm}"
        if initial_norm and norm > GROWTH * initial_norm:
            return f"the weights' norm grew {norm / initial_norm:.3g}x since the start (to {norm:.3g})"
        if len(recent) >= WARMUP:
            median = statistics.median(recent)
            if loss > SPIKE * median and loss - median > SPIKE_MARGIN:
                return f"the loss jumped to {loss:.4g}, over {SPIKE:g}x its recent median {median:.4g}"
        return None

    def message(self, what: str, step: int, saved_step: int | None, command: str) -> str:
        """The one line of a diverged run: what, where, why, and what to do."""
        lower = f"{self.lr / 10:g}"
        head = f"{what} at step {step}: the learning rate is likely too high (--lr {self.lr:g})"
        if saved_step is None:
            return f"{head}; no state was saved before it: run again with a lower --lr, e.g. --lr {lower}"
        return (
            f"{head}; the state of step {saved_step} is kept: continue it with a lower --lr, e.g. "
            f"{with_option(command, '--lr', lower)}"
        )


def resume_command(ckpt: Path, out: Path, world: int = 1) -> str:
    """The command line that continues this run: the one that started it with --resume (and the
    checkpoint's path for a '-' read from stdin), else a plain one; under torchrun, torchrun's."""
    argv = sys.argv[1:]
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    launcher = f"torchrun --nproc-per-node {world} $(which xecomla) " if world > 1 else "xecomla "
    if program not in ("xecomla", "__main__.py") or "distill" not in argv:
        return f"{launcher}distill {shlex.quote(str(ckpt))} -o {shlex.quote(str(out))} --resume (and the run's options)"
    at = argv.index("distill")
    argv = [*argv[: at + 1], *(str(ckpt) if a == "-" else a for a in argv[at + 1 :])]
    if "--resume" not in argv:
        argv.append("--resume")
    return launcher + shlex.join(argv)


def with_option(command: str, flag: str, value: str) -> str:
    """`command` with `flag` set to `value` (replaced where given, else added)."""
    if command.endswith("(and the run's options)"):
        return command.replace(" --resume", f" {flag} {value} --resume")
    head, sep, tail = command.partition(" distill ")  # the launcher ('$(which xecomla)') stays as it is
    argv = shlex.split(tail)
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            argv[i + 1] = value
            break
        if a.startswith(flag + "="):
            argv[i] = f"{flag}={value}"
            break
    else:
        argv[-1:-1] = [flag, value]  # before the final --resume
    return head + sep + shlex.join(argv)
