"""Global knowledge distillation as an objective of the one loop: packed blocks of text as the
batch source, KL(teacher ‖ student) (+ CE) as the loss.

Per micro batch of the step's blocks of T tokens:

    h_t  = teacher body(ids)                     no grad, bf16 weights in a bf16 run
    h_s  = student body(ids)                     bf16 autocast over fp32 master weights (GPU,
                                                 CPUs with AMX)
    loss = T²·KL(p_t ‖ p_s) (+ w·CE)             kd_loss: chunked, logits never all in memory

The student and the loss are one module (`module.DistillModule`: DDP and FSDP see every parameter
the loss uses); under torchrun it is wrapped (DDP, or FSDP2 with --fsdp).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..counts import human_count
from ..loaded import LoadedModel
from ..text.packing import PackedData
from .config import ResolvedConfig
from .dist import Dist
from .kd_loss import next_token_labels
from .metrics import TrainHistory
from .module import DistillModule
from .objective import Objective, Stats
from .output import cpu_model
from .trainer import freeze_non_mla
from .validation import Validator, default_micro_batch


class KDObjective(Objective):
    """The student trained to match the teacher's next-token distributions on blocks of text.

    `blocks(step)` is this process's share (local_batch, T) of step `step`'s training blocks (`local_blocks`);
    `data` the packed data they come from, whose held-out blocks validate (None: no validation, e.g. a
    benchmark)."""

    label, metric = "KL", "kl"

    def __init__(
        self,
        student,
        teacher,
        cfg: ResolvedConfig,
        dist: Dist,
        blocks: Callable[[int], torch.Tensor],
        data: PackedData | None = None,
    ):
        self.cfg, self.dist, self.blocks, self.data = cfg, dist, blocks, data
        self.student = student  # the transformers model being trained
        self.teacher = teacher.eval().requires_grad_(False)
        self.tokens_per_step = cfg.tokens_per_step
        self.local_batch = cfg.batch_size // dist.world
        default_micro = default_micro_batch(dist.device, self.local_batch, cfg.seq_len)
        self.micro = max(1, min(cfg.micro_batch or default_micro, self.local_batch))  # blocks per forward
        autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.trainable = prepare_student(student, cfg)
        self.student_and_loss = DistillModule(
            student,
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            autocast=autocast,
            compile_loss=cfg.compile and dist.device.type == "cuda",
            kernel=cfg.kd_kernel,
        )
        self.trained_module = self.student_and_loss
        self.parallel: nn.Module = self.student_and_loss  # what DDP / FSDP run, or the module itself
        if cfg.fsdp:
            shard(self.student_and_loss, teacher, autocast)
        elif dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.parallel = DistributedDataParallel(self.student_and_loss, device_ids=ids)
        self.teacher_head = teacher.lm_head.weight.detach()
        self.validates = data is not None
        self.validator = Validator(self.student_and_loss, teacher, data.val, dist, self.micro) if data else None

    # ---- the step ---------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        return self.blocks(step)

    def micro_batches(self, batch: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        return [(mb, mb.shape[0] / batch.shape[0]) for mb in batch.split(self.micro)]

    def loss(self, micro: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        ids = micro.to(self.dist.device, non_blocking=True)
        labels = next_token_labels(ids) if self.cfg.ce_weight else None
        with torch.no_grad():
            hidden = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        loss, kl, ce, _ = self.parallel(ids, hidden, self.teacher_head, labels)
        n = ids.shape[0]
        stats = {"loss": loss.detach() * n, "kl": kl, "ce": ce, "tokens": torch.tensor(ids.numel())}
        stats["labelled"] = torch.tensor((ids.shape[1] - 1) * n)
        return loss, stats

    def step_stats(self, sums: Stats, batch: torch.Tensor) -> Stats:
        """Means over this process's tokens: loss, kl and ce (ce over the labelled tokens)."""
        ce = sums["ce"] / sums["labelled"].to(sums["ce"].device) if self.cfg.ce_weight else sums["ce"]
        return {
            "loss": sums["loss"] / batch.shape[0],
            "kl": sums["kl"] / sums["tokens"].to(sums["kl"].device),
            "ce": ce,
        }

    # ---- the run ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        assert self.validator is not None
        return self.validator()

    def log_interval(self) -> int:
        return self.cfg.log_interval(self.dist.device)

    def eval_interval(self) -> int:
        return self.cfg.eval_interval(self.dist.device)

    def describe(self, ckpt: Path) -> str:
        cfg, dist = self.cfg, self.dist
        processes = ""
        if dist.distributed:
            processes = f" x {dist.world} processes" + (" (FSDP)" if cfg.fsdp else " (DDP)")
        epochs = f" ({cfg.budget_blocks / len(self.data.train):.2f} epochs)" if self.data else ""
        return (
            f"distil {ckpt} from {cfg.teacher}: {cfg.total_steps:,} steps x {cfg.batch_size} x {cfg.seq_len} = "
            f"{human_count(cfg.total_steps * cfg.tokens_per_step)} tokens{epochs}, lr {cfg.lr:g}, {cfg.precision}, "
            f"{human_count(self.trainable)} trainable parameters on {dist.device}" + processes
        )

    def record(self) -> dict[str, Any]:
        return run_record(self.cfg, self.dist, self.data)

    def summary(self, history: TrainHistory, final_val: dict[str, float] | None, metrics: Path) -> dict[str, Any]:
        return {"distill_data": self.cfg.data, "distill_teacher": self.cfg.teacher}

    def final_line(self, metrics: dict[str, Any], history: TrainHistory) -> str:
        nan = float("nan")
        return (
            f"val KL {metrics.get('val_kl_initial', nan):.4f} -> {metrics['val_kl']:.4f}, val ppl "
            f"{metrics.get('val_ppl_initial', nan):.2f} -> {metrics['val_ppl']:.2f} (teacher "
            f"{metrics['val_ppl_teacher']:.2f}) after {human_count(metrics['tokens_seen'])} tokens in "
            f"{metrics['distill_seconds']:.0f} s"
        )

    def trained_student(self, loaded: LoadedModel) -> nn.Module | None:
        """The trained student on rank 0; under FSDP its shards gathered into a CPU copy (collective)."""
        if not self.cfg.fsdp:
            return self.student if self.dist.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.student_and_loss, options=opts)
        if not self.dist.main:
            return None
        return cpu_model(loaded, {k.removeprefix("student."): v for k, v in state.items()})


def run_record(cfg: ResolvedConfig, dist: Dist, data: PackedData | None) -> dict[str, Any]:
    """The "distill" section of xecomla.json: the resolved options, the processes and the data."""
    record: dict[str, Any] = {**cfg.to_dict(), "world_size": dist.world}
    if data is not None:
        record |= {"data_tokens": data.tokens, "train_blocks": len(data.train), "val_blocks": len(data.val)}
    return record


def prepare_student(student, cfg: ResolvedConfig) -> int:
    """Freezing, activation checkpointing, compilation; returns the number of trainable parameters."""
    trainable = freeze_non_mla(student) if cfg.freeze_non_mla else sum(p.numel() for p in student.parameters())
    student.train()
    if cfg.grad_checkpointing or cfg.checkpoint_layers is not None:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.checkpoint_layers is not None:  # the others keep their activations (faster, more memory)
            for i, layer in enumerate(student.model.layers):
                layer.gradient_checkpointing = i < cfg.checkpoint_layers
    if cfg.compile:
        for layer in student.model.layers:
            layer.compile()
    return trainable


def shard(student_and_loss: DistillModule, teacher, autocast: torch.dtype | None) -> None:
    """FSDP2: shard every decoder layer and the student's root parameters; teacher layers too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32) if autocast else MixedPrecisionPolicy()
    for layer in student_and_loss.student.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(student_and_loss, mp_policy=mp)
    for layer in teacher.model.layers:  # the teacher's root (embeddings, head) stays whole
        fully_shard(layer)


def local_blocks(train: torch.Tensor, sampler, dist: Dist, local_batch: int) -> Callable[[int], torch.Tensor]:
    """The batch source of a run: step -> this process's share of the step's training blocks."""

    def blocks(step: int) -> torch.Tensor:
        idx = sampler.indices(step)
        return train[idx[dist.rank * local_batch : (dist.rank + 1) * local_batch]]

    return blocks
