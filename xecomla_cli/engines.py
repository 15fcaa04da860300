"""Where the smaller cache holds: which serving engines keep the MLA latent cache for a conversion.

A conversion caches r + p values per token per converted layer, but only in an engine that runs
MLA on the latent. Each rule below is read from that engine's source (cited beside it):

- xecomla (``--format xecomla`` checkpoints, ``eval``): always the latent, any rank, hybrid too.
- transformers (stock ``DeepseekV3ForCausalLM``, the ``hf`` export): ``past_key_values.update``
  receives ``kv_a_layernorm(c)`` and the rotated ``k_rot`` ("Cache read / write is performed while
  latent KV is still compressed", transformers 5.17 ``models/deepseek_v3/modeling_deepseek_v3.py``),
  so it caches kv_lora_rank + p per layer; it re-expands per-head K/V from the cache at every step
  (transient, one layer at a time). Honours attention biases, so the identity emulation is exact.
- llama.cpp (``deepseek2`` GGUF, ``export --format gguf``): caches kv_lora_rank + n_rot per layer at
  any width; needs a real latent norm (it loads no attention biases), MLA in every layer, one
  kv_lora_rank (per-layer ranks are padded) and unscaled RoPE: ``src/models/deepseek2.cpp`` calls
  ``ggml_rope_ext`` with no frequency factors (it loads no ``rope_freqs``; YaRN only). The refusals
  of ``export/gguf_export.py: check_gguf_mla``.
- vLLM 0.32: ``MLACommonMetadata.__post_init__`` rejects any ``kv_lora_rank + qk_rope_head_dim``
  outside ``MLACommonBackend.get_supported_head_sizes()`` = (320, 512, 576)
  (``vllm/model_executor/layers/attention/mla_attention.py``); on CPU the backends ``CPU_MLA`` and
  ``AMX_MLA`` take only 576 (``vllm/v1/attention/backends/mla/cpu_mla.py``, ``amx_mla.py``), and
  the CPU decode kernel ``torch.ops._C.mla_decode_kvcache`` runs only kv_lora_rank 512 + rope 64
  (any other split of 576 raises 'Unsupported block size: 16'; measured, docs/results/2026-12-04-vllm.md).
  ``VLLM_MLA_DISABLE=1`` serves other widths as plain attention over expanded K/V:
  2·H·(n + p) values per token per layer (``transformers_utils/model_arch_config_convertor.py``).
  Its DeepSeek attention is built with ``bias=False`` (``model_executor/models/deepseek_v2.py``),
  and ``DeepseekV2MLAAttention`` rewrites every ``rope_type`` but ``default`` to ``deepseek_yarn``
  (``deepseek_llama_scaling`` when ``apply_yarn_scaling`` is false) and multiplies the softmax scale
  by YaRN's mscale²: a ``llama3`` export would run with other frequencies and another scale.
- SGLang, Triton backend: ``MLATokenToKVPool`` caches kv_lora_rank + qk_rope_head_dim per layer
  and the Triton decode kernel takes any width (576 and 288 get tuned tiles, others a power-of-two
  block: ``python/sglang/srt/layers/attention/triton_ops/decode_attention.py``); its DeepSeek
  attention is bias-free too, and ``python/sglang/srt/models/deepseek_v2.py`` rewrites any
  ``rope_scaling`` to ``deepseek_yarn`` (``if rope_scaling: rope_scaling["rope_type"] = "deepseek_yarn"``).

So the only RoPE every engine reads alike is ``rope_type: default``; init-svd builds a scaled
source's RoPE part that way (``init.engine_ready``), and folds q/k/v biases into the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import XecomlaError
from .mla.spec import MLASpec

VLLM_MLA_WIDTHS = (320, 512, 576)  # vLLM 0.32 MLACommonBackend.get_supported_head_sizes()
VLLM_CPU_MLA_WIDTHS = (576,)  # vLLM 0.32 CPU_MLA / AMX_MLA
VLLM_NATIVE_WIDTH = 576  # the width every vLLM MLA backend takes (512 latent + 64 RoPE in DeepSeek-V3)
VLLM_CPU_KV_LORA_RANK = 512  # CPU_MLA's decode kernel runs only 512 + 64 ('Unsupported block size: 16' otherwise)


@dataclass(frozen=True)
class EngineRow:
    """One engine: what it caches for this conversion, in values per token over all layers."""

    engine: str
    latent: bool  # caches the latent (r + p per converted layer), not per-head K/V
    values_per_token: int | None  # None: the engine cannot run this checkpoint correctly
    original_values_per_token: int
    note: str  # the condition, the command, or why not; one line
    only: str = ""  # a restriction of the engine's devices, e.g. "GPU"

    @property
    def compression(self) -> float | None:
        return None if self.values_per_token is None else self.original_values_per_token / self.values_per_token

    @property
    def saves(self) -> bool:
        return self.values_per_token is not None and self.values_per_token < self.original_values_per_token

    def to_dict(self) -> dict[str, Any]:
        c = self.compression
        return {**asdict(self), "compression": None if c is None else round(c, 4), "saves": self.saves}


def engine_support(
    spec: MLASpec,
    *,
    kv_lora_rank: int | None = None,
    attention_bias: bool | None = None,
    rope_type: str | None = None,
    blocker: str | None = None,
) -> list[EngineRow]:
    """Which engines keep the latent cache for ``spec``, one row per engine.

    ``kv_lora_rank`` and ``attention_bias`` describe the DeepSeek-V3 export (default: what
    ``export`` makes of the spec: the largest rank, plus the constant channel and biases of the
    identity emulation when the spec has no latent norm). ``rope_type`` is the RoPE type the export
    carries (default: ``default``); ``blocker`` is why no DeepSeek-V3 export exists (e.g. Qwen2's
    biases kept by ``--attention-bias keep``)."""
    L, original = spec.num_layers, spec.original_values_per_token_total
    ranks = [r for r in spec.kv_ranks if r is not None]
    hybrid = len(ranks) < L
    if attention_bias is None:
        attention_bias = not spec.latent_norm
    if kv_lora_rank is None:
        kv_lora_rank = max(ranks) + (1 if attention_bias else 0)
    p = spec.rope_dim
    width = kv_lora_rank + p  # what a DeepSeek-V3-layout engine caches per token per layer
    if blocker is None and hybrid:
        blocker = "hybrid: the DeepSeek-V3 layout has MLA in every layer"
    if blocker is None and spec.rope_groups > 1:
        blocker = "per-group RoPE slices: DeepSeek-V3 has one RoPE key"
    if blocker is None and spec.attention_bias == "kept":
        blocker = "q/k/v biases kept by init-svd --attention-bias keep"
    scaled = rope_type not in (None, "default")
    built = "".join(
        (
            "; RoPE as default RoPE (the scaled slow pairs without RoPE)" if spec.rope_frequencies == "default" else "",
            "; q/k/v biases folded (approximate, xecomla.json bias_fold)" if spec.biases_folded else "",
        )
    )

    def row(engine: str, latent: bool, per_layer: int | None, note: str, only: str = "") -> EngineRow:
        return EngineRow(engine, latent, None if per_layer is None else per_layer * L, original, note, only)

    rows = [
        EngineRow(
            "xecomla",
            True,
            spec.values_per_token_total,
            original,
            "the checkpoint, or export --format xecomla: latent in every converted layer",
        )
    ]
    if blocker is not None:
        why = f"no DeepSeek-V3 export ({blocker})"
        return rows + [row(e, False, None, why) for e in ("transformers", "llama.cpp", "vLLM", "SGLang (Triton)")]

    padded = " (--pad-ranks)" if len(set(ranks)) > 1 else ""
    rows.append(
        row(
            "transformers",
            True,
            width,
            f"DeepseekV3 caches latent + k_rot ({kv_lora_rank} + {p}){padded}, re-expands K/V at each step" + built,
        )
    )
    no_bias = (
        "drops the attention biases of the no-latent-norm emulation (wrong outputs): "
        "use a checkpoint with a latent norm (init-svd --latent-norm)"
    )
    yarn = (
        f"rewrites rope_type '{rope_type}' to its DeepSeek YaRN (other frequencies, softmax scaled by mscale²): "
        "wrong outputs; init with --rope-frequencies default (the default)"
    )
    for engine in (
        _llama_cpp(spec, not spec.latent_norm, rope_type, row, no_bias),
        _vllm(spec, width, attention_bias, row, no_bias),
        row("SGLang (Triton)", False, None, no_bias)
        if attention_bias
        else row("SGLang (Triton)", True, width, f"MLA pool caches {width} per layer, any width (not run)"),
    ):
        if scaled and engine.engine != "llama.cpp" and engine.values_per_token is not None:
            engine = row(engine.engine, False, None, yarn)
        elif engine.values_per_token is not None:
            engine = EngineRow(**{**asdict(engine), "note": engine.note + built})
        rows.append(engine)
    return rows


def _llama_cpp(spec: MLASpec, attention_bias: bool, rope_type, row, no_bias: str) -> EngineRow:
    """``export --format gguf`` (deepseek2): the checkpoint's own r + p, whatever the hf export pads to."""
    ranks = sorted({r for r in spec.kv_ranks if r is not None})
    width = ranks[-1] + spec.rope_dim
    if attention_bias:
        return row("llama.cpp", False, None, no_bias.replace("drops", "loads none of"))
    if rope_type not in (None, "default"):
        return row(
            "llama.cpp",
            False,
            None,
            f"{rope_type} RoPE scaling: the deepseek2 graph applies no frequency factors; init with "
            "--rope-frequencies default (the default)",
        )
    padded = f", ranks padded to {ranks[-1]} (--pad-ranks)" if len(ranks) > 1 else ""
    return row("llama.cpp", True, width, f"export --format gguf: deepseek2 caches {width} per layer{padded}")


def _vllm(spec: MLASpec, width: int, attention_bias: bool, row, no_bias: str) -> EngineRow:
    if attention_bias:
        return row("vLLM", False, None, no_bias)
    if width in VLLM_CPU_MLA_WIDTHS and width - spec.rope_dim == VLLM_CPU_KV_LORA_RANK:
        return row("vLLM", True, width, f"MLA at width {width} on GPU and CPU")
    if width in VLLM_CPU_MLA_WIDTHS:
        split = f"{VLLM_CPU_KV_LORA_RANK} + {VLLM_NATIVE_WIDTH - VLLM_CPU_KV_LORA_RANK}"
        return row("vLLM", True, width, f"MLA at width {width} on GPU; CPU decodes only {split}", only="GPU")
    if width in VLLM_MLA_WIDTHS:
        return row("vLLM", True, width, f"MLA at width {width} on GPU only (CPU takes 512 + 64 only)", only="GPU")
    return row("vLLM", False, *vllm_refused(spec, width))


def vllm_refused(spec: MLASpec, width: int) -> tuple[int, str]:
    """What vLLM does with a width its MLA refuses, in words: VLLM_MLA_DISABLE=1 caches per-head K and V
    (said when that is more than the original), and the vLLM width that would save, if any."""
    expanded = 2 * spec.num_heads * (spec.nope_dim + spec.rope_dim)  # per token per layer
    original = spec.original_values_per_token_per_layer
    if expanded > original:
        cost = f"{expanded} values per token per layer, {expanded / original:.1f}x MORE than the original's {original}"
    else:
        cost = f"{expanded} values per token per layer ({original / expanded:.2f}x less than the original's {original})"
    saving = [w for w in VLLM_MLA_WIDTHS if w < original]
    if VLLM_NATIVE_WIDTH in saving:
        hint = f"init-svd --latent-width 576 keeps MLA in vLLM, GPU and CPU ({original / VLLM_NATIVE_WIDTH:.2f}x)"
    elif saving:
        hint = f"init-svd --latent-width {saving[-1]} keeps MLA in vLLM on GPU ({original / saving[-1]:.2f}x)"
    else:
        hint = f"no vLLM MLA width ({'/'.join(map(str, VLLM_MLA_WIDTHS))}) is below this model's {original}"
    return expanded, (
        f"MLA refuses width {width} (takes {'/'.join(map(str, VLLM_MLA_WIDTHS))}); VLLM_MLA_DISABLE=1 caches "
        f"expanded per-head K/V: {cost}; {hint}"
    )


VLLM_CAPTION = (
    "vLLM's MLA takes r+p = 320, 512 or 576 (CPU: r 512 + p 64 only); other widths run with VLLM_MLA_DISABLE=1 over "
    "expanded K/V, or pad: export --latent-width 576"
)


def rank_for_width(
    width: str, *, original_per_layer: int, head_dim: int, rope_dim: int | None, default_rope_dim: int
) -> tuple[int, int]:
    """``init-svd --latent-width W|vllm``: the (r, p) that cache W = r + p values per token per layer.

    ``vllm`` is 576, the width every vLLM MLA backend takes (CPU too), split as DeepSeek-V3 does
    (r 512 + p 64) when the head dim allows p = 64. A width that would not save memory against the
    original's 2·G·h is refused with one line naming the original's width and the alternative."""
    preset = width.strip().lower() == "vllm"
    if preset:
        w = VLLM_NATIVE_WIDTH
        p = rope_dim if rope_dim is not None else (64 if head_dim > 64 else default_rope_dim)
    else:
        try:
            w = int(width)
        except ValueError:
            raise XecomlaError(f"--latent-width '{width}' is not a number or 'vllm'") from None
        p = rope_dim if rope_dim is not None else default_rope_dim
    name = f"--latent-width {width}" + (f" ({w})" if preset else "")
    if w >= original_per_layer:
        smaller = [x for x in VLLM_MLA_WIDTHS if x < original_per_layer and x != w]
        vllm_alt = (
            f"--latent-width {smaller[-1]} (vLLM on GPU only, {original_per_layer / smaller[-1]:.2f}x) or "
            if smaller and smaller[-1] not in VLLM_CPU_MLA_WIDTHS
            else ""
        )
        raise XecomlaError(
            f"{name} would not save memory: this model caches {original_per_layer} values per token per layer "
            f"(2·G·h); use {vllm_alt}--kv-rank R with r + p below {original_per_layer} (xecomla, transformers, "
            "llama.cpp and SGLang keep the latent at any width)"
        )
    if w <= p:
        raise XecomlaError(f"{name} leaves no latent: it must exceed the RoPE dims p = {p}")
    return w - p, p
