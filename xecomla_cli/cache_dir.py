"""Where xecomla caches what is slow to make and safe to reuse: ``$XECOMLA_CACHE``, else
``$XDG_CACHE_HOME/xecomla`` (``~/.cache/xecomla`` by default). The tests point it at a temporary
directory. Two caches live there: teacher text (``text.teacher``) and de-quantized GGUF weights
(``dequantized``)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "XECOMLA_CACHE"


def cache_root() -> Path:
    """$XECOMLA_CACHE, else $XDG_CACHE_HOME/xecomla (~/.cache/xecomla)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "xecomla"
