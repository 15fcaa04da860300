"""The student and its teacher, loaded for distillation: one vocabulary between them."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import console
from ..errors import XecomlaError
from ..loaded import LoadedModel
from ..sources import load_model
from .config import ResolvedConfig


def load_models(
    ckpt: Path, cfg: ResolvedConfig, device: torch.device, teacher_dtype: str | None = None
) -> tuple[LoadedModel, LoadedModel]:
    """(student, teacher) on `device`: the student in fp32 (master weights), the teacher in the
    run's precision unless `teacher_dtype` says; refused when their tokenizers differ."""
    with console.status(f"loading student {ckpt}"):
        student = load_model(str(ckpt), dtype="float32", device=str(device))
    teacher_dtype = teacher_dtype or ("bfloat16" if cfg.precision == "bf16" else "float32")
    with console.status(f"loading teacher {cfg.teacher}"):
        teacher = load_model(cfg.teacher, dtype=teacher_dtype, device=str(device), allow_pickle=cfg.allow_pickle)
    check_same_tokenizer(student.tokenizer, teacher.tokenizer, cfg.teacher)
    return student, teacher


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Next-token distributions can only be compared over one vocabulary."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sum(1 for k, v in s.items() if t.get(k) != v) + abs(len(t) - len(s))
        raise XecomlaError(
            f"teacher '{teacher}' has a different tokenizer from the student ({len(t):,} vs {len(s):,} tokens, "
            f"{diff:,} differ): KL distillation needs one vocabulary; pick a teacher of the same model family"
        )
