"""Rolling-window perplexity of held-out documents.

Each document is prefixed with the tokenizer's BOS (else EOS) token, as lm-evaluation-harness's
rolling log-likelihood does, so that every token of it is predicted; windows of ``seq_len`` inputs
advance by ``stride`` (default ``seq_len``: disjoint windows) and a window scores only targets that
no earlier window scored:

    ppl = exp(total NLL / tokens scored)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import XecomlaError
from .scoring import Progress, body, device_of, encode, max_length, noop, prefix_token_id, token_log_probs


@dataclass
class Window:
    inputs: list[int]  # seq[b : end]
    targets: list[int]  # seq[b + 1 : end + 1], the next token of each input
    score_from: int  # targets before this index were scored by an earlier window


def rolling_windows(ids: list[int], prefix: int, seq_len: int, stride: int) -> list[Window]:
    """Windows over [prefix] + ids so that every token of ids is scored exactly once."""
    if not 1 <= stride <= seq_len:
        raise XecomlaError(f"--stride must be between 1 and --seq-len ({seq_len})")
    seq = [prefix] + list(ids)
    n = len(ids)  # targets are seq[1..n]
    windows: list[Window] = []
    begin, scored = 0, 0  # `scored`: targets seq[1..scored] are done
    while scored < n:
        end = min(begin + seq_len, n)
        windows.append(Window(seq[begin:end], seq[begin + 1 : end + 1], scored - begin))
        scored = end
        begin += stride
    return windows


def document_windows(
    tokenizer, documents: list[str], prefix: int, seq_len: int, stride: int, max_tokens: int | None
) -> tuple[list[Window], int]:
    """The windows of every document (at most `max_tokens` tokens in all) and how many documents they cover."""
    windows: list[Window] = []
    used_docs, budget = 0, max_tokens
    for doc in documents:
        ids = encode(tokenizer, doc)
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if ids:
            windows += rolling_windows(ids, prefix, seq_len, stride)
            used_docs += 1
        if budget == 0:
            break
    return windows, used_docs


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    documents: list[str],
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    batch_tokens: int = 8192,
    max_tokens: int | None = None,
    progress: Progress = noop,
) -> dict[str, Any]:
    """exp(mean NLL) over the tokens of `documents` (each scored from its own start).

    Windows are batched up to `batch_tokens` padded tokens per forward pass."""
    seq_len = min(seq_len, max_length(model))
    stride = stride or seq_len
    prefix = prefix_token_id(tokenizer)
    windows, used_docs = document_windows(tokenizer, documents, prefix, seq_len, stride, max_tokens)
    total = sum(len(w.targets) - w.score_from for w in windows)
    if total == 0:
        raise XecomlaError("the perplexity text has no tokens: pass a non-empty --ppl-data file")
    device = device_of(model)
    nll, count = 0.0, 0
    windows.sort(key=lambda w: -len(w.inputs))
    s = 0
    while s < len(windows):
        T = len(windows[s].inputs)  # the longest of this batch (sorted)
        batch = windows[s : s + max(1, batch_tokens // T)]
        s += len(batch)
        # Right padding needs no attention mask: causal attention never looks ahead at the pads.
        ids = torch.full((len(batch), T), prefix, dtype=torch.long)  # (B, T)
        rows, cols, targets = [], [], []
        for i, w in enumerate(batch):
            ids[i, : len(w.inputs)] = torch.tensor(w.inputs)
            for j in range(w.score_from, len(w.targets)):
                rows.append(i)
                cols.append(j)
                targets.append(w.targets[j])
        hidden = body(model)(input_ids=ids.to(device), use_cache=False).last_hidden_state  # (B, T, d)
        lp = token_log_probs(model, hidden[rows, cols], torch.tensor(targets, device=device))
        nll -= float(lp.double().sum())
        count += len(targets)
        progress(len(targets))
    mean = nll / count
    return {
        "tokens": count,
        "documents": used_docs,
        "seq_len": seq_len,
        "stride": stride,
        "nll": round(mean, 6),
        "ppl": round(math.exp(mean), 4),
    }


def count_tokens(tokenizer, documents: list[str], max_tokens: int | None) -> int:
    """How many tokens `perplexity` will score (the length of its progress bar)."""
    total = 0
    for doc in documents:
        total += len(encode(tokenizer, doc))
        if max_tokens is not None and total >= max_tokens:
            return max_tokens
    return total
