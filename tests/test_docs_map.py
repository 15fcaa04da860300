"""docs/development.md's code map names every module of the tree (and nothing that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_map() -> str:
    """The map of the package: from 'xecomla_cli/' to the 'tests/' line."""
    text = (ROOT / "docs" / "development.md").read_text()
    start = text.index("```\nxecomla_cli/")
    return text[start : text.index("\ntests/", start)]


def test_the_map_names_every_module():
    block = code_map()
    words = set(re.findall(r"[A-Za-z_][\w]*", block))
    package = ROOT / "xecomla_cli"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.stem in ("__init__", "__main__") or "__pycache__" in path.parts:
            continue
        if path.stem not in words:
            missing.append(str(path.relative_to(ROOT)))
    for sub in sorted(p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if f"{sub.name}/" not in block:
            missing.append(f"{sub.name}/")
    assert missing == []


def test_the_map_names_no_module_that_is_gone():
    block = code_map()
    named = re.findall(r"\b([a-z_]+)\.py\b", block)
    files = {p.stem for p in (ROOT / "xecomla_cli").rglob("*.py")}
    assert sorted(set(named) - files) == []
