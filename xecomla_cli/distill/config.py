"""The options of a distillation run, and their resolution, once, into a frozen run config.

`DistillConfig` is what the user asked for (the CLI's options), with None or 'auto' where the
default depends on the machine or on the student checkpoint. `resolve_config` fills in every
such default in one place, before any model is loaded:

    budget      --tokens N or --steps N              -> total_steps
    teacher     --teacher or the student's source    -> a model source
    data        'auto'                               -> 'demo' when installed, else 'teacher'
    val_tokens  None                                 -> 64k on GPU, 4k on CPU (<= 16k for sampled text on CPU)
    precision   'auto'                               -> bf16 on GPU and CPUs with AMX, else fp32

and returns a `ResolvedConfig`. Nothing changes a config after that; its `to_dict()` is what the
output's xecomla.json records under "distill", and a resumed run must match it (`RESUME_KEYS`).

`RunConfig` is what the planning, the loop, the state and the output read of any resolved config:
KD's `ResolvedConfig` here and DPO / on-policy's `policy_config.ResolvedPolicyConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import XecomlaError
from ..text.bundled import demo_available
from ..text.mix import mix_parts
from ..text.packing import steps_for_tokens

PRECISIONS = ("bf16", "fp32")  # resolved (choices.Precision adds "auto")


class RunConfig(Protocol):
    """What the planning, the loop, the state and the output read of a resolved config: KD's
    `ResolvedConfig` and DPO / on-policy's `ResolvedPolicyConfig` both are one."""

    RESUME_KEYS: ClassVar[tuple[str, ...]]  # settings a resumed run must share with the saved one

    @property
    def teacher(self) -> str | None: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def min_lr_ratio(self) -> float: ...
    @property
    def lr(self) -> float | None: ...
    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def clip(self) -> float: ...
    @property
    def save_every(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
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
    precision: str = "auto"  # auto (bf16 autocast on GPU and CPUs with AMX, else fp32) | bf16 | fp32
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
    greedy_answers: float = 0.0  # --data teacher, chat: fraction of training blocks with greedy answers (seq-level KD)
    seed: int = 0
    allow_pickle: bool = False  # a teacher whose only weights are pytorch_model.bin (torch.load weights_only)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class ResolvedConfig(DistillConfig):
    """A `DistillConfig` with its defaults filled in for one machine and one student (`resolve_config`).

    `teacher`, `data` and `val_tokens` are set, `precision` is bf16 or fp32; `log_every` and
    `eval_every` keep the user's value (None in xecomla.json) and resolve through `log_interval`
    and `eval_interval`.
    """

    total_steps: int = 0  # optimizer steps of the whole run

    # Settings a resumed run must share with the run that saved the state (`state.fingerprint`).
    RESUME_KEYS: ClassVar[tuple[str, ...]] = (
        "teacher",
        "data",
        "seq_len",
        "batch_size",
        "total_steps",
        "lr",
        "min_lr_ratio",
        "warmup",
        "weight_decay",
        "betas",
        "clip",
        "temperature",
        "ce_weight",
        "freeze_non_mla",
        "seed",
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS or self.total_steps < 1:
            raise ValueError(f"a resolved config needs precision in {PRECISIONS} and total_steps >= 1")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def budget_blocks(self) -> int:
        """Training blocks the run reads (with repeats when the data is smaller)."""
        return self.total_steps * self.batch_size

    @property
    def warmup_steps(self) -> int:
        w = self.warmup if self.warmup >= 1 else self.warmup * self.total_steps
        return max(1, min(int(round(w)), self.total_steps))

    def log_interval(self, device: torch.device) -> int:
        """Steps between metric lines: --log-every, else 10 on GPU and 1 on CPU."""
        return self.log_every or (10 if device.type == "cuda" else 1)

    def eval_interval(self, device: torch.device) -> int:
        """Steps between validations: --eval-every, else 3 times per run on GPU and once on CPU (it is
        slow there), besides the validations at the start and the end."""
        return self.eval_every or max(1, math.ceil(self.total_steps / (4 if device.type == "cuda" else 2)))


def resolve_config(
    options: DistillConfig, *, student_source: str, device: torch.device, world: int = 1
) -> ResolvedConfig:
    """Check the options and fill in their defaults for `world` processes on `device`.

    `student_source` is the model the student checkpoint was made from: the default teacher.
    """
    total_steps = budget_steps(options)
    check_options(options, world)
    precision = resolve_precision(options.precision, device)
    data = options.data
    if data == "auto":
        data = "demo" if demo_available() else "teacher"
    parts = data_parts(data)
    if options.greedy_answers and "teacher" not in parts:  # decided here, before any model is loaded
        raise XecomlaError("--greedy-answers needs --data teacher (the teacher's answers to its own questions)")
    val_tokens = options.val_tokens
    if val_tokens is None:
        val_tokens = 65536 if device.type == "cuda" else 4096
    if "teacher" in parts and val_tokens > 16384 and device.type != "cuda":
        val_tokens = 16384  # sampling from the teacher is slow on CPU
    return ResolvedConfig(
        **{
            **dataclasses.asdict(options),
            "teacher": options.teacher or student_source,
            "data": data,
            "val_tokens": val_tokens,
            "precision": precision,
            "total_steps": total_steps,
        }
    )


def data_parts(data: str) -> list[str]:
    """The sources of ``--data``: one, or a mix ('teacher+demo': the training blocks shared evenly)."""
    return mix_parts(data, "--data", "teacher+demo")


def budget_steps(options: DistillConfig) -> int:
    """The training budget (--tokens or --steps) as a number of optimizer steps."""
    if (options.tokens is None) == (options.steps is None):
        raise XecomlaError("give the training budget as exactly one of --tokens N (e.g. 50k, 2M) or --steps N")
    if options.seq_len < 2 or options.batch_size < 1:
        raise XecomlaError("--seq-len must be at least 2 and --batch-size at least 1")
    if options.steps is not None:
        steps = options.steps
    else:
        steps = steps_for_tokens(options.tokens, options.batch_size, options.seq_len)
    if steps < 1:
        raise XecomlaError("--steps must be at least 1")
    return steps


def check_options(options: DistillConfig, world: int) -> None:
    """One clear error for options that cannot work together (or with `world` processes)."""
    if options.batch_size % world:
        raise XecomlaError(f"--batch-size {options.batch_size} must be a multiple of the number of processes ({world})")
    if options.micro_batch is not None and options.micro_batch < 1:
        raise XecomlaError("--micro-batch must be at least 1")
    if options.lr <= 0 or options.temperature <= 0 or options.ce_weight < 0:
        raise XecomlaError("--lr and --temperature must be positive and --ce-weight not negative")
    if options.sample_temperature <= 0:
        raise XecomlaError(f"--sample-temperature {options.sample_temperature} must be positive, e.g. 0.7 or 1.0")
    if not 0 <= options.greedy_answers <= 1:
        raise XecomlaError(
            f"--greedy-answers {options.greedy_answers} is a fraction of the blocks: give 0 to 1, e.g. 0.5"
        )
    if options.kd_kernel not in ("torch", "liger") or (options.kd_kernel == "liger" and options.ce_weight):
        raise XecomlaError("DistillConfig.kd_kernel must be torch or liger (liger: KL only, ce_weight 0)")
    if options.fsdp and world <= 1:
        raise XecomlaError("--fsdp shards over several processes: launch with torchrun --nproc-per-node N")


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 fast, i.e. has AMX tiles: there bf16 autocast runs the matrix
    products 2-4x faster than fp32. AVX512-BF16 alone is not enough: measured on a Xeon with it and
    without AMX, a (4096, 576) x (576, 1536) bf16 product ran at 166 GFLOP/s against fp32's 283."""
    import torch.cpu

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on GPU and on CPUs with AMX, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_fast()) else "fp32"
    if precision not in PRECISIONS:
        raise XecomlaError(f"--precision must be auto, bf16 or fp32 (got '{precision}')")
    return precision
