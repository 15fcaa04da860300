"""What an export decides and what it produced: ``ExportPlan`` (every choice, decided by
``plan.plan_export``; saved in ``xecomla_export.json``, shown in the model card and the log) and
``ExportResult``. Their own module, below everything in ``export/`` that reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..mla.spec import MLASpec


@dataclass(frozen=True)
class ExportPlan:
    """Every choice the export makes, decided once by ``plan_export``, saved in the export and shown in
    the model card."""

    latent: str  # "norm" (checkpoint's latent norm) | "identity" (constant-channel emulation)
    queries: str  # "dense" | "dense-from-lora" | "lora-identity"
    kv_rank: int  # the checkpoint's latent rank (padded max with --pad-ranks)
    kv_lora_rank: int  # as exported: kv_rank (+1 with the identity emulation)
    q_lora_rank: int | None
    rope_dim: int
    attention_bias: bool
    dtype: str
    rope_theta: float | None = None  # rope_theta written to config.json, when not the base model's
    rope_type: str | None = (
        None  # "default": config.json carries default RoPE (every engine reads it); None: the base's
    )
    padded_layers: list[int] = field(default_factory=list)
    latent_constants: list[float] = field(default_factory=list)  # C per layer (identity)
    q_constants: list[float] = field(default_factory=list)  # C per layer (lora-identity)
    notes: list[str] = field(default_factory=list)

    @property
    def portable(self) -> bool:
        """No attention biases and default RoPE: vLLM and SGLang (which drop DeepSeek attention biases and
        rewrite other RoPE types to their YaRN) run it as transformers does."""
        return not self.attention_bias and self.rope_type == "default"

    def exported_spec(self, spec: MLASpec) -> MLASpec:
        """The checkpoint's spec as a serving engine sees the export: kv_lora_rank in every layer."""
        return replace(spec, kv_ranks=[self.kv_lora_rank] * spec.num_layers)

    def summary_lines(self) -> list[str]:
        """The plan as log lines (rich markup) for stderr."""
        lines = [
            f"DeepSeek-V3 layout: kv_lora_rank {self.kv_lora_rank}, q_lora_rank {self.q_lora_rank}, "
            f"latent norm '{self.latent}', queries '{self.queries}', {self.dtype}"
        ]
        lines += [f"  {note}" for note in self.notes]
        if self.rope_type != "default":
            lines.append("[yellow]note:[/] the source's scaled RoPE is kept: exact in transformers only")
        if self.attention_bias:
            lines.append(
                "[yellow]note:[/] attention biases carry the latent-norm emulation (a --no-latent-norm checkpoint): "
                "exact in transformers; vLLM, SGLang and llama.cpp drop them (init-svd's default latent norm "
                "exports without biases; --portable enforces it)"
            )
        return lines


@dataclass
class ExportResult:
    path: Path
    format: str
    plan: ExportPlan | None
    verify: dict[str, Any] | None = None
    hub_url: str | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)  # engines.engine_support rows for this export

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "plan": asdict(self.plan) if self.plan else None,
            "portable": self.plan.portable if self.plan else None,
            "verify": self.verify,
            "engines": self.engines,
            "hub_url": self.hub_url,
        }

    def summary_lines(self) -> list[str]:
        """The plan and the verification as log lines (rich markup) for stderr."""
        lines = self.plan.summary_lines() if self.plan is not None else []
        if self.verify:
            v = self.verify
            lines.append(
                f"verified with stock transformers: max |Δlogit| {v['max_abs_logit_diff']:.2e} "
                f"(max |logit| {v['max_abs_logit']:.3g}; ours SDPA vs eager {v['noise_sdpa_vs_eager']:.2e}), "
                f"greedy {'identical' if v['greedy_tokens_equal'] else 'DIFFERENT'}"
            )
        return lines
