"""The student and the distillation loss in one module (what DDP/FSDP wrap), and its scores."""

from __future__ import annotations

import torch
from torch import nn

from .kd_loss import kd_loss, kd_loss_liger


class DistillModule(nn.Module):
    """The student and the loss in one forward, so DDP/FSDP see every parameter the loss uses."""

    def __init__(
        self,
        student,
        *,
        temperature: float,
        ce_weight: float,
        autocast: torch.dtype | None,
        compile_loss: bool = False,
        kernel: str = "torch",
    ):
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.autocast = autocast
        self.compile_loss = compile_loss
        self.kernel = kernel

    def forward(self, input_ids, teacher_hidden, teacher_weight, labels=None, teacher_ce: bool = False):
        dev = input_ids.device.type
        with torch.autocast(dev, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            h = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, d)
            w = self.student.lm_head.weight  # (V, d)
            if self.kernel == "liger" and torch.is_grad_enabled():
                loss, st = kd_loss_liger(h, w, teacher_hidden, teacher_weight, temperature=self.temperature)
                return loss, st.kl_sum, st.ce_sum, st.teacher_ce_sum
            loss, st = kd_loss(
                h,
                w,
                teacher_hidden,
                teacher_weight,
                labels,
                temperature=self.temperature,
                ce_weight=self.ce_weight,
                compile=self.compile_loss,
                teacher_ce=teacher_ce,
            )
        return loss, st.kl_sum, st.ce_sum, st.teacher_ce_sum


def kd_loss_stats(module: DistillModule, ids, teacher_hidden, teacher_weight, labels):
    """(kl sum, student CE sum, teacher CE sum) at T = 1 on one batch, no gradients."""
    temperature, module.temperature = module.temperature, 1.0
    try:
        _, kl, ce, tce = module(ids, teacher_hidden, teacher_weight, labels, teacher_ce=True)
    finally:
        module.temperature = temperature
    return kl, ce, tce
