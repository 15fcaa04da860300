"""Token counts as people write them: '50k' in, '1.5M' out."""

from __future__ import annotations

import re

from .errors import XecomlaError

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int | None, name: str = "--tokens") -> int | None:
    """'50k' -> 50000, '2M' -> 2000000, '1.5B' -> 1500000000; plain integers pass through."""
    if text is None or isinstance(text, int):
        return text
    m = _COUNT.match(str(text))
    if not m:
        raise XecomlaError(f"{name} '{text}' is not a count: write e.g. 50000, 50k, 2M or 1.5B")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise XecomlaError(f"{name} '{text}' must be at least 1")
    return int(round(value))


def human_count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)
