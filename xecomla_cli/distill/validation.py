"""Validation: KL(teacher ‖ student) at T = 1 and both models' perplexity on held-out blocks.

``batch_sums`` scores one batch (the trainer's processes each score a share of the blocks and sum);
``validate`` scores all the blocks in one process, with no optimizer (local distillation).
"""

from __future__ import annotations

import torch

from .kd_loss import next_token_labels, ppl_from_nll
from .module import DistillModule, kd_loss_stats

CPU_MICRO_TOKENS = 2048  # tokens per forward on CPU (memory, not speed, grows with more)


def default_micro_batch(device: torch.device, blocks: int, seq_len: int) -> int:
    """Blocks per forward: all of them on GPU, ~2k tokens on CPU."""
    return blocks if device.type == "cuda" else max(1, CPU_MICRO_TOKENS // seq_len)


@torch.no_grad()
def batch_sums(module: DistillModule, ids: torch.Tensor, teacher_hidden, teacher_head) -> torch.Tensor:
    """(KL sum, student CE sum, teacher CE sum, tokens, labelled tokens) of one batch (B, T), fp64."""
    kl, ce, tce = kd_loss_stats(module, ids, teacher_hidden, teacher_head, next_token_labels(ids))
    counts = torch.tensor([ids.numel(), (ids.shape[1] - 1) * ids.shape[0]], device=ids.device)
    return torch.cat([torch.stack([kl, ce, tce]).double(), counts.double()])


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    kl, ce, tce, n, lab = sums.tolist()
    return {"val_kl": kl / n, "val_ppl": ppl_from_nll(ce, lab), "val_ppl_teacher": ppl_from_nll(tce, lab)}


@torch.no_grad()
def validate(student, teacher, val: torch.Tensor, *, bf16: bool = False) -> dict[str, float]:
    """Mean KL(teacher ‖ student) at T = 1 and both perplexities on the blocks ``val`` (n, T), in
    this process (the student is left in eval mode)."""
    device = next(student.parameters()).device
    module = DistillModule(student, temperature=1.0, ce_weight=0.0, autocast=torch.bfloat16 if bf16 else None)
    student.eval()
    teacher.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for mb in val.split(default_micro_batch(device, len(val), val.shape[1])):
        ids = mb.to(device)
        hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        sums += batch_sums(module, ids, hidden, teacher.lm_head.weight.detach())
    return metrics_from_sums(sums)
