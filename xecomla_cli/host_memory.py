"""How much memory this machine has free now: the check a stage makes before it loads a whole model."""

from __future__ import annotations

import contextlib
from pathlib import Path


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
