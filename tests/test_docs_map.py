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


# The docs map stays honest: every relative link leads to a file (and heading) that exists, the
# README stays short, guide pages stay readable in one sitting, and docs/index.md lists every page.

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 8 * 1024
PAGE_MAX_BYTES = 12 * 1024  # each guide and reference page
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks (``` or ````), where links and headings count."""
    out, fence = [], ""
    for line in text.split("\n"):
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if marker and (not fence or marker.group(1).startswith(fence)):
            fence = "" if fence else marker.group(1)
            continue
        if not fence:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(prose(path.read_text()))
    return [t for t in links if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in markdown_files():
        for target in relative_links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no such heading")
    assert broken == []


def test_the_readme_is_short():
    assert len(README.read_bytes()) <= README_MAX_BYTES


def test_guide_and_reference_pages_are_short():
    pages = sorted((DOCS / "guides").glob("*.md")) + sorted((DOCS / "reference").glob("*.md"))
    assert pages, "docs/guides and docs/reference hold the docs a user reads"
    too_long = [
        f"{p.relative_to(ROOT)}: {len(p.read_bytes())} bytes" for p in pages if len(p.read_bytes()) > PAGE_MAX_BYTES
    ]
    assert too_long == []


def test_the_index_lists_every_page():
    index = DOCS / "index.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for t in relative_links(index)}
    stubs = {DOCS / "index.md"}
    missing = [str(p.relative_to(ROOT)) for p in sorted(DOCS.rglob("*.md")) if p not in listed | stubs]
    assert missing == []


def test_results_are_dated_and_their_json_exists():
    problems = []
    for page in sorted((DOCS / "results").glob("*.md")):
        if not re.match(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md$", page.name):
            problems.append(f"{page.name}: not named YYYY-MM-DD-what.md")
        for name in re.findall(r"bench/results/([\w.-]+\.json)", page.read_text()):
            if not (ROOT / "bench" / "results" / name).is_file():
                problems.append(f"{page.name}: bench/results/{name} does not exist")
    assert problems == []


def test_every_docs_page_the_code_names_exists():
    """Help strings and comments name docs pages (docs/reference/init-methods.md, ...): they must exist."""
    sources = [ROOT / "Makefile", *ROOT.glob("xecomla_cli/**/*.py"), *ROOT.glob("bench/*"), *ROOT.glob("examples/*")]
    sources += [p for p in ROOT.glob("tests/*.py") if p.name != "test_docs_map.py"]
    missing = []
    for src in sources:
        if not src.is_file():
            continue
        for name in re.findall(r"\bdocs/[\w./*-]+\.md\b", src.read_text(errors="replace")):
            if not any(ROOT.glob(name)):
                missing.append(f"{src.relative_to(ROOT)}: {name}")
    assert missing == []


def test_each_command_reference_lists_exactly_its_options():
    """docs/reference/cli-COMMAND.md's tables name every option of the command, and none it lacks."""
    import typer.main

    from xecomla_cli.cli import app

    problems = []
    for name, command in typer.main.get_command(app).commands.items():
        page = DOCS / "reference" / f"cli-{name}.md"
        if not page.is_file():
            problems.append(f"{page.relative_to(ROOT)}: missing")
            continue
        real = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
        listed = set(re.findall(r"^\| `(--[\w-]+)`(?: / `(--[\w-]+)`)?", page.read_text(), re.M))
        documented = {o for pair in listed for o in pair if o} - {"--help"}
        problems += [f"{page.name}: {o} not documented" for o in sorted(real - documented)]
        problems += [f"{page.name}: {o} is not an option of '{name}'" for o in sorted(documented - real)]
    assert problems == []
