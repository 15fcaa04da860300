"""Chat-template helpers shared by everything that samples turns: teacher text, DPO pairs and
on-policy answers. Token rows are plain lists of ids; a batch is left-padded."""

from __future__ import annotations

import torch


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_header(tokenizer) -> str:
    """The chat template's text before a user message (system prompt included, if the template adds one)."""
    marker = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a chat turn: EOS, the template's end-of-turn token, and ChatML's start of the
    next turn, when the tokenizer has them."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def trim_at_stop(row: torch.Tensor, stop: list[int]) -> list[int]:
    """A sampled row up to and including its first stop token."""
    tokens = row.tolist()
    for k, t in enumerate(tokens):
        if t in stop:
            return tokens[: k + 1]
    return tokens


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as ids (B, T) and attention mask (B, T), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)
