"""Where the project's llama.cpp build is: ``make setup`` builds it once into ``<venv>/llama.cpp/bin``
(scripts/setup_llama_cpp.sh: libllama, llama-bench, llama-completion) and installs the ``llama_cpp``
Python bindings over it. ``XECOMLA_LLAMA_CPP`` points at another build's bin directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import XecomlaError

SETUP_HINT = "run `make setup` (builds llama.cpp once, ~6 min on 2 cores)"


def llama_cpp_bin() -> Path:
    """The directory with llama.cpp's libraries and tools."""
    override = os.environ.get("XECOMLA_LLAMA_CPP")
    return Path(override) if override else Path(sys.prefix) / "llama.cpp" / "bin"


def llama_cpp_tool(name: str) -> Path:
    """A llama.cpp program (``llama-bench``, ``llama-completion``) of the project's build."""
    path = llama_cpp_bin() / name
    if not path.is_file():
        raise XecomlaError(f"llama.cpp's {name} is not built at {path.parent}: {SETUP_HINT}")
    return path


def import_llama_cpp():
    """The ``llama_cpp`` bindings, loading the project's llama.cpp libraries."""
    lib = llama_cpp_bin()
    if (lib / "libllama.so").is_file():
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib))
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:
        raise XecomlaError(f"llama.cpp's Python bindings do not load ({type(exc).__name__}): {SETUP_HINT}") from None
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        import_llama_cpp()
    except XecomlaError:
        return False
    return True
