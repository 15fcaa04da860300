"""Documents -> tokenised, packed blocks of `seq_len` tokens, with a held-out validation slice, and
the deterministic order in which training steps take the blocks.

Each document is tokenised once (with the tokenizer's own special tokens, then EOS). Validation is
held out before packing: the last `val_fraction` of every long document (so that two editions of
one text, as in the demo data, keep the same passages out), and whole short documents chosen by a
stable hash. The two streams are packed into (n, seq_len) blocks separately.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from ..counts import human_count
from ..errors import XecomlaError
from .documents import iter_documents
from .validate import TextCheck


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
