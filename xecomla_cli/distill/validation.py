"""Validation: KL(teacher ‖ student) at T = 1 and both models' perplexity on held-out blocks.

``Validator`` scores the held-out blocks, each process a share (summed over processes), for global KD
and ``--local`` alike; the teacher's hidden states are computed once and kept for the next validation.
"""

from __future__ import annotations

import torch

from .dist import Dist
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


class Validator:
    """Mean KL(teacher ‖ student) at T = 1 and both models' perplexity on the blocks `val` (n, T)."""

    def __init__(self, student_and_loss: DistillModule, teacher, val: torch.Tensor, dist: Dist, micro: int):
        self.student_and_loss, self.teacher, self.val, self.dist, self.micro = (
            student_and_loss,
            teacher,
            val,
            dist,
            micro,
        )
        self.teacher_head = teacher.lm_head.weight.detach()
        self._teacher_hidden: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        """The metrics at the student's current weights (collective under torchrun)."""
        module, dist, val, device = self.student_and_loss, self.dist, self.val, self.dist.device
        was_training = module.training
        module.eval()
        # Shares of ceil(n / world) blocks; a process with fewer batches runs dummy ones whose
        # results are dropped (FSDP processes must all run the same number of forwards).
        share = -(-len(val) // dist.world)
        mine = val[dist.rank * share : (dist.rank + 1) * share]
        batches = list(mine.split(self.micro))
        real = len(batches)
        batches += [val[:1]] * (-(-share // self.micro) - real)
        if self._teacher_hidden is None:
            self._teacher_hidden = [
                self.teacher.model(input_ids=mb.to(device), use_cache=False).last_hidden_state for mb in batches
            ]
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # kl, ce, teacher ce, tokens, labelled
        for i, (mb, hidden) in enumerate(zip(batches, self._teacher_hidden, strict=True)):
            batch = batch_sums(module, mb.to(device), hidden, self.teacher_head)
            if i < real:  # not a dummy batch
                sums += batch
        dist.all_sum(sums)
        module.train(was_training)
        return metrics_from_sums(sums)
