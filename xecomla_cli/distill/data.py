"""The packed training and validation blocks of a run, cached in OUT.run/data.safetensors.

Text is tokenised (or sampled from the teacher) once; a resumed run reads the cache when it was
made with the same data settings, so it trains on exactly the same blocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import console
from ..errors import XecomlaError
from ..text.chat import has_chat_template
from ..text.packing import PackedData, prepare_text_data
from ..text.teacher import round_seed, teacher_samples
from .config import ResolvedConfig, data_parts
from .dist import Dist

TEACHER_SAMPLE_TOKENS = 2_000_000  # at most this many training tokens are sampled from the teacher
GREEDY_ROUND = -1  # the greedy-answer sample's seed is round_seed(seed, -1): its questions are not the others'


def prepare_data(
    cfg: ResolvedConfig, tokenizer, teacher, dist: Dist, cache: Path, log: Callable[[str], None]
) -> PackedData:
    """The packed blocks of this run: read from `cache` when a saved run made them, else made and cached.

    `teacher` is the teacher's transformers model (it writes the text when cfg.data is 'teacher').
    """
    key = {
        "data": cfg.data,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction,
        "val_tokens": cfg.val_tokens,
        "seed": cfg.seed,
        "sample_temperature": cfg.sample_temperature,
    }
    if cfg.greedy_answers:  # (the key of a run without them unchanged)
        key["greedy_answers"] = cfg.greedy_answers
    data = read_cache(cache, key, cfg.data)
    if data is not None:
        log(f"{data.describe()} (cached in {cache})")
        return data
    if cfg.greedy_answers and not has_chat_template(tokenizer):
        raise XecomlaError(
            "--greedy-answers needs --data teacher from a teacher with a chat template (it answers its own "
            "questions): drop it for this teacher"
        )
    parts = data_parts(cfg.data)
    if len(parts) > 1:
        data = mixed_data(cfg, parts, tokenizer, teacher, dist)
    else:
        data = source_data(cfg, tokenizer, teacher, dist)
    if dist.main:
        write_cache(cache, key, data)
    log(data.describe())
    return data


def source_data(cfg: ResolvedConfig, tokenizer, teacher, dist: Dist) -> PackedData:
    """The blocks of one source: sampled from the teacher, or read and tokenised."""
    if cfg.data == "teacher":
        return sample_teacher_data(cfg, tokenizer, teacher, dist)
    budget = cfg.budget_blocks * cfg.seq_len
    with console.status(f"tokenising {cfg.data}"):
        return prepare_text_data(
            cfg.data,
            tokenizer,
            cfg.seq_len,
            val_fraction=cfg.val_fraction,
            val_tokens=cfg.val_tokens,
            max_tokens=max(4 * budget, 10_000_000),
        )


def mixed_data(cfg: ResolvedConfig, parts: list[str], tokenizer, teacher, dist: Dist) -> PackedData:
    """``--data A+B``: each source gives an equal share of the training blocks (a smaller one repeated),
    interleaved A B A B … so that every batch holds each, and of the validation tokens.
    --greedy-answers applies to the teacher's share."""
    k = len(parts)
    per_part = math.ceil(cfg.budget_blocks / k)  # training blocks from each source
    shares = []
    for part in parts:
        part_cfg = dataclasses.replace(
            cfg,
            data=part,
            total_steps=max(1, math.ceil(cfg.total_steps / k)),
            val_tokens=max(cfg.seq_len, cfg.val_tokens // k),
            greedy_answers=cfg.greedy_answers if part == "teacher" else 0.0,
        )
        shares.append(source_data(part_cfg, tokenizer, teacher, dist))
    train = [repeat_to(s.train, per_part) for s in shares]  # k x (per_part, seq_len)
    return PackedData(
        torch.stack(train, dim=1).reshape(k * per_part, cfg.seq_len),
        torch.cat([s.val for s in shares]),
        " + ".join(s.source for s in shares),
        sum(s.documents for s in shares),
        sum(s.tokens for s in shares),
    )


def repeat_to(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The first n blocks, the whole set repeated when it holds fewer."""
    return blocks.repeat(math.ceil(n / blocks.shape[0]), 1)[:n]


def read_cache(cache: Path, key: dict, source: str) -> PackedData | None:
    """The cached blocks, if `cache` exists and was made with the settings `key`."""
    if not cache.is_file():
        return None
    with safe_open(cache, "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("key", "{}")) != key:
        return None
    t = load_file(cache)
    info = json.loads(meta.get("info", "{}"))
    return PackedData(t["train"], t["val"], source, int(info.get("documents", 0)), int(info.get("tokens", 0)))


def write_cache(cache: Path, key: dict, data: PackedData) -> None:
    """Write the blocks atomically (rank 0), with the settings they were made with."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    info = {"documents": data.documents, "tokens": data.tokens}
    tensors = {"train": data.train.contiguous(), "val": data.val.contiguous()}
    save_file(tensors, tmp, metadata={"key": json.dumps(key), "info": json.dumps(info)})
    os.replace(tmp, cache)


def sample_teacher_data(cfg: ResolvedConfig, tokenizer, teacher, dist: Dist) -> PackedData:
    """Blocks of text sampled from the teacher on rank 0 (a progress bar), broadcast to the others.

    With ``cfg.greedy_answers`` = f, a fraction f of the training blocks comes from a second sample
    (its own seed, so other questions) whose answers are greedy: the teacher's own answer, as
    sequence-level KD trains on; validation blocks are always the first sample's."""
    n_val = max(1, cfg.val_tokens // cfg.seq_len)
    n_train = min(cfg.budget_blocks, max(64, TEACHER_SAMPLE_TOKENS // cfg.seq_len))
    n_greedy = round(cfg.greedy_answers * n_train)
    total = n_train + n_val
    out = torch.empty(total, cfg.seq_len, dtype=torch.int64)
    if dist.main:
        with console.make_progress() as progress:
            task = progress.add_task("sampling from the teacher", total=total)
            last = [0]

            def ticker(before: int) -> Callable[[int], None]:
                def tick(done: int) -> None:
                    progress.advance(task, before + done - last[0])
                    last[0] = before + done

                return tick

            def draw(n: int, seed: int, answer_temperature: float | None, before: int) -> torch.Tensor:
                return teacher_samples(
                    teacher,  # sampled from its weights rounded to bf16 (text.teacher.sampling_model)
                    tokenizer,
                    n,
                    cfg.seq_len,
                    batch_size=64 if dist.device.type == "cuda" else 32,
                    temperature=cfg.sample_temperature,
                    seed=seed,
                    answer_temperature=answer_temperature,
                    progress=ticker(before),
                )

            out = draw(total - n_greedy, cfg.seed, None, 0)
            if n_greedy:
                out = torch.cat([out, draw(n_greedy, round_seed(cfg.seed, GREEDY_ROUND), 0.0, total - n_greedy)])
    if dist.distributed:
        out = out.to(dist.device)
        torch.distributed.broadcast(out, 0)
        out = out.cpu()
    source = f"teacher ({n_greedy} of {n_train} training blocks with greedy answers)" if n_greedy else "teacher"
    return PackedData(out[n_val:].clone(), out[:n_val].clone(), source, 0, total * cfg.seq_len)
