"""The student and its teacher, loaded for distillation: one vocabulary between them."""

from __future__ import annotations

import torch

from .. import console
from ..checkpoint import CheckpointInfo, load_checkpoint
from ..errors import XecomlaError
from ..loaded import LoadedModel
from ..sources import load_model


def load_models(
    student_ckpt: CheckpointInfo,
    teacher: str | None,
    device: torch.device,
    *,
    teacher_dtype: str = "float32",
    allow_pickle: bool = False,
) -> tuple[LoadedModel, LoadedModel | None]:
    """(student, teacher) on `device`: the student in fp32 (master weights) from its checkpoint as
    read once, the teacher (frozen, in `teacher_dtype`; none when `teacher` is None); refused when
    their tokenizers differ."""
    with console.status(f"loading student {student_ckpt.path}"):
        student = load_checkpoint(student_ckpt.directory, dtype="float32", device=str(device), info=student_ckpt)
    if teacher is None:
        return student, None
    with console.status(f"loading teacher {teacher}"):
        loaded = load_model(teacher, dtype=teacher_dtype, device=str(device), allow_pickle=allow_pickle)
    loaded.model.eval().requires_grad_(False)
    check_same_tokenizer(student.tokenizer, loaded.tokenizer, teacher)
    return student, loaded


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Next-token distributions can only be compared over one vocabulary."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sum(1 for k, v in s.items() if t.get(k) != v) + abs(len(t) - len(s))
        raise XecomlaError(
            f"teacher '{teacher}' has a different tokenizer from the student ({len(t):,} vs {len(s):,} tokens, "
            f"{diff:,} differ): KL distillation needs one vocabulary; pick a teacher of the same model family"
        )
