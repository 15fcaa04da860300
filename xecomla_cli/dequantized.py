"""A GGUF source's de-quantized weights and tokenizer, kept as a Hugging Face directory.

transformers de-quantizes a GGUF file in numpy and converts its tokenizer on every load: 10.6 s
for the demo's SmolLM2-135M (Q4_1), against 0.3 s for the same weights as safetensors. The first
load of a GGUF file saves what transformers made of it (fp32 safetensors, config, tokenizer) under
``cache_root()/gguf/``; later loads read that directory instead. The key is the file's real path,
size and modification time and the transformers version (whose conversion this is), so an edited
or replaced file, or another transformers, makes a new entry. The entry is written to a temporary
directory and renamed into place, so a killed or concurrent run never leaves a partial one; a
cache that cannot be written (read-only home, full disk) only costs the time it would have saved.
Delete the directory to reclaim the space (538 MB for the demo).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .cache_dir import cache_root

VERSION = 2  # of the entry's layout (2: the tokenizer's special tokens from the GGUF metadata)


def cache_entry(gguf: Path) -> Path:
    """The cache directory of one GGUF file (whether or not it exists yet)."""
    import transformers

    st = os.stat(gguf)
    ident = f"{VERSION}|{os.path.realpath(gguf)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def cached(gguf: Path) -> Path | None:
    """The cache entry of ``gguf`` if a complete one exists."""
    entry = cache_entry(gguf)
    return entry if (entry / "config.json").is_file() else None


def store(gguf: Path, model, tokenizer) -> Path | None:
    """Save an fp32 model and its tokenizer loaded from ``gguf`` as its cache entry; None if the cache
    cannot be written (the run goes on without it)."""
    entry = cache_entry(gguf)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, entry)  # atomic; fails if another run got there first (its entry is as good)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return cached(gguf)
    return entry
