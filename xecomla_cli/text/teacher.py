"""Training text sampled from the teacher itself (``--data teacher``): no dataset needed.

Two kinds, both batched:

* **chat turns**, for a teacher whose tokenizer has a chat template (an instruct model): the
  teacher first writes a user message after the template's user header, then answers it as the
  assistant. Each sample is one whole conversation in the template (system, user, assistant),
  so distillation sees the chat format the model is used with. Conversations are concatenated
  and packed into blocks of ``seq_len`` tokens.
* **plain text**, for any other teacher: ancestral sampling from BOS (or EOS) for ``seq_len``
  tokens; after an EOS the model simply goes on (a new document).

Reproducible across machines: the text is sampled from the teacher's weights **rounded to bf16**
(``sampling_model``), whatever dtype or file they were loaded from (bf16 rounding is exact and
the same everywhere), computed in fp32 on a CPU (bf16 on a GPU), with the draws from a CPU
generator seeded by ``seed``. A teacher loaded in fp32 or bf16, from a GGUF file, a Hugging Face
directory or a stage checkpoint of the same weights therefore samples the same text on any CPU
whose kernels sum in the same order (see ``text/sampling.py`` for what stays machine-dependent).

The text is sampled in **rounds**, each with its own draws (``round_seed(seed, index)``): round
``i`` is a batch of ``batch_size`` samples (chat: batches of conversations until they fill at
least one block; the tokens left after the last whole block are dropped), so the blocks of round
``i`` depend only on the settings and ``i``, never on how many blocks earlier runs asked for. The
first N blocks are therefore the same bytes whether one run asked for N, or one asked for fewer and
a later one for more.

Sampling is the slow part on a CPU, so samples are cached across runs (``cache_dir``, default
``$XECOMLA_CACHE/teacher-text``, else ``$XDG_CACHE_HOME/xecomla/teacher-text``), keyed
(``cache_key``) by exactly what they are sampled from, those bf16 weights, and the kind,
``seq_len``, temperature, seed and batch size: a later run asking for as many blocks or fewer
reads them back, and one asking for more samples only the rounds it lacks. The cache is written
(atomically) after every round, so an interrupted run loses at most one round; two runs sampling
the same key at once write the same bytes, and each takes up the rounds the other wrote.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..cache_dir import cache_root
from ..errors import XecomlaError
from .chat import has_chat_template, left_pad, stop_ids, trim_at_stop, user_header
from .sampling import sample

PROMPT_TOKENS = 64  # most tokens of a sampled user message
ANSWER_TOKENS = 320  # most tokens of a sampled answer
CACHE_VERSION = 5  # 2: inverse-CDF sampler; 3: sampling.py (in-place cache, eager attention); 4: bf16 weights;
# 5: rounds seeded by their index (the same blocks whatever the request history)
KEY_ELEMENTS = 1 << 20  # most elements of one tensor that the cache key hashes (evenly spaced)


def default_cache_dir() -> Path:
    """``cache_root()``/teacher-text."""
    return cache_root() / "teacher-text"


def chat_conversations(
    model, tokenizer, batch: int, temperature: float, generator=None, answer_temperature: float | None = None
) -> list[list[int]]:
    """``batch`` conversations (token ids, in the chat template) written by the teacher: a user
    message sampled after the user header at ``temperature``, then the assistant's answer to it at
    ``answer_temperature`` (default: the same; 0: greedy, the teacher's own answer, as in
    sequence-level KD)."""
    device = next(model.parameters()).device
    stop = stop_ids(tokenizer)
    header = tokenizer(user_header(tokenizer), add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([header] * batch, stop[0], device)
    prompts = []
    for row in sample(model, ids, mask, PROMPT_TOKENS, stop, temperature, generator=generator).cpu():
        text = tokenizer.decode([t for t in trim_at_stop(row, stop) if t not in stop], skip_special_tokens=True).strip()
        prompts.append(text or "Hello!")
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    starts = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]
    ids, mask = left_pad(starts, stop[0], device)
    answer_t = temperature if answer_temperature is None else answer_temperature
    answers = sample(model, ids, mask, ANSWER_TOKENS, stop, answer_t, generator=generator).cpu()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return [s + trim_at_stop(a, stop) + newline for s, a in zip(starts, answers, strict=True)]


def plain_samples(model, tokenizer, batch: int, seq_len: int, temperature: float, generator=None) -> list[list[int]]:
    """``batch`` rows of ``seq_len`` tokens sampled from BOS (or EOS); after an EOS the model simply
    goes on (a new document)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise XecomlaError("the tokenizer has neither a BOS nor an EOS token to start teacher samples from")
    ids, mask = left_pad([[start]] * batch, start, next(model.parameters()).device)
    rows = torch.cat([ids, sample(model, ids, mask, seq_len - 1, [], temperature, generator=generator)], dim=1)
    return rows.cpu().tolist()


def cache_key(
    model, kind: str, seq_len: int, temperature: float, seed: int, batch_size: int = 16, answer_temperature=None
) -> str:
    """A key for the cache: the teacher's weights as text is sampled from them (rounded to bf16, so
    the same for any load dtype, file format or path), and the sampling settings (the batch size
    too: the rows of a batch share one stream of draws).

    Per tensor, in name order: its name, shape and up to KEY_ELEMENTS evenly spaced elements as
    bf16 bits (every element of a tensor that small; ~0.1 s for the 135M demo model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)
        step = max(1, math.ceil(flat.numel() / KEY_ELEMENTS))
        h.update(json.dumps([name, list(p.shape), step]).encode())
        h.update(flat[::step].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    settings = [CACHE_VERSION, kind, seq_len, float(temperature), seed, batch_size, model.config.vocab_size]
    if answer_temperature is not None:  # answers at their own temperature (keys of the others unchanged)
        settings.append(float(answer_temperature))
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:20]


def round_seed(seed: int, index: int) -> int:
    """The seed of round ``index`` of the sample seeded ``seed``: its own draws, whatever was
    sampled before it (a hash, so no two (seed, index) pairs share draws)."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, index]).encode()).digest()[:7], "big")


def sampling_model(model):
    """The teacher that text is sampled from: its weights rounded to bf16, held in fp32 on a CPU
    (fp32 products are exact-order on every CPU; bf16 ones need AMX to be fast and round
    activations) and in bf16 on a GPU. `model` itself when it already is that, else a copy.

    Rounding to bf16 is the one canonical form an fp32 and a bf16 load of the same weights share
    (a float16 load rounds twice and may differ in the last bit of a few weights)."""
    device = next(model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if all(p.dtype == dtype == torch.bfloat16 for p in model.parameters() if p.is_floating_point()):
        return model
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16).to(dtype)
    return out


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
    answer_temperature: float | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(n_blocks, seq_len) token ids sampled from ``model``: chat turns when the tokenizer has a
    chat template (``chat=None``), else plain text. Chat answers at ``answer_temperature`` (default:
    ``temperature``; 0: greedy). Deterministic for the settings on a device, whatever was asked
    before (rounds, above); cached."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    kind = "chat" if chat else "plain"
    if answer_temperature is not None and not chat:
        raise XecomlaError("answers at their own temperature need a teacher with a chat template")
    key = cache_key(model, kind, seq_len, temperature, seed, batch_size, answer_temperature)
    cached = (Path(cache_dir or default_cache_dir()) / f"{kind}-{key}").with_suffix(".safetensors")
    blocks, rounds = _read_cache(cached, seq_len)
    if blocks.shape[0] < n_blocks:
        sampler = sampling_model(model)
        was_training = sampler.training
        sampler.eval()
        while blocks.shape[0] < n_blocks:
            on_disk = _read_cache(cached, seq_len)
            if on_disk[1] > rounds:  # another run sampling the same text got further: take its rounds
                blocks, rounds = on_disk
                continue
            generator = torch.Generator().manual_seed(round_seed(seed, rounds))
            temperatures = (temperature, answer_temperature)
            rows = _sample_round(sampler, tokenizer, seq_len, batch_size, temperatures, chat, generator)
            blocks, rounds = torch.cat([blocks, torch.tensor(rows, dtype=torch.int64)]), rounds + 1
            _write_cache(cached, blocks, rounds)
            if progress is not None:
                progress(min(blocks.shape[0], n_blocks))
        sampler.train(was_training)
    elif progress is not None:
        progress(n_blocks)
    return blocks[:n_blocks].clone()


def _read_cache(path: Path, seq_len: int) -> tuple[torch.Tensor, int]:
    """The cached blocks (N, seq_len) and how many rounds made them; none when absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            blocks, rounds = f.get_tensor("blocks"), int((f.metadata() or {})["rounds"])
    except (OSError, KeyError, ValueError, SafetensorError):  # absent, without rounds, or damaged
        return torch.empty(0, seq_len, dtype=torch.int64), 0
    if blocks.ndim != 2 or blocks.shape[1] != seq_len:
        return torch.empty(0, seq_len, dtype=torch.int64), 0
    return blocks, rounds


def _write_cache(path: Path, blocks: torch.Tensor, rounds: int) -> None:
    """Written to a temp file, then renamed: readers never see half a cache. Not written when the
    file already holds as many rounds (another run sampling the same text got as far). A cache
    that cannot be written (read-only, disk full) only costs the next run the sampling time."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if _read_cache(path, blocks.shape[1])[1] >= rounds:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"blocks": blocks.contiguous()}, tmp, metadata={"rounds": str(rounds)})
        os.replace(tmp, path)
    except (OSError, SafetensorError):
        tmp.unlink(missing_ok=True)


def _sample_round(model, tokenizer, seq_len, batch_size, temperatures, chat, generator) -> list[list[int]]:
    """One round's blocks: ``batch_size`` plain rows, or whole conversations (in batches) until they
    fill at least one block of ``seq_len``; the tail after the last whole block is dropped.
    ``temperatures``: (the text's or user messages', the answers' or None for the same)."""
    temperature, answer_temperature = temperatures
    if not chat:
        return plain_samples(model, tokenizer, batch_size, seq_len, temperature, generator)
    stream: list[int] = []
    while len(stream) < seq_len:
        for conv in chat_conversations(model, tokenizer, batch_size, temperature, generator, answer_temperature):
            stream += conv
    return [stream[k : k + seq_len] for k in range(0, len(stream) - seq_len + 1, seq_len)]
