"""The plan of an export: every choice it makes (``ExportPlan``), decided by ``plan_export`` (how a
checkpoint maps onto DeepSeek-V3, or one line saying why it cannot exactly), and what the export
produced (``ExportResult``).

The plan is saved in ``xecomla_export.json``, shown in the model card and logged by the command;
``weights.deepseek_state_dict`` adds the emulation constants.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import XecomlaError
from ..mla.spec import MLASpec, layer_sliding_window
from .model_view import model_view
from .records import ExportPlan
from .rope import rope_choice
from .weights import emulation_constants

WEIGHT_DTYPES = ("float32", "bfloat16")  # the dtypes an export writes its weights in
ALTERNATIVE = "export with --format xecomla (our own format) instead"


# ---- deciding the plan ---------------------------------------------------------------------------
def plan_export(
    loaded, *, dtype: str = "float32", pad_ranks: bool = False, portable: bool = False, latent_width: int | None = None
) -> ExportPlan:
    """Decide the mapping, or raise one clear line saying why the layout cannot hold it exactly.

    ``loaded``: a LoadedModel or a checkpoint on disk (``model_view``). Every refusal the config and spec decide
    (``check_config``) comes first; then the RoPE frequencies (tiny tensors) and, for the identity emulations
    only, one layer at a time."""
    loaded = model_view(loaded)
    spec: MLASpec | None = loaded.spec
    check_config(loaded, spec, dtype=dtype, pad_ranks=pad_ranks, portable=portable, latent_width=latent_width)
    ranks = [int(r) for r in spec.kv_ranks]
    R, padded = _latent_rank(spec, pad_ranks, latent_width)
    latent = "norm" if spec.latent_norm else "identity"
    extra = 1 if latent == "identity" else 0

    attention_bias = latent == "identity"
    if spec.q_rank is None:
        queries, q_lora_rank = "dense", None
    elif attention_bias:
        queries, q_lora_rank = "lora-identity", spec.q_rank + 1
    else:  # keep the export bias-free (portable): DeepSeek-V3's q_lora would need a norm we lack
        queries, q_lora_rank = "dense-from-lora", None
    plan = ExportPlan(
        latent=latent,
        queries=queries,
        kv_rank=R,
        kv_lora_rank=R + extra,
        q_lora_rank=q_lora_rank,
        rope_dim=spec.rope_dim,
        attention_bias=attention_bias,
        dtype=dtype,
        padded_layers=padded,
    )
    rope_theta, rope_type, rope_notes = rope_choice(loaded, plan)  # reads the RoPE frequencies only
    if portable and rope_type != "default":
        raise XecomlaError(
            "--portable: this checkpoint keeps its source's scaled RoPE (init-svd --rope-frequencies source), which "
            "vLLM and SGLang rewrite to their YaRN: re-init with --rope-frequencies default (the default)"
        )
    latent_constants, q_constants = emulation_constants(loaded, plan)  # the identity emulations: layer by layer
    decided = replace(
        plan, rope_theta=rope_theta, rope_type=rope_type, latent_constants=latent_constants, q_constants=q_constants
    )
    return replace(decided, notes=rope_notes + _notes(decided, spec, max(ranks)))


def check_config(
    loaded, spec: MLASpec | None, *, dtype: str, pad_ranks: bool, portable: bool, latent_width: int | None
) -> None:
    """Every refusal the spec, the config and the tensor names decide: nothing is read but headers."""
    if spec is None:
        raise XecomlaError("this checkpoint has no MLA layers (it is an original model): run init-svd first")
    check_architecture(loaded, spec)
    _latent_rank(spec, pad_ranks, latent_width)
    if dtype not in WEIGHT_DTYPES:
        raise XecomlaError(f"export --dtype {dtype} is not supported: use float32 or bfloat16")
    if not spec.latent_norm and portable:
        raise XecomlaError(
            "this checkpoint has no latent norm (init-svd --no-latent-norm), so the export emulates DeepSeek-V3's "
            "mandatory kv_a_layernorm with an attention bias, which vLLM, SGLang and llama.cpp drop: --portable "
            "needs a checkpoint made without --no-latent-norm (init-svd's default); without --portable the export "
            "is exact in transformers"
        )


def _latent_rank(spec: MLASpec, pad_ranks: bool, latent_width: int | None) -> tuple[int, list[int]]:
    """(R, padded layers): the exported latent rank and the layers padded to it, or one line saying why not."""
    ranks = [int(r) for r in spec.kv_ranks]
    R = max(ranks)
    extra = 0 if spec.latent_norm else 1
    if latent_width is not None:  # pad every layer so that kv_lora_rank + qk_rope_head_dim = latent_width
        need = R + extra + spec.rope_dim
        if latent_width < need:
            raise XecomlaError(
                f"--latent-width {latent_width} is below this checkpoint's {need} cached values per layer "
                f"(r={R}{' + 1 constant channel' if extra else ''} + p={spec.rope_dim})"
            )
        R = latent_width - spec.rope_dim - extra
        pad_ranks = True
    padded = [i for i, r in enumerate(ranks) if r != R]
    if padded and not pad_ranks:
        raise XecomlaError(
            f"layers have different latent ranks ({_rank_summary(ranks)}) but the DeepSeek-V3 layout has one "
            f"kv_lora_rank: pass --pad-ranks to pad every layer to r={R} with zero channels (exact, but the "
            f"cache grows to {R + extra + spec.rope_dim} values per layer), or {ALTERNATIVE}"
        )
    return R, padded


def check_architecture(loaded, spec: MLASpec) -> None:
    """Refuse what the DeepSeek-V3 layout lacks: original layers, MLP biases, sliding windows, attention biases."""
    unconverted = [i for i, r in enumerate(spec.kv_ranks) if r is None]
    if unconverted:
        raise XecomlaError(
            f"layers {_ranges(unconverted)} keep their original attention (hybrid checkpoint): the DeepSeek-V3 "
            f"layout has MLA in every layer; {ALTERNATIVE}"
        )
    if spec.rope_groups > 1:
        raise XecomlaError(
            f"per-group RoPE slices (rope_groups {spec.rope_groups}) cannot be written in the DeepSeek-V3 layout, "
            "whose RoPE has one frequency per pair index: export with --format xecomla, or init with --method deepseek"
        )
    config = loaded.config
    if getattr(config, "mlp_bias", False):
        raise XecomlaError(f"the MLP has biases (mlp_bias: true), which the DeepSeek-V3 layout lacks; {ALTERNATIVE}")
    windows = {layer_sliding_window(config, i) for i in range(config.num_hidden_layers)} - {None}
    window = min(windows, default=None)
    if window is not None and window < config.max_position_embeddings:
        raise XecomlaError(
            f"the model uses sliding-window attention ({window} tokens < {config.max_position_embeddings} "
            f"positions), which the DeepSeek-V3 layout lacks; {ALTERNATIVE}"
        )
    biases = _attention_biases(model_view(loaded))
    if biases:
        raise XecomlaError(
            f"the attention has biases ({', '.join(biases)}; {loaded.family}) that the DeepSeek-V3 layout cannot "
            f"hold exactly (it has no query or up-projection biases); {ALTERNATIVE}"
        )


def _notes(plan: ExportPlan, spec: MLASpec, max_rank: int) -> list[str]:
    """What the plan changes against the checkpoint, in words for the card and the log."""
    notes = []
    if plan.latent == "identity":
        notes.append(
            "kv_a_layernorm emulates the identity with one constant latent channel (bias C, norm weight 1/s): "
            f"DeepSeek-V3 caches {plan.kv_lora_rank} + {spec.rope_dim} values per token per layer against xecomla's "
            f"{max_rank} + {spec.rope_dim}"
        )
    if plan.queries == "dense-from-lora":
        notes.append(
            f"low-rank queries (q_rank {spec.q_rank}) are exported as the dense product q_b·q_a: DeepSeek-V3's "
            "q_lora applies a norm the checkpoint does not have"
        )
    if plan.queries == "lora-identity":
        notes.append(f"q_a_layernorm emulates the identity with one constant channel (q_lora_rank {plan.q_lora_rank})")
    if plan.padded_layers:
        notes.append(f"layers {_ranges(plan.padded_layers)} are padded with zero latent channels to r={plan.kv_rank}")
        if plan.latent == "norm":
            notes.append(
                "padded latent norms are rescaled by sqrt(r/R): exact but for the norm's eps, which grows to eps·R/r"
            )
    return notes


def _attention_biases(view) -> list[str]:
    """The attention's bias parameters ('q_proj.bias', ...), from the architecture's names (nothing is read)."""
    return sorted(
        {name.split(".self_attn.")[1] for name in view.names() if ".self_attn." in name and name.endswith(".bias")}
    )


def _ranges(items: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for a, b in zip(items, items[1:] + [None], strict=True):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = None
    return ",".join(out)


def _rank_summary(ranks: list[int]) -> str:
    uniq = sorted(set(ranks))
    return ", ".join(f"r={r} in layers {_ranges([i for i, x in enumerate(ranks) if x == r])}" for r in uniq)
