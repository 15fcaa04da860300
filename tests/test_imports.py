"""Imports run one way: commands -> stages -> math. No cycle anywhere, lazy imports included; no
stage package (init, distill, evaluate, export) imports another. Imports under ``if TYPE_CHECKING:``
are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xecomla_cli"
STAGES = ("init", "distill", "evaluate", "export")


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (annotation-only imports)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (top-level and inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        skip = type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in files else origin for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "xecomla_cli.commands.init_svd" in graph["xecomla_cli.cli"]
    assert "xecomla_cli.checkpoint" in graph["xecomla_cli.sources"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_commands_imports_them():
    graph = import_graph()
    upward = sorted(
        (m, t)
        for m, deps in graph.items()
        if not m.startswith(("xecomla_cli.commands", "xecomla_cli.cli", "xecomla_cli.__main__"))
        for t in deps
        if t.startswith(("xecomla_cli.commands", "xecomla_cli.cli"))
    )
    assert upward == []


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def stage_crossings(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, target) pairs where a module of one stage package imports another stage's module."""
    return sorted(
        (m, t)
        for m, deps in graph.items()
        for t in deps
        if stage_of(m) is not None and stage_of(t) is not None and stage_of(m) != stage_of(t)
    )


def test_no_stage_imports_another():
    assert stage_crossings(import_graph()) == []


def test_stage_crossings_are_found():
    graph = {
        "xecomla_cli.distill.local": {"xecomla_cli.init.stats", "xecomla_cli.layerwise", "xecomla_cli.distill.config"},
        "xecomla_cli.init.stats": {"xecomla_cli.layerwise"},
    }
    assert stage_crossings(graph) == [("xecomla_cli.distill.local", "xecomla_cli.init.stats")]


def test_type_checking_imports_do_not_count():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nimport b\n")
    skipped = [n for n in ast.walk(tree) if id(n) in type_checking_nodes(tree) and isinstance(n, ast.Import)]
    assert [a.name for n in skipped for a in n.names] == ["a"]
