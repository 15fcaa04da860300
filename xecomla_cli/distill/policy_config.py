"""Options of the two stages after KD: DPO (``distill --dpo``) and on-policy distillation
(``distill --on-policy``), resolved once into a frozen config.

DPO defaults are X-EcoMLA's (AMD-AGI/AMD-Hybrid-Models, ``X-EcoMLA/configs/dpo.yaml``, TRL's
``DPOTrainer``): sigmoid loss, β = 0.01, learning rate 5e-7, cosine schedule, warm-up 0.1 of the
steps, 1 epoch, max length 1024 with prompts of at most 512 tokens. The on-policy defaults follow
GKD (reverse KL, λ = 1: every step samples from the student) with answers of at most 128 tokens.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import XecomlaError
from .on_policy import DIVERGENCES

MODES = ("dpo", "on-policy")
DEFAULT_LR = {"dpo": 5e-7, "on-policy": 1e-5}


@dataclass(frozen=True)
class PolicyConfig:
    """What the user asked for; None where the default depends on the mode."""

    mode: str = "dpo"
    teacher: str | None = None  # default: the checkpoint's source model
    prefs: str = "teacher"  # DPO: 'teacher', a .jsonl file or hf:NAME[:SPLIT]
    prompts: int = 64  # teacher-written prompts (DPO pairs built from the teacher; on-policy prompts)
    steps: int | None = None  # default: `epochs` passes over the pairs / prompts
    epochs: float = 1.0
    batch_size: int = 8  # pairs (DPO) or prompts (on-policy) per optimizer step
    micro_batch: int = 2
    lr: float | None = None
    warmup: float = 0.1  # < 1: fraction of the steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (TRL's Trainer default)
    clip: float = 1.0
    beta: float = 0.01  # DPO's β
    max_length: int = 1024
    max_prompt: int = 512
    divergence: str = "reverse"  # on-policy: reverse | forward | jsd
    jsd_beta: float = 0.5
    student_fraction: float = 1.0  # GKD's λ: the fraction of steps whose answers the student samples
    new_tokens: int = 128  # on-policy: most tokens of a sampled answer
    temperature: float = 1.0  # of every sample
    precision: str = "fp32"
    device: str = "auto"
    save_every: int = 50
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass(frozen=True)
class ResolvedPolicyConfig(PolicyConfig):
    """With the teacher and learning rate filled in; `total_steps` is set once the data is known."""

    total_steps: int = 0

    # Settings a resumed run must share with the run that saved its state (`state.fingerprint`).
    RESUME_KEYS: ClassVar[tuple[str, ...]] = tuple(
        k for k in PolicyConfig.__dataclass_fields__ if k not in ("device", "save_every")
    ) + ("total_steps",)

    @property
    def min_lr_ratio(self) -> float:
        """The cosine schedule decays to 0 (TRL's "cosine")."""
        return 0.0

    @property
    def section(self) -> str:
        """Where xecomla.json records the run, and the prefix of its metrics: dpo, on_policy."""
        return self.mode.replace("-", "_")

    @property
    def warmup_steps(self) -> int:
        w = self.warmup if self.warmup >= 1 else self.warmup * self.total_steps
        return max(1, min(int(round(w)), self.total_steps))

    def with_steps(self, n_items: int) -> ResolvedPolicyConfig:
        """The config with its step budget: --steps, else `epochs` over `n_items` pairs or prompts."""
        steps = self.steps if self.steps is not None else math.ceil(self.epochs * n_items / self.batch_size)
        return dataclasses.replace(self, total_steps=max(1, steps))


def resolve_policy_config(options: PolicyConfig, *, student_source: str) -> ResolvedPolicyConfig:
    """Check the options (one line for each mistake) and fill in the defaults."""
    o = options
    if o.mode not in MODES:
        raise XecomlaError(f"unknown mode '{o.mode}': use --dpo or --on-policy")
    if o.batch_size < 1 or o.micro_batch < 1 or o.prompts < 1 or (o.steps is not None and o.steps < 1):
        raise XecomlaError("--batch-size, --micro-batch, --prompts and --steps must be at least 1")
    if o.beta <= 0 or (o.lr is not None and o.lr <= 0) or o.temperature <= 0 or o.epochs <= 0:
        raise XecomlaError("--beta, --lr, --temperature and --epochs must be positive")
    if o.divergence not in DIVERGENCES or not 0 < o.jsd_beta < 1 or not 0 <= o.student_fraction <= 1:
        raise XecomlaError(f"--divergence must be one of {', '.join(DIVERGENCES)}, with 0 < β < 1 and 0 <= λ <= 1")
    if o.max_prompt >= o.max_length or o.new_tokens < 1:
        raise XecomlaError("--max-prompt must be below --max-length, and --new-tokens at least 1")
    if o.precision not in ("fp32", "bf16"):
        raise XecomlaError(f"--precision must be fp32 or bf16 here (got '{o.precision}')")
    return ResolvedPolicyConfig(
        **{**dataclasses.asdict(o), "teacher": o.teacher or student_source, "lr": o.lr or DEFAULT_LR[o.mode]}
    )
