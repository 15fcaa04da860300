"""The distillation trainer: optimizer steps and validation over the student-and-loss module (``module``).

One optimizer step, for this process's share of a batch of packed blocks of T tokens:

    h_t  = teacher body(ids)                     no grad, bf16 weights in a bf16 run
    h_s  = student body(ids)                     bf16 autocast over fp32 master weights (GPU,
                                                 CPUs with AMX)
    loss = T²·KL(p_t ‖ p_s) (+ w·CE)             kd_loss: chunked, logits never all in memory
    backward, (all-reduce), clip, AdamW, LR schedule (linear warm-up, cosine to 10%)

The trainer does no I/O: the run (`run.py`) feeds it blocks, logs what it returns and saves its
state (`state.py`).
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
from .config import ResolvedConfig
from .dist import Dist
from .kd_loss import next_token_labels
from .module import DistillModule
from .validation import batch_sums, default_micro_batch, metrics_from_sums


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


class Trainer:
    """Optimizer steps, validation, and the resumable state of one run (no I/O of its own)."""

    def __init__(self, student, teacher, cfg: ResolvedConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or Dist(device=next(student.parameters()).device)
        self.device = self.dist.device
        autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.trainable = self._prepare_student()
        self.module = DistillModule(
            student,
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            autocast=autocast,
            compile_loss=cfg.compile and self.device.type == "cuda",
            kernel=cfg.kd_kernel,
        )
        self.model: nn.Module = self.module
        if cfg.fsdp:
            self._shard(autocast)
        elif self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.teacher_head = teacher.lm_head.weight.detach()
        self.optimizer = self._optimizer()
        schedule = lr_lambda(cfg.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.step = 0
        self.local_batch = cfg.batch_size // self.dist.world
        default_micro = default_micro_batch(self.device, self.local_batch, cfg.seq_len)
        self.micro = max(1, min(cfg.micro_batch or default_micro, self.local_batch))
        self._teacher_val_hidden: list[torch.Tensor] | None = None

    def _prepare_student(self) -> int:
        """Freezing, activation checkpointing, compilation; returns the number of trainable parameters."""
        cfg, student = self.cfg, self.student
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

    def _shard(self, autocast) -> None:
        """FSDP2: shard every decoder layer and the student's root parameters; teacher layers too."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if autocast:
            mp = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for layer in self.student.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(self.module, mp_policy=mp)
        for layer in self.teacher.model.layers:  # the teacher's root (embeddings, head) stays whole
            fully_shard(layer)

    def _optimizer(self) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (fused on GPU, except under FSDP)."""
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        fused = self.device.type == "cuda" and not cfg.fsdp
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused or None
        )

    # ---- one step ---------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state

    def train_step(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step on this process's blocks (local_batch, T). Returns device tensors
        (no host sync): loss, kl and ce means over this process's tokens, grad norm, lr."""
        self.model.train()
        micro = blocks.split(self.micro)
        n_micro = len(micro)
        kl = torch.zeros((), device=self.device)
        ce = torch.zeros((), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        tokens = labelled = 0
        for i, mb in enumerate(micro):
            ids = mb.to(self.device, non_blocking=True)
            labels = next_token_labels(ids) if self.cfg.ce_weight else None
            th = self.teacher_hidden(ids)
            last = i == n_micro - 1
            with self._no_sync(not last):
                loss, kl_s, ce_s, _ = self.model(ids, th, self.teacher_head, labels)
                (loss * (mb.shape[0] / blocks.shape[0])).backward()
            loss_sum += loss.detach() * mb.shape[0]
            kl += kl_s
            ce += ce_s
            tokens += ids.numel()
            labelled += (ids.shape[1] - 1) * ids.shape[0]
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        if isinstance(grad_norm, torch.Tensor) and hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {
            "loss": loss_sum / blocks.shape[0],
            "kl": kl / tokens,
            "ce": ce / labelled if self.cfg.ce_weight else ce,
            "grad_norm": grad_norm,
            "lr": torch.tensor(lr),
            "tokens": torch.tensor(tokens),
        }

    def _no_sync(self, skip: bool):
        if not skip or not self.dist.distributed:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2

            @contextlib.contextmanager
            def off():
                self.model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.model.set_requires_gradient_sync(True)

            return off()
        return contextlib.nullcontext()

    # ---- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, val: torch.Tensor) -> dict[str, float]:
        """Mean KL(teacher ‖ student) at T = 1 and both models' perplexity on the validation blocks
        (this process's share; summed over processes). The teacher's hidden states are kept."""
        self.model.eval()
        # Shares of ceil(n / world) blocks; a process with fewer batches runs dummy ones whose
        # results are dropped (FSDP processes must all run the same number of forwards).
        share = -(-len(val) // self.dist.world)
        mine = val[self.dist.rank * share : (self.dist.rank + 1) * share]
        batches = list(mine.split(self.micro))
        real = len(batches)
        batches += [val[:1]] * (-(-share // self.micro) - real)
        if self._teacher_val_hidden is None:
            self._teacher_val_hidden = [self.teacher_hidden(mb.to(self.device)) for mb in batches]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # kl, ce, teacher ce, tokens, labelled
        for i, (mb, th) in enumerate(zip(batches, self._teacher_val_hidden, strict=True)):
            batch = batch_sums(self.module, mb.to(self.device), th, self.teacher_head)
            if i < real:  # not a dummy batch
                sums += batch
        self.dist.all_sum(sums)
        self.model.train()
        return metrics_from_sums(sums)

    # ---- state (for resume) -----------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state dicts on the CPU, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.module, self.optimizer, options=opts)

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], step: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_state_dict(self.module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
        self.step = step
        self.scheduler.last_epoch = step
        groups = zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True)
        for group, base, fn in groups:
            group["lr"] = base * fn(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's full state dict, names as in the stage checkpoint (collective under FSDP)."""
        if not self.cfg.fsdp:
            return {k: v for k, v in self.student.state_dict().items()}
        model_sd, _ = self.full_state()
        return {k.removeprefix("student."): v for k, v in model_sd.items()}
