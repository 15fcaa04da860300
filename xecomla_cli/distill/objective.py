"""What a mode of training plugs into the one loop (torchtune's components under a recipe): where
each step's batch comes from and the loss on it. KD (``kd.KDObjective``), DPO and on-policy
distillation (``policy.DPOObjective``, ``policy.OnPolicyObjective``) are each one.

    batch(step)          this process's share of step `step`'s batch: a function of the step alone,
                         so a resumed run reads the same batches
    micro_batches(b)     (micro batch, its share of the step's loss) pairs: gradient accumulation
    loss(micro)          the loss to differentiate (a mean over the micro batch) and its statistics
                         as sums (detached tensors), added up over the micro batches by the trainer
    step_stats(sums, b)  the step's statistics from those sums (tensors: no host sync)

The trainer (``trainer.Trainer``) owns the rest of a step (backward, clipping, AdamW, schedule), the
loop (``loop.train``) the rest of a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..loaded import LoadedModel
from .dist import Dist
from .metrics import TrainHistory

Stats = dict[str, torch.Tensor]


class Objective(ABC):
    """A loss and a batch source for the one loop; `trained_module` holds every trained parameter."""

    dist: Dist
    trained_module: nn.Module  # what the optimizer trains and the resumable state saves (names as saved)
    parallel: nn.Module  # what the loss calls forward on: `trained_module`, or its DDP / FSDP wrapper
    label: str = "loss"  # the progress bar's name of `metric`
    metric: str = "loss"  # the step statistic that the progress bar shows
    tokens_per_step: int | None = None  # training tokens per step, when the batches are blocks of text
    validates: bool = False  # whether `validate` measures anything

    @abstractmethod
    def batch(self, step: int) -> Any:
        """This process's share of step `step`'s batch."""

    @abstractmethod
    def micro_batches(self, batch: Any) -> list[tuple[Any, float]]:
        """The micro batches of `batch` with their shares of the step's loss (summing to 1)."""

    @abstractmethod
    def loss(self, micro: Any) -> tuple[torch.Tensor, Stats]:
        """(the mean loss on `micro`, to differentiate; its statistics as sums over the micro batch)."""

    @abstractmethod
    def step_stats(self, sums: Stats, batch: Any) -> Stats:
        """The step's statistics ("loss" first) from the summed micro-batch statistics."""

    def validate(self) -> dict[str, float] | None:
        """Held-out metrics at the current weights (collective under torchrun), where `validates`; None
        for an objective that measures nothing held out (the loop then asks for none)."""
        return None

    def log_interval(self) -> int:
        """Steps between metrics lines."""
        return 1

    def eval_interval(self) -> int:
        """Steps between validations (besides the ones at the start and the end)."""
        return 0

    @abstractmethod
    def describe(self, ckpt: Path) -> str:
        """One line at the start: what is trained from the student `ckpt` on what, for how long."""

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """The run's section of xecomla.json: the resolved options and what the data was."""

    @abstractmethod
    def summary(self, history: TrainHistory, final_val: dict[str, float] | None, metrics: Path) -> dict[str, Any]:
        """The mode's own final metrics (the loop adds the common ones), from the history or the
        metrics.jsonl at `metrics`."""

    @abstractmethod
    def final_line(self, metrics: dict[str, Any], history: TrainHistory) -> str:
        """One line at the end: what changed."""

    def trained_student(self, loaded: LoadedModel) -> nn.Module | None:
        """The trained student as one model on rank 0 (collective: every process calls it), else None.
        `loaded` is the student as loaded (its model is the one trained, in one process)."""
        return loaded.model if self.dist.main else None
