"""Knowledge distillation of an MLA student from a teacher (single process, or torchrun DDP/FSDP).

One optimizer step, for a global batch of B packed blocks of T tokens:

    h_t  = teacher body(ids)                     no grad, bf16 weights on GPU
    h_s  = student body(ids)                     bf16 autocast over fp32 master weights on GPU
    loss = T²·KL(p_t ‖ p_s) (+ w·CE)             kd_loss: chunked, logits never all in memory
    backward, (all-reduce), clip, AdamW, LR schedule (linear warm-up, cosine to 10%)

Data positions are a function of the step (`BlockSampler`), so a run resumed from a saved state
(model, optimizer, scheduler, RNG, step) continues exactly where the killed run stopped.

Files, for an output directory OUT:
    OUT.run/metrics.jsonl     one JSON object per logged step / validation, while training
    OUT.run/data.safetensors  the packed blocks (tokenised once, reused on resume)
    OUT.run/state/            the resumable state, written atomically every --save-every steps
    OUT/                      the final stage checkpoint (+ metrics.jsonl); OUT.run is removed
Under torchrun every rank computes, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import console
from .data import BlockSampler, PackedData, human_count, steps_for_tokens
from .errors import XecomlaError
from .kd_loss import kd_loss, next_token_labels, perplexity

STATE_VERSION = 1
# Settings a resumed run must share with the run that saved the state.
RESUME_KEYS = ("teacher", "data", "seq_len", "batch_size", "total_steps", "lr", "min_lr_ratio", "warmup",
               "weight_decay", "betas", "clip", "temperature", "ce_weight", "freeze_non_mla", "seed")  # fmt: skip


@dataclass
class DistillConfig:
    """Everything that shapes a distillation run (the CLI's options)."""

    teacher: str | None = None  # default: the checkpoint's source model
    data: str = "auto"  # 'auto' = 'demo' when installed, else 'teacher'
    tokens: int | None = None  # budget in training tokens ...
    steps: int | None = None  # ... or in optimizer steps
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimizer step, all processes together
    micro_batch: int | None = None  # sequences per forward/backward on one process (default: all on GPU)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # < 1: fraction of the steps; >= 1: number of steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    freeze_non_mla: bool = False
    grad_checkpointing: bool = False
    checkpoint_layers: int | None = None  # with grad_checkpointing: only the first n decoder layers
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    fsdp: bool = False
    compile: bool = False  # torch.compile the decoder layers and the loss math
    kd_kernel: str = "torch"  # torch (kd_loss) | liger (Liger-Kernel's fused linear JSD; GPU, no CE)
    save_every: int = 1000  # steps between resumable states (0: never)
    eval_every: int | None = None  # steps between validations (default: total/4 on GPU, total/2 on CPU)
    log_every: int | None = None  # steps between metric lines (default: 1 on CPU, 10 on GPU)
    val_fraction: float = 0.02
    val_tokens: int | None = None  # default: 4k on CPU, 64k on GPU
    sample_temperature: float = 1.0  # --data teacher
    seed: int = 0
    total_steps: int = 0  # resolved from tokens/steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---- distributed set-up ----------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; start the process group (NCCL on GPU, gloo on CPU)."""
    from .loaded import parse_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=parse_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


# ---- model helpers ---------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise XecomlaError(f"--precision must be auto, bf16 or fp32 (got '{precision}')")
    return precision


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Next-token distributions can only be compared over one vocabulary."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sum(1 for k, v in s.items() if t.get(k) != v) + abs(len(t) - len(s))
        raise XecomlaError(
            f"teacher '{teacher}' has a different tokenizer from the student ({len(t):,} vs {len(s):,} tokens, "
            f"{diff:,} differ): KL distillation needs one vocabulary; pick a teacher of the same model family"
        )


def freeze_non_mla(model) -> int:
    """Train only the MLA attention modules; returns the number of trainable parameters."""
    from .mla.attention import MLAAttention

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


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at the last step."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def warmup_steps(cfg: DistillConfig) -> int:
    w = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * cfg.total_steps
    return max(1, min(int(round(w)), cfg.total_steps))


class DistillModule(nn.Module):
    """The student and the loss in one forward, so DDP/FSDP see every parameter the loss uses."""

    def __init__(self, student, *, temperature: float, ce_weight: float, autocast: torch.dtype | None,
                 compile_loss: bool = False, kernel: str = "torch"):  # fmt: skip
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
            if self.kernel == "liger" and torch.is_grad_enabled():
                from .kd_loss import kd_loss_liger

                loss, st = kd_loss_liger(h, self.student.lm_head.weight, teacher_hidden, teacher_weight,
                                         temperature=self.temperature)  # fmt: skip
                return loss, st.kl_sum, st.ce_sum, st.teacher_ce_sum
            loss, st = kd_loss(h, self.student.lm_head.weight, teacher_hidden, teacher_weight, labels,
                               temperature=self.temperature, ce_weight=self.ce_weight, compile=self.compile_loss,
                               teacher_ce=teacher_ce)  # fmt: skip
        return loss, st.kl_sum, st.ce_sum, st.teacher_ce_sum


# ---- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Optimizer steps, validation, and the resumable state of one run (no I/O of its own)."""

    def __init__(self, student, teacher, cfg: DistillConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or Dist(device=next(student.parameters()).device)
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.trainable = freeze_non_mla(student) if cfg.freeze_non_mla else sum(p.numel() for p in student.parameters())
        student.train()
        if cfg.grad_checkpointing or cfg.checkpoint_layers is not None:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.checkpoint_layers is not None:  # the others keep their activations (faster, more memory)
                for i, layer in enumerate(student.model.layers):
                    layer.gradient_checkpointing = i < cfg.checkpoint_layers
        if cfg.compile:
            for layer in student.model.layers:
                layer.compile()
        self.module = DistillModule(student, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                    autocast=autocast, compile_loss=cfg.compile and self.device.type == "cuda",
                                    kernel=cfg.kd_kernel)  # fmt: skip
        self.model: nn.Module = self.module
        if cfg.fsdp:
            self._shard(autocast)
        elif self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.teacher_head = teacher.lm_head.weight.detach()
        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        fused = self.device.type == "cuda" and not cfg.fsdp
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=1e-8, fused=fused or None)  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.total_steps, warmup_steps(cfg), cfg.min_lr_ratio)
        )
        self.step = 0
        self.local_batch = cfg.batch_size // self.dist.world
        # Default micro-batch: the whole batch on GPU; on CPU ~2k tokens (memory, not speed, grows with it).
        default_micro = self.local_batch if self.device.type == "cuda" else max(1, 2048 // cfg.seq_len)
        self.micro = max(1, min(cfg.micro_batch or default_micro, self.local_batch))
        self._teacher_val_hidden: list[torch.Tensor] | None = None

    def _shard(self, autocast) -> None:
        """FSDP2: shard every decoder layer and the student's root parameters; teacher layers too."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32) if autocast else MixedPrecisionPolicy()
        for layer in self.student.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(self.module, mp_policy=mp)
        for layer in self.teacher.model.layers:  # the teacher's root (embeddings, head) stays whole
            fully_shard(layer)

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
        return {"loss": loss_sum / blocks.shape[0], "kl": kl / tokens, "ce": ce / labelled if self.cfg.ce_weight else ce,
                "grad_norm": grad_norm, "lr": torch.tensor(lr), "tokens": torch.tensor(tokens)}  # fmt: skip

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
        first = self._teacher_val_hidden is None
        if first:
            self._teacher_val_hidden = [self.teacher_hidden(mb.to(self.device)) for mb in batches]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # kl, ce, teacher ce, tokens, labelled
        for i, (mb, th) in enumerate(zip(batches, self._teacher_val_hidden, strict=True)):
            ids = mb.to(self.device)
            labels = next_token_labels(ids)
            st = kd_loss_stats(self.module, ids, th, self.teacher_head, labels)
            if i >= real:
                continue  # a dummy batch
            sums += torch.stack([st[0], st[1], st[2], torch.tensor(ids.numel(), device=self.device),
                                 torch.tensor((ids.shape[1] - 1) * ids.shape[0], device=self.device)]).double()  # fmt: skip
        self.dist.all_sum(sums)
        kl, ce, tce, n, lab = sums.tolist()
        self.model.train()
        return {"val_kl": kl / n, "val_ppl": perplexity(ce, lab), "val_ppl_teacher": perplexity(tce, lab)}

    # ---- state (for resume) -----------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) model and optimizer state dicts on the CPU, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.module, self.optimizer, options=opts)

    def load_full_state(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, Any], step: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))  # fmt: skip
        self.step = step
        self.scheduler.last_epoch = step
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas,
                                   strict=True):  # fmt: skip
            group["lr"] = base * fn(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's full state dict, names as in the stage checkpoint."""
        if not self.cfg.fsdp:
            return {k: v for k, v in self.student.state_dict().items()}
        model_sd, _ = self.full_state()
        return {k.removeprefix("student."): v for k, v in model_sd.items()}


def kd_loss_stats(module: DistillModule, ids, teacher_hidden, teacher_weight, labels):
    """(kl sum, student CE sum, teacher CE sum) at T = 1 on one batch, no gradients."""
    temperature, module.temperature = module.temperature, 1.0
    try:
        _, kl, ce, tce = module(ids, teacher_hidden, teacher_weight, labels, teacher_ce=True)
    finally:
        module.temperature = temperature
    return kl, ce, tce


# ---- saving and loading the resumable state ----------------------------------------------------
def _tensors_for_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage (tied weights): give each name its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.contiguous().clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"{name}::{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(name, {})[k] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_state(trainer: Trainer, state_dir: Path, info: dict[str, Any]) -> None:
    """Atomically write the resumable state (collective: every process must call it)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_directory

    model_sd, optim_sd = trainer.full_state()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    rngs = [rng]
    if trainer.dist.distributed:
        rngs = [None] * trainer.dist.world
        torch.distributed.all_gather_object(rngs, rng)
    if trainer.dist.main:
        opt_tensors, groups = flatten_optimizer(optim_sd)
        rng_tensors = {f"{k}.rank{r}": v for r, d in enumerate(rngs) for k, v in d.items()}

        def write(tmp: Path) -> None:
            save_file(_tensors_for_file(model_sd), tmp / "model.safetensors")
            save_file(_tensors_for_file(opt_tensors), tmp / "optimizer.safetensors")
            save_file(rng_tensors, tmp / "rng.safetensors")
            meta = {"state_version": STATE_VERSION, "step": trainer.step, "param_groups": groups, **info}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=2) + "\n")

        atomic_directory(state_dir, write, force=True)
    trainer.dist.barrier()


def read_state_info(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "trainer.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise XecomlaError(f"the saved state '{state_dir}' is unreadable ({exc}): pass --force to start over") from None
    if info.get("state_version") != STATE_VERSION:
        raise XecomlaError(f"the saved state '{state_dir}' has another format version: pass --force to start over")
    return info


def load_state(trainer: Trainer, state_dir: Path, info: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    model_sd = load_file(state_dir / "model.safetensors")
    optim_sd = unflatten_optimizer(load_file(state_dir / "optimizer.safetensors"), info["param_groups"])
    trainer.load_full_state(model_sd, optim_sd, int(info["step"]))
    rng = load_file(state_dir / "rng.safetensors")
    r = trainer.dist.rank
    if f"cpu.rank{r}" in rng:
        torch.set_rng_state(rng[f"cpu.rank{r}"])
    if f"cuda.rank{r}" in rng and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(rng[f"cuda.rank{r}"], trainer.device)


# ---- data ---------------------------------------------------------------------------------------
def prepare_data(cfg: DistillConfig, tokenizer, teacher, dist: Dist, run_dir: Path, log) -> PackedData:
    """The packed blocks of this run: read from OUT.run/data.safetensors when a saved run made them."""
    from safetensors.torch import load_file, save_file

    from .data import prepare_text_data
    from .teacher_text import teacher_samples

    cache = run_dir / "data.safetensors"
    key = {"data": cfg.data, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "val_tokens": cfg.val_tokens,
           "seed": cfg.seed, "sample_temperature": cfg.sample_temperature}  # fmt: skip
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(cache, "pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("key", "{}")) == key:
            t = load_file(cache)
            info = json.loads(meta.get("info", "{}"))
            data = PackedData(t["train"], t["val"], cfg.data, int(info.get("documents", 0)), int(info.get("tokens", 0)))
            log(f"{data.describe()} (cached in {cache})")
            return data
    source = cfg.data
    if source == "teacher":
        n_val = max(1, cfg.val_tokens // cfg.seq_len)
        n_train = min(steps_budget_blocks(cfg), max(64, (2_000_000 // cfg.seq_len)))
        total = n_train + n_val
        out = torch.empty(total, cfg.seq_len, dtype=torch.int64)
        if dist.main:
            with console.make_progress() as progress:
                task = progress.add_task("sampling from the teacher", total=total)
                last = [0]

                def tick(done: int) -> None:
                    progress.advance(task, done - last[0])
                    last[0] = done

                out = teacher_samples(teacher, tokenizer, total, cfg.seq_len, batch_size=64 if dist.device.type == "cuda" else 8,
                                      temperature=cfg.sample_temperature, seed=cfg.seed, progress=tick)  # fmt: skip
        if dist.distributed:
            out = out.to(dist.device)
            torch.distributed.broadcast(out, 0)
            out = out.cpu()
        data = PackedData(out[n_val:].clone(), out[:n_val].clone(), "teacher", 0, total * cfg.seq_len)
    else:
        budget = steps_budget_blocks(cfg) * cfg.seq_len
        with console.status(f"tokenising {source}"):
            data = prepare_text_data(source, tokenizer, cfg.seq_len, val_fraction=cfg.val_fraction,
                                     val_tokens=cfg.val_tokens, max_tokens=max(4 * budget, 10_000_000))  # fmt: skip
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        info = {"documents": data.documents, "tokens": data.tokens}
        save_file({"train": data.train.contiguous(), "val": data.val.contiguous()}, tmp,
                  metadata={"key": json.dumps(key), "info": json.dumps(info)})  # fmt: skip
        os.replace(tmp, cache)
    log(data.describe())
    return data


def steps_budget_blocks(cfg: DistillConfig) -> int:
    return cfg.total_steps * cfg.batch_size


# ---- the run ----------------------------------------------------------------------------------
def default_output(ckpt: Path) -> Path:
    """runs/demo-mla-r64 -> runs/demo-mla-r64-distill (a sibling of the student checkpoint)."""
    parent = ckpt.parent if ckpt.name else ckpt.resolve().parent
    return parent / f"{ckpt.resolve().name}-distill"


def run_dir_for(output: Path) -> Path:
    return output.parent / f"{output.name}.run"


def resolve_budget(cfg: DistillConfig) -> None:
    if (cfg.tokens is None) == (cfg.steps is None):
        raise XecomlaError("give the training budget as exactly one of --tokens N (e.g. 50k, 2M) or --steps N")
    if cfg.seq_len < 2 or cfg.batch_size < 1:
        raise XecomlaError("--seq-len must be at least 2 and --batch-size at least 1")
    cfg.total_steps = cfg.steps if cfg.steps is not None else steps_for_tokens(cfg.tokens, cfg.batch_size, cfg.seq_len)
    if cfg.total_steps < 1:
        raise XecomlaError("--steps must be at least 1")


def validate(cfg: DistillConfig, dist: Dist) -> None:
    if cfg.batch_size % dist.world:
        raise XecomlaError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({dist.world})")
    if cfg.micro_batch is not None and cfg.micro_batch < 1:
        raise XecomlaError("--micro-batch must be at least 1")
    if cfg.lr <= 0 or cfg.temperature <= 0 or cfg.ce_weight < 0:
        raise XecomlaError("--lr and --temperature must be positive and --ce-weight not negative")
    if cfg.kd_kernel not in ("torch", "liger") or (cfg.kd_kernel == "liger" and cfg.ce_weight):
        raise XecomlaError("--kd-kernel must be torch or liger (liger: KL only, no --ce-weight)")
    if cfg.fsdp and not dist.distributed:
        raise XecomlaError("--fsdp shards over several processes: launch with torchrun --nproc-per-node N")


def run_distill(
    ckpt: str | Path,
    cfg: DistillConfig,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Distil the student checkpoint `ckpt` from its teacher; returns (output dir, final metrics).

    `on_step(step, metrics)` is called after every logged step (tests use it to stop a run).
    """
    from .checkpoint import read_meta, save_checkpoint
    from .sources import load_model

    dist = setup_distributed(cfg.device)
    log = console.log if dist.main else (lambda _m: None)
    ckpt = Path(ckpt)
    read_meta(ckpt)  # a clear error for anything that is not a stage checkpoint
    out = Path(output) if output else default_output(ckpt)
    run_dir = run_dir_for(out)
    state_dir = run_dir / "state"
    resolve_budget(cfg)
    validate(cfg, dist)
    if out.exists() and not force:
        raise XecomlaError(f"output '{out}' already exists: pass --force to replace it, or choose another -o")
    if (state_dir / "trainer.json").is_file() and not resume:
        if not force:
            raise XecomlaError(f"an unfinished run left its state in '{run_dir}': pass --resume to continue it, "
                               "or --force to start over")  # fmt: skip
        if dist.main:
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.barrier()
    if resume and not (state_dir / "trainer.json").is_file():
        log(f"[yellow]no saved state in {run_dir}: starting from step 0[/]")
        resume = False

    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    if cfg.val_tokens is None:
        cfg.val_tokens = 65536 if device.type == "cuda" else 4096
    with console.status(f"loading student {ckpt}"):
        student = load_model(str(ckpt), dtype="float32", device=str(device))
    teacher_src = cfg.teacher or student.meta.get("source") or student.source
    cfg.teacher = teacher_src
    with console.status(f"loading teacher {teacher_src}"):
        teacher = load_model(teacher_src, dtype="bfloat16" if precision == "bf16" else "float32", device=str(device))
    check_same_tokenizer(student.tokenizer, teacher.tokenizer, teacher_src)
    if cfg.data == "auto":
        from .data import demo_available

        cfg.data = "demo" if demo_available() else "teacher"
    if cfg.data == "teacher" and cfg.val_tokens > 16384 and device.type != "cuda":
        cfg.val_tokens = 16384

    data = prepare_data(cfg, teacher.tokenizer, teacher.model, dist, run_dir, log)
    trainer = Trainer(student.model, teacher.model, cfg, dist)
    sampler = BlockSampler(data.train.shape[0], cfg.batch_size, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    log(f"distil {ckpt} from {teacher_src}: {cfg.total_steps:,} steps x {cfg.batch_size} x {cfg.seq_len} = "
        f"{human_count(cfg.total_steps * tokens_per_step)} tokens ({sampler.epochs(cfg.total_steps):.2f} epochs), "
        f"lr {cfg.lr:g}, {precision}, {human_count(trainer.trainable)} trainable parameters on {device}"
        + (f" x {dist.world} processes" + (" (FSDP)" if cfg.fsdp else " (DDP)") if dist.distributed else ""))  # fmt: skip

    fingerprint = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items() if k in RESUME_KEYS}
    fingerprint["student"] = str(ckpt.resolve())
    metrics_path = run_dir / "metrics.jsonl"
    history: dict[str, Any] = {}
    if resume:
        info = read_state_info(state_dir)
        saved = info.get("fingerprint", {})
        changed = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
        if changed:
            k = changed[0]
            raise XecomlaError(f"the saved state in '{run_dir}' was made with {k} = {saved.get(k)!r}, not "
                               f"{fingerprint[k]!r}: resume with the same settings, or pass --force to start over")  # fmt: skip
        with console.status(f"resuming from {state_dir} (step {info['step']})"):
            load_state(trainer, state_dir, info)
        history = info.get("history", {})
        if dist.main:
            _truncate_metrics(metrics_path, trainer.step)
        log(f"resumed at step {trainer.step:,} of {cfg.total_steps:,}")
    elif dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")

    def write_metrics(record: dict[str, Any]) -> None:
        if dist.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    log_every = cfg.log_every or (10 if device.type == "cuda" else 1)
    # Validation at the start, the end and in between: 3 times on GPU, once on CPU (it is slow there).
    eval_every = cfg.eval_every or max(1, math.ceil(cfg.total_steps / (4 if device.type == "cuda" else 2)))
    start_time = time.perf_counter()
    elapsed_before = float(history.get("seconds", 0.0))

    def validate_now() -> dict[str, float]:
        with console.status("validation"):
            v = trainer.evaluate(data.val)
        record = {"event": "val", "step": trainer.step, "tokens": trainer.step * tokens_per_step, **_round(v)}
        write_metrics(record)
        return v

    if trainer.step == 0:
        v0 = validate_now()
        history["initial"] = v0
        log(f"step 0: val KL {v0['val_kl']:.4f}, val ppl {v0['val_ppl']:.2f} (teacher {v0['val_ppl_teacher']:.2f})")
    last_val = history.get("last_val") or history.get("initial")
    window: list[dict[str, float]] = []
    recent_kl: list[float] = list(history.get("recent_kl", []))
    t_log, tokens_log = time.perf_counter(), 0

    progress = _TrainProgress(cfg.total_steps, trainer.step, disable=not dist.main)
    with progress:
        while trainer.step < cfg.total_steps:
            idx = sampler.indices(trainer.step)
            local = idx[dist.rank * trainer.local_batch : (dist.rank + 1) * trainer.local_batch]
            stats = trainer.train_step(data.train[local])
            window.append(stats)
            tokens_log += tokens_per_step
            step = trainer.step
            if step % log_every == 0 or step == cfg.total_steps:
                record = _pool(window, dist)
                window = []
                if not math.isfinite(record["loss"]):
                    raise XecomlaError(f"the loss became {record['loss']} at step {step}: lower --lr (now {cfg.lr:g})")
                now = time.perf_counter()
                record.update(step=step, tokens=step * tokens_per_step, tokens_per_s=round(tokens_log / (now - t_log), 1),
                              seconds=round(elapsed_before + now - start_time, 2))  # fmt: skip
                t_log, tokens_log = now, 0
                write_metrics({"event": "train", **_round(record)})
                recent_kl = (recent_kl + [record["kl"]])[-10:]
                progress.update(step, record)
                if on_step is not None:
                    on_step(step, record)
            if step % eval_every == 0 and step != cfg.total_steps:
                last_val = validate_now()
                progress.note(last_val)
            if cfg.save_every and step % cfg.save_every == 0 and step != cfg.total_steps:
                history.update(last_val=last_val, recent_kl=recent_kl,
                               seconds=elapsed_before + time.perf_counter() - start_time)  # fmt: skip
                save_state(trainer, state_dir, {"fingerprint": fingerprint, "history": history,
                                                "tokens_seen": step * tokens_per_step})  # fmt: skip

    final_val = validate_now()
    seconds = elapsed_before + time.perf_counter() - start_time
    initial = history.get("initial", {})
    metrics = {
        "tokens_seen": trainer.step * tokens_per_step,
        "steps": trainer.step,
        "train_kl": round(sum(recent_kl) / max(len(recent_kl), 1), 5),
        "val_kl": round(final_val["val_kl"], 5),
        "val_ppl": round(final_val["val_ppl"], 3),
        "val_ppl_teacher": round(final_val["val_ppl_teacher"], 3),
        "val_kl_initial": round(initial.get("val_kl", float("nan")), 5),
        "val_ppl_initial": round(initial.get("val_ppl", float("nan")), 3),
        "distill_seconds": round(seconds, 1),
        "distill_tokens_per_s": round(trainer.step * tokens_per_step / max(seconds, 1e-9), 1),
        "distill_data": cfg.data,
        "distill_teacher": teacher_src,
    }
    state = trainer.student_state_dict()
    if dist.main:
        model = trainer.student if not cfg.fsdp else _cpu_model(student, state)

        def extra(tmp: Path) -> None:
            if metrics_path.is_file():
                shutil.copyfile(metrics_path, tmp / "metrics.jsonl")

        save_checkpoint(out, model=model, tokenizer=student.tokenizer, stage="distill", spec=student.spec,
                        source=student.source, parent=str(ckpt.resolve()), metrics=metrics, force=force,
                        extra={"distill": {**cfg.to_dict(), "world_size": dist.world, "precision": precision,
                                           "data_tokens": data.tokens, "train_blocks": int(data.train.shape[0]),
                                           "val_blocks": int(data.val.shape[0])}},
                        write_extra=extra)  # fmt: skip
        shutil.rmtree(run_dir, ignore_errors=True)
        log(f"val KL {initial.get('val_kl', float('nan')):.4f} -> {final_val['val_kl']:.4f}, val ppl "
            f"{initial.get('val_ppl', float('nan')):.2f} -> {final_val['val_ppl']:.2f} (teacher "
            f"{final_val['val_ppl_teacher']:.2f}) after {human_count(metrics['tokens_seen'])} tokens in {seconds:.0f} s")  # fmt: skip
        log(f"[green]wrote[/] {out}")
    dist.barrier()
    return out, metrics


def _cpu_model(loaded, state: dict[str, torch.Tensor]):
    from .checkpoint import build_model

    model = build_model(loaded.model.config, loaded.spec, torch.float32)
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def _pool(window: list[dict[str, torch.Tensor]], dist: Dist) -> dict[str, float]:
    """Mean of the window's step stats over steps and processes (one host sync)."""
    keys = ("loss", "kl", "ce", "grad_norm")
    t = torch.stack([torch.stack([s[k].float().to(dist.device) for k in keys]) for s in window]).mean(0)
    dist.all_sum(t)
    t = t / dist.world
    out = dict(zip(keys, t.tolist(), strict=True))
    out["lr"] = float(window[-1]["lr"])
    return out


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the saved step: the resumed run logs them again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class _TrainProgress:
    """A rich progress bar on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, start: int, disable: bool):
        from rich.progress import TextColumn

        self.disable = disable or console.is_quiet()
        self.progress = console.make_progress(TextColumn("{task.fields[info]}"))
        self.task = self.progress.add_task("distil", total=total, completed=start, info="")
        self.val = ""

    def __enter__(self):
        if not self.disable:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if not self.disable:
            self.progress.stop()

    def update(self, step: int, record: dict[str, float]) -> None:
        info = f"KL {record['kl']:.4f}  {record['tokens_per_s']:,.0f} tok/s{self.val}"
        self.progress.update(self.task, completed=step, info=info)

    def note(self, val: dict[str, float]) -> None:
        self.val = f"  val KL {val['val_kl']:.4f}"
