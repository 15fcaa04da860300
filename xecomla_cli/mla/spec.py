"""The MLA spec: the single source of every user-facing size (ranks, cache values, ratios).

It is saved in a stage checkpoint's `xecomla.json`; inspect, init-svd, eval and export all
read sizes from here rather than recomputing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")


@dataclass
class MLASpec:
    """Shape of an MLA conversion of a base model.

    `kv_ranks[i]` is the latent rank r of layer i, or None where layer i keeps its original
    attention (hybrid). Every converted layer caches r + rope_dim values per token.

    The RoPE key is one key of p dims shared by all heads (``rope_groups`` 1), or p = S·p_g
    split into S slices (``rope_groups`` S, a divisor of G): query head h reads only the p_g dims
    of its KV group's slice (its other RoPE query dims start at zero). Each head then has
    n = h − p_g no-RoPE dims, unless ``qk_nope_dim`` sets n (TransMLA keeps n = h).
    """

    num_layers: int
    hidden_size: int
    num_heads: int  # H, query heads
    num_kv_heads: int  # G, KV heads of the original model
    head_dim: int  # h
    rope_dim: int  # p, decoupled RoPE dims (shared key)
    kv_ranks: list[int | None]
    q_rank: int | None = None  # low-rank queries (saves parameters, not cache)
    latent_norm: bool = False  # RMSNorm on the latent c (DeepSeek-V3 has one)
    method: str = "paper"  # how the weights were initialised
    rope_groups: int = 1  # S: RoPE key slices, one per S-th of the KV groups (1: one shared key)
    qk_nope_dim: int | None = None  # n when it is not h − p/S
    # ---- what init-svd chose and found (init_record; rope_attention_scaling is read back on load) ----
    kv_svd_rows: str = "all"  # the K/V rows the latent covers: "all" (paper) or "nope-v" (the kept rows)
    energy: float | None = None  # --energy δ, when the ranks came from it
    rope_attention_scaling: float = 1.0  # the base model's RoPE attention scaling, one for every layer
    rope_pairs: dict[str, list] | None = None  # layer -> the original rotate-half pairs kept for RoPE
    freqfold: dict[str, Any] | None = None  # TransMLA's searched fold: {"fold": N, "calibration_loss": {...}}
    rank_budget: int | None = None  # budget: the total rank spread over the converted layers
    calibration: dict[str, Any] | None = None  # a data-aware init's calibration text: {"data", "tokens"}
    latent_width: int | str | None = None  # --latent-width W (or 'vllm'), when the ranks came from it
    # ---- what the engines read (a source with scaled RoPE or attention biases; ``init.engine_ready``) ----
    rope_frequencies: str | None = None  # "default": the RoPE dims turn as default RoPE (θ, unscaled)
    rope_span: int | None = None  # freqfold: only the K fastest pairs get RoPE slots, the slower ones none
    attention_bias: str | None = None  # a biased source's q/k/v biases: "folded" into the weights, or "kept"
    bias_fold: dict[str, Any] | None = None  # folded: per layer, the attention output's relative error

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def group_rope_dim(self) -> int:
        """p_g = p / S: the RoPE dims one query head reads (p with one shared key)."""
        return self.rope_dim // self.rope_groups

    @property
    def nope_dim(self) -> int:
        """n: query/key dims without RoPE, h − p_g (h − p with one shared key) unless set."""
        return self.head_dim - self.group_rope_dim if self.qk_nope_dim is None else self.qk_nope_dim

    @property
    def biases_folded(self) -> bool:
        """The MLA layers are bias-free: a biased source's biases were folded into the weights."""
        return self.attention_bias == "folded"

    @property
    def converted_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.kv_ranks) if r is not None]

    @property
    def original_values_per_token_per_layer(self) -> int:
        """2·G·h: K and V of every KV head."""
        return 2 * self.num_kv_heads * self.head_dim

    def values_per_token(self, layer: int) -> int:
        """Cached values per token in one layer: r + p when converted, else 2·G·h."""
        r = self.kv_ranks[layer]
        return self.original_values_per_token_per_layer if r is None else r + self.rope_dim

    @property
    def values_per_token_total(self) -> int:
        return sum(self.values_per_token(i) for i in range(self.num_layers))

    @property
    def original_values_per_token_total(self) -> int:
        return self.num_layers * self.original_values_per_token_per_layer

    @property
    def compression(self) -> float:
        """Whole-model KV cache compression ratio (original / MLA)."""
        return self.original_values_per_token_total / self.values_per_token_total

    @classmethod
    def for_config(cls, config, rope_dim: int, kv_ranks: list[int | None], **kwargs) -> MLASpec:
        """A spec of a Hugging Face config's shape (``kv_ranks`` all None: the original model)."""
        return cls(**attention_shape(config), rope_dim=rope_dim, kv_ranks=kv_ranks, **kwargs)

    def init_record(self) -> dict[str, Any]:
        """What init-svd chose and found beyond the sizes (the model card lists it), unset ones left out."""
        return {k: getattr(self, k) for k in INIT_RECORD if getattr(self, k) is not None}

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name, default in (("rope_groups", 1), ("qk_nope_dim", None)) + tuple((k, None) for k in INIT_RECORD):
            if d[name] == default:  # written only when used
                del d[name]
        d["cache_values_per_token"] = {
            "per_layer": [self.values_per_token(i) for i in range(self.num_layers)],
            "total": self.values_per_token_total,
            "original_total": self.original_values_per_token_total,
            "compression": round(self.compression, 4),
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLASpec:
        """The spec of an ``xecomla.json``; the ``options`` dict older versions wrote holds the same
        records under the same names (its ``budget_rank`` and ``rope_context`` were never needed)."""
        names = cls.__dataclass_fields__.keys()
        d = {**(d.get("options") or {}), **d}
        return cls(**{k: v for k, v in d.items() if k in names})


INIT_RECORD = (
    "kv_svd_rows",
    "energy",
    "rope_attention_scaling",
    "rope_pairs",
    "freqfold",
    "rank_budget",
    "calibration",
    "latent_width",
    "rope_frequencies",
    "rope_span",
    "attention_bias",
    "bias_fold",
)


def attention_shape(config) -> dict[str, int]:
    """(layers, hidden, H, G, h) of a Hugging Face Llama/Qwen2/Mistral config."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": head_dim,
    }


def source_biases(config) -> tuple[bool, bool]:
    """(q/k/v biases, output bias) of a Llama / Qwen2 / Mistral config (Qwen2 always has q/k/v biases)."""
    if getattr(config, "model_type", None) == "qwen2":
        return True, False
    on = bool(getattr(config, "attention_bias", False))
    return on, on


def attention_kind(num_heads: int, num_kv_heads: int) -> str:
    if num_kv_heads == num_heads:
        return "MHA"
    if num_kv_heads == 1:
        return "MQA"
    return "GQA"


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The sliding window of one layer's attention in tokens, None where the layer attends to all
    positions: ``layer_types`` says per layer where the config has it (Qwen2, Mistral in recent
    transformers), else ``sliding_window`` holds for every layer; ``use_sliding_window: false`` turns it off."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return window
