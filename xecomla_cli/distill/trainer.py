"""The optimizer step, written once for every mode: gradient accumulation over an objective's micro
batches, clipping, AdamW, the LR schedule; and the trainer's resumable state.

One optimizer step, for this process's share of a batch (`objective.Objective` gives the batch,
its micro batches and the loss on each):

    for each micro batch m with share w:     (gradients synchronised on the last one only)
        loss_m, stats_m = objective.loss(m)
        backward(w · loss_m)
    clip the gradient norm (--clip), AdamW step, LR schedule (linear warm-up, cosine decay)

The trainer does no I/O: the loop (`loop.py`) asks it for steps, logs what they return and saves
its state (`state.py`; the trainer is a `state.Resumable`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import XecomlaError
from ..mla.attention import MLAAttention
from .config import RunConfig
from .dist import Dist
from .objective import Objective, Stats


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at the last step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def freeze_non_mla(model) -> int:
    """Train only the MLA attention modules; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for m in model.modules():
        if isinstance(m, MLAAttention):
            for p in m.parameters():
                p.requires_grad_(True)
                n += p.numel()
    if n == 0:
        raise XecomlaError("--freeze-non-mla: the student has no MLA layers to train (is it an init-svd checkpoint?)")
    return n


def adamw(module: nn.Module, cfg: RunConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `module`, weight decay on matrices only."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None
    )


class Trainer:
    """Optimizer steps over an objective's batches, and the resumable state of one run (no I/O)."""

    def __init__(self, objective: Objective, cfg: RunConfig, dist: Dist, *, fused: bool = False):
        self.objective, self.cfg, self.dist = objective, cfg, dist
        self.optimizer = adamw(objective.trained_module, cfg, fused)
        schedule = lr_lambda(cfg.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0

    def train_step(self) -> Stats:
        """One optimizer step on this process's share of the next batch. Returns the step's statistics
        as tensors (no host sync): the objective's, the gradient norm before clipping and the LR."""
        objective = self.objective
        objective.parallel.train()
        batch = objective.batch(self.step)
        micro = objective.micro_batches(batch)
        sums: Stats = {}
        for i, (mb, share) in enumerate(micro):
            with self._no_sync(i < len(micro) - 1):
                loss, stats = objective.loss(mb)
                (loss * share).backward()
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v
        params = [p for p in objective.trained_module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**objective.step_stats(sums, batch), "grad_norm": grad_norm, "lr": torch.tensor(lr)}

    @torch.no_grad()
    def weight_norm(self) -> float:
        """The L2 norm of all trained parameters (collective under FSDP: a host sync)."""
        params = [p.detach() for p in self.objective.trained_module.parameters() if p.requires_grad]
        norm = torch.nn.utils.get_total_norm(params) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    def _no_sync(self, skip: bool):
        """No gradient all-reduce on the micro batches before the last one (DDP, FSDP2)."""
        parallel = self.objective.parallel
        if not skip or not self.dist.distributed:
            return contextlib.nullcontext()
        if hasattr(parallel, "no_sync"):  # DDP
            return parallel.no_sync()
        if hasattr(parallel, "set_requires_gradient_sync"):  # FSDP2

            @contextlib.contextmanager
            def off():
                parallel.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    parallel.set_requires_gradient_sync(True)

            return off()
        return contextlib.nullcontext()

    # ---- state (for resume: state.Resumable) ----------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state dicts on the CPU, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.objective.trained_module, self.optimizer, options=opts)

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], step: int) -> None:
        """Restore `full_state`'s dicts and the schedule at `step` (from this run's --lr: a state whose
        run diverged may resume with a lower one)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        module = self.objective.trained_module
        set_state_dict(module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
        self.step = step
        self.scheduler.last_epoch = step
        groups = zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True)
        for group, base, fn in groups:
            group["initial_lr"] = base
            group["lr"] = base * fn(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
