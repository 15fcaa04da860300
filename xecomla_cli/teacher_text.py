"""Training text sampled from the teacher itself (``--data teacher``): no dataset needed.

Two kinds, both batched:

* **chat turns**, for a teacher whose tokenizer has a chat template (an instruct model): the
  teacher first writes a user message after the template's user header, then answers it as the
  assistant. Each sample is one whole conversation in the template (system, user, assistant),
  so distillation sees the chat format the model is used with. Conversations are concatenated
  and packed into blocks of ``seq_len`` tokens.
* **plain text**, for any other teacher: ancestral sampling from BOS (or EOS) for ``seq_len``
  tokens; after an EOS the model simply goes on (a new document).

Sampling is the slow part on a CPU, so samples are cached across runs (``cache_dir``, default
``$XDG_CACHE_HOME/xecomla/teacher-text``), keyed by the teacher's weights fingerprint, the kind,
``seq_len``, temperature and seed: a later run asking for as many blocks or fewer reads them back,
and one asking for more samples only the blocks it lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import XecomlaError
from .sampling import sample, sample_next  # noqa: F401 (sample_next: this module's API)

PROMPT_TOKENS = 64  # most tokens of a sampled user message
ANSWER_TOKENS = 320  # most tokens of a sampled answer
CACHE_VERSION = 3  # 2: inverse-CDF sampler; 3: sampling.py (in-place cache, eager attention)


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "xecomla" / "teacher-text"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_header(tokenizer) -> str:
    """The chat template's text before a user message (system prompt included, if the template adds one)."""
    marker = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


def _stop_ids(tokenizer) -> list[int]:
    """Token ids that end a chat turn: EOS and the template's end-of-turn token, when it has one."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def _sample(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, stop: list[int], temperature: float):
    """Up to ``new_tokens`` sampled after left-padded prompts (B, T): ``sampling.sample``."""
    return sample(model, ids, mask, new_tokens, stop, temperature)


def _trim(row: torch.Tensor, stop: list[int]) -> list[int]:
    """A sampled row up to and including its first stop token."""
    tokens = row.tolist()
    for k, t in enumerate(tokens):
        if t in stop:
            return tokens[: k + 1]
    return tokens


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def chat_conversations(model, tokenizer, batch: int, temperature: float) -> list[list[int]]:
    """``batch`` conversations (token ids, in the chat template) written by the teacher: a user
    message sampled after the user header, then the assistant's answer to it."""
    device = next(model.parameters()).device
    stop = _stop_ids(tokenizer)
    header = tokenizer(user_header(tokenizer), add_special_tokens=False)["input_ids"]
    ids, mask = _left_pad([header] * batch, stop[0], device)
    prompts = []
    for row in _sample(model, ids, mask, PROMPT_TOKENS, stop, temperature).cpu():
        text = tokenizer.decode([t for t in _trim(row, stop) if t not in stop], skip_special_tokens=True).strip()
        prompts.append(text or "Hello!")
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    starts = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    ids, mask = _left_pad(starts, stop[0], device)
    answers = _sample(model, ids, mask, ANSWER_TOKENS, stop, temperature).cpu()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return [s + _trim(a, stop) + newline for s, a in zip(starts, answers, strict=True)]


def plain_samples(model, tokenizer, batch: int, seq_len: int, temperature: float) -> list[list[int]]:
    """``batch`` rows of ``seq_len`` tokens sampled from BOS (or EOS); after an EOS the model simply
    goes on (a new document)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise XecomlaError("the tokenizer has neither a BOS nor an EOS token to start teacher samples from")
    ids, mask = _left_pad([[start]] * batch, start, next(model.parameters()).device)
    rows = torch.cat([ids, _sample(model, ids, mask, seq_len - 1, [], temperature)], dim=1)
    return rows.cpu().tolist()


def fingerprint(model, kind: str, seq_len: int, temperature: float, seed: int) -> str:
    """A key for the cache: the teacher's weights (a sample of them) and the sampling settings."""
    h = hashlib.sha256()
    for name, p in list(model.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    h.update(json.dumps([CACHE_VERSION, kind, seq_len, temperature, seed, model.config.vocab_size]).encode())
    return h.hexdigest()[:20]


def teacher_samples(
    model,
    tokenizer,
    n_blocks: int,
    seq_len: int,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(n_blocks, seq_len) token ids sampled from ``model``: chat turns when the tokenizer has a
    chat template (``chat=None``), else plain text. Deterministic for a seed on a device; cached."""
    from safetensors.torch import load_file, save_file

    chat = has_chat_template(tokenizer) if chat is None else chat
    kind = "chat" if chat else "plain"
    cache = Path(cache_dir or default_cache_dir()) / f"{kind}-{fingerprint(model, kind, seq_len, temperature, seed)}"
    cached = cache.with_suffix(".safetensors")
    have = torch.empty(0, seq_len, dtype=torch.int64)
    if cached.is_file():
        blocks = load_file(cached)["blocks"]
        if blocks.shape[1] == seq_len:
            have = blocks
    if have.shape[0] >= n_blocks:
        if progress is not None:
            progress(n_blocks)
        return have[:n_blocks].clone()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    done = have.shape[0]
    tick = None if progress is None else lambda k: progress(done + k)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + done)  # a continuation of the cached blocks draws new samples
        rows = _sample_rows(model, tokenizer, n_blocks - done, seq_len, batch_size, temperature, chat, tick)
    model.train(was_training)
    blocks = torch.cat([have, torch.tensor(rows[: n_blocks - done], dtype=torch.int64)])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    save_file({"blocks": blocks.contiguous()}, tmp)
    os.replace(tmp, cached)
    return blocks


def _sample_rows(model, tokenizer, n_blocks, seq_len, batch_size, temperature, chat, progress) -> list[list[int]]:
    stream: list[int] = []
    rows: list[list[int]] = []
    while len(rows) < n_blocks:
        if chat:
            for conv in chat_conversations(model, tokenizer, batch_size, temperature):
                stream += conv
            while len(stream) >= seq_len and len(rows) < n_blocks:
                rows.append(stream[:seq_len])
                stream = stream[seq_len:]
        else:
            rows += plain_samples(model, tokenizer, min(batch_size, n_blocks - len(rows)), seq_len, temperature)
        if progress is not None:
            progress(min(len(rows), n_blocks))
    return rows
