"""A data source given as a mix of sources joined by '+' (``teacher+shakespeare``, ``teacher+demo``):
``init-svd --calib-data`` and ``distill --data`` share the tokens evenly among the parts."""

from __future__ import annotations

from pathlib import Path

from ..errors import XecomlaError

MIX = "+"


def mix_parts(value: str, option: str, example: str) -> list[str]:
    """The sources of a mix: 'teacher+demo' -> ['teacher', 'demo']; a path that exists is one source,
    even with a '+' in its name."""
    if MIX not in value or Path(value).expanduser().exists():
        return [value]
    parts = value.split(MIX)
    if any(not p for p in parts) or len(set(parts)) < len(parts):
        raise XecomlaError(f"{option} '{value}': join different sources with one '+', e.g. {example}")
    return parts
