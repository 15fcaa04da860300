"""Text is text: a document that is not valid UTF-8, or whose tokens are mostly byte fallback or
unknown, is dropped before it is trained, calibrated or evaluated on; a source left with nothing is
refused with one line.

Every place text enters (``--data``, ``--calib-data``, ``--ppl-data``, preference data) reads
files with ``errors="surrogateescape"``, so that bytes which are not UTF-8 survive as lone
surrogates (U+DC80-U+DCFF) instead of silently becoming U+FFFD, and then filters its documents:

    check = TextCheck(tokenizer, "--data 'garbage.txt'")
    for text in documents:
        if not check.text(text):          # not UTF-8: dropped
            continue
        ids = tokenizer(text)["input_ids"]
        if not check.tokens(ids):         # more than MAX_JUNK_FRACTION byte/unknown tokens: dropped
            continue
        ...
    check.finish(log)                     # one line saying how many were dropped; refuses when all were

A token is *junk* when it is the tokenizer's unknown token, a SentencePiece byte-fallback token
(``<0xAB>``), or decodes on its own to U+FFFD (a byte-level BPE piece of an incomplete UTF-8
character). Ordinary text in any script the tokenizer knows has few; random bytes or binary data
decoded as text have mostly these.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable

from .. import console
from ..errors import XecomlaError

MAX_JUNK_FRACTION = 0.5  # a document with more than this share of byte-fallback/unknown tokens is dropped
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def is_utf8(text: str) -> bool:
    """Whether a string read with errors='surrogateescape' came from valid UTF-8."""
    return _NOT_UTF8.search(text) is None


class JunkTokens:
    """Which token ids of a tokenizer are unknown or byte fallback (decided once per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.unk = getattr(tokenizer, "unk_token_id", None)
        self._junk: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        junk = self._junk.get(token_id)
        if junk is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            junk = (
                token_id == self.unk
                or bool(piece and _BYTE_TOKEN.match(piece))
                or "\ufffd" in self.tokenizer.decode([token_id])
            )
            self._junk[token_id] = junk
        return junk

    def fraction(self, ids: Iterable[int], special: set[int] | None = None) -> float:
        ids = [i for i in ids if i not in (special or set())]
        return sum(map(self, ids)) / len(ids) if ids else 0.0


@functools.lru_cache(maxsize=4)
def junk_tokens(tokenizer) -> JunkTokens:
    """One `JunkTokens` per tokenizer (its per-id decisions are kept)."""
    return JunkTokens(tokenizer)


class TextCheck:
    """Counts and drops the documents of one text source that are not text (see the module docstring)."""

    def __init__(self, tokenizer, what: str, threshold: float = MAX_JUNK_FRACTION):
        self.what = what
        self.threshold = threshold
        self.junk = junk_tokens(tokenizer) if tokenizer is not None else None
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])
        self.seen = self.not_utf8 = self.mostly_junk = 0

    @property
    def dropped(self) -> int:
        return self.not_utf8 + self.mostly_junk

    def text(self, text: str) -> bool:
        """Count a document; False (dropped) when it is not valid UTF-8."""
        self.seen += 1
        if is_utf8(text):
            return True
        self.not_utf8 += 1
        return False

    def tokens(self, ids: Iterable[int]) -> bool:
        """False (dropped) when more than the threshold of the document's tokens are byte fallback or unknown."""
        if self.junk is None or self.junk.fraction(ids, self.special) <= self.threshold:
            return True
        self.mostly_junk += 1
        return False

    def summary(self) -> str:
        return (
            f"{self.dropped:,} of {self.seen:,} documents of {self.what} dropped: {self.not_utf8:,} not valid "
            f"UTF-8, {self.mostly_junk:,} with more than {self.threshold:.0%} byte-fallback or unknown tokens"
        )

    def finish(self, log: Callable[[str], None] = console.log) -> None:
        """Refuse the source when every document was dropped; else say on stderr how many were (if any)."""
        if self.seen and self.dropped == self.seen:
            raise XecomlaError(f"{self.summary()}: that is not text; pass UTF-8 text")
        if self.dropped:
            log(f"[yellow]{self.summary()}[/]")


def text_documents_only(documents: Iterable[str], tokenizer, what: str) -> list[str]:
    """The documents that are text (both checks), with `TextCheck.finish`'s line or refusal."""
    check = TextCheck(tokenizer, what)
    kept = [
        d
        for d in documents
        if check.text(d) and (tokenizer is None or check.tokens(tokenizer(d, add_special_tokens=False)["input_ids"]))
    ]
    check.finish()
    return kept


def check_text(text: str, tokenizer, where: str, threshold: float = MAX_JUNK_FRACTION) -> str:
    """One document (e.g. a preference pair's prompt or answer) that must be text: returned as it is,
    or one line naming `where` when it is not valid UTF-8 or mostly byte-fallback/unknown tokens."""
    if not is_utf8(text):
        raise XecomlaError(f"{where} is not valid UTF-8 text: fix or drop it")
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        fraction = junk_tokens(tokenizer).fraction(ids)
        if fraction > threshold:
            raise XecomlaError(
                f"{where} is {fraction:.0%} byte-fallback or unknown tokens (more than {threshold:.0%}): "
                "it is not text this tokenizer reads; fix or drop it"
            )
    return text
