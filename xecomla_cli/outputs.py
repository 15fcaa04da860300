"""Where a stage writes, and what it must never touch: one writer per output, inputs never written,
the leftovers of dead runs cleaned up. init-svd, distill (global and --local) and export all use it.

    claim(out, inputs=[...])   before any model is loaded:
        1. refuse an output that is, holds or lies inside one of the run's inputs (real paths:
           symlinks count), `--force` or not;
        2. refuse an existing output unless `force`;
        3. create the output's parent and take an exclusive lock on the output name: the file
           ``.NAME.lock`` beside it, ``flock``ed for the whole run (the lock also covers
           ``NAME.run``, distill's resumable state); a second run on the same name is refused at
           once with the PID of the first. The kernel drops the lock when the process dies;
        4. with the lock held, remove what dead runs left: ``.NAME.tmp-*`` (a half-written output)
           and ``.NAME.old-*`` (an output being replaced; put back if ``NAME`` itself is missing).

Outputs appear only by rename (`checkpoint.atomic_directory`), so ``NAME`` is always complete.
`fault_point(name)` lets the fault-injection tests stop a run at a named moment and kill it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import XecomlaError

FAULT_AT_ENV = "XECOMLA_FAULT_AT"  # "point" or "point:N": stop there (the N-th time) and wait
FAULT_DIR_ENV = "XECOMLA_FAULT_DIR"  # where the stopped run writes POINT.reached and waits for POINT.release
_fault_counts: dict[str, int] = {}


def default_output(stage_input: str | Path, suffix: str, *, parent: Path | None = None) -> Path:
    """Where a stage writes when no output is given: ``NAME-SUFFIX`` beside its input, or under ``parent``.

    NAME is the input's last path component ('.', '..' and 'run/' name the real directory; a '.gguf'
    suffix is dropped). init-svd writes under runs/ (its input may be a Hub id or a file elsewhere);
    distill and export write beside the checkpoint they read:

        demo, 'mla-r64', parent=runs/        -> runs/demo-mla-r64
        runs/demo-mla-r64, 'distill'         -> runs/demo-mla-r64-distill
        . (inside runs/demo-mla-r64), 'hf'   -> runs/demo-mla-r64-hf
    """
    path = Path(str(stage_input).rstrip("/") or "/")
    if path.name in ("", ".", ".."):
        path = path.resolve()
    name = path.name.removesuffix(".gguf")
    return (path.parent if parent is None else parent) / f"{name}-{suffix}"


def lock_path(out: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it."""
    return out.parent / f".{out.name}.lock"


def real(path: Path) -> Path:
    """The real path (symlinks resolved, also for a path that does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_inputs(outputs: Iterable[Path], inputs: Iterable[Path | None]) -> None:
    """One line when an output is an input, holds one or lies inside one (compared as real paths)."""
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue
        ri = real(inp)
        for out in outputs:
            ro = real(out)
            if not _overlap(ro, ri):
                continue
            how = "is" if ro == ri else ("is inside" if ri in ro.parents else "contains")
            linked = os.path.abspath(Path(inp).expanduser()) != str(ri) or os.path.abspath(out) != str(ro)
            raise XecomlaError(
                f"output '{out}' {how} the input '{inp}'"
                + (f" (real paths {ro} and {ri})" if linked else "")
                + ": a stage never writes over or into its inputs, --force or not; choose another -o"
            )


def os_error_line(exc: OSError, doing: str) -> str:
    """One line for an OSError met while `doing` something: what, where, and what to do."""
    where = f" '{exc.filename}'" if exc.filename else ""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{doing}: no space left on the device{where}: free some space or choose another -o"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{doing}: {reason}{where}: choose an -o where you may write, or fix the permissions"
    return f"{doing}: {reason}{where}"


class Claim:
    """A held claim on an output name; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, out: Path, fd: int | None, made: list[Path] | None = None):
        self.out = out
        self.fd = fd
        self.made = made or []  # parent directories this claim created

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(lock_path(self.out))  # before closing: a waiting opener then retries (see _lock)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self.remove_made()

    def remove_made(self) -> None:
        """Remove the parent directories the claim created, if still empty: a run that wrote nothing
        leaves nothing behind."""
        for d in self.made:
            try:
                d.rmdir()
            except OSError:
                break

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(
    out: str | Path,
    *,
    inputs: Iterable[Path | str | None] = (),
    force: bool = False,
    also: Iterable[Path] = (),
    lock: bool = True,
) -> Claim:
    """Check and lock the output `out` (see the module docstring); `also`: other paths the run writes
    (distill's OUT.run), checked against the inputs too. `lock=False` (torchrun ranks other than 0)
    only checks. Returns the held `Claim`."""
    out = Path(out)
    check_not_inputs([out, *also], [Path(p) for p in inputs if p is not None])
    if not lock:
        return Claim(out, None)
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except OSError as exc:
        Claim(out, None, made).remove_made()
        raise XecomlaError(os_error_line(exc, f"cannot create the output '{out}'")) from None
    held = Claim(out, fd, made)
    try:
        remove_leftovers(out)
        if out.exists() and not force:
            raise XecomlaError(f"output '{out}' already exists: pass --force to replace it, or choose another -o")
    except BaseException:
        held.release()
        raise
    fault_point("claimed")
    return held


def _lock(out: Path) -> int:
    """flock ``.NAME.lock`` (non-blocking) and write our PID into it; one line naming the holder if taken."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise XecomlaError(
                f"output '{out}' is being written by another xecomla run (PID {pid}): wait for it to finish, "
                "or choose another -o"
            ) from None
        try:  # the previous holder may have unlinked the file between our open and our flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def remove_leftovers(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` beside `out` (call with the lock held: whoever made
    them is dead). An ``.old`` copy is moved back first when `out` itself is missing (a run died
    while replacing it). Returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    old = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if old and not out.exists() and not out.is_symlink():
        os.replace(old.pop(), out)
    removed = [*out.parent.glob(f".{out.name}.tmp-*"), *old]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def fault_point(name: str) -> None:
    """Fault injection for the tests: when ``XECOMLA_FAULT_AT`` names this point (``name`` or
    ``name:N`` for its N-th passage), write ``POINT.reached`` (our PID) into ``XECOMLA_FAULT_DIR``
    and wait until ``POINT.release`` appears there (the test kills us meanwhile)."""
    at = os.environ.get(FAULT_AT_ENV)
    if not at or at.split(":")[0] != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if ":" in at and int(at.split(":")[1]) != _fault_counts[name]:
        return
    directory = Path(os.environ.get(FAULT_DIR_ENV, "."))
    (directory / f"{name}.reached").write_text(f"{os.getpid()}\n")
    while not (directory / f"{name}.release").exists():
        time.sleep(0.01)
