"""Export a stage checkpoint as a Hugging Face model in the DeepSeek-V3 layout (or our own format).

Stock transformers (no remote code) and the serving engines load ``model_type: deepseek_v3``.
Our MLA maps onto it exactly, per layer (H heads, head dim h = n + p, latent rank r):

    ours                                   DeepSeek-V3
    q_proj [nope n | rope p] per head      q_proj, RoPE rows permuted to interleaved pairs
    kv_a_proj_with_mqa [c r | k_rope p]    kv_a_proj_with_mqa, k_rope rows permuted likewise
    kv_a_layernorm (optional)              kv_a_layernorm (mandatory)
    kv_b_proj [k_nope n | v h] per head    kv_b_proj (qk_nope_head_dim n, v_head_dim h)
    o_proj                                 o_proj
    rope_inv_freq (per layer, p/2)         rope_parameters of the base model at dim p

RoPE: ours pairs dim j with j + p/2 (rotate-half); DeepSeek-V3 (``rope_interleave: true``, the
layout vLLM and SGLang assume) pairs 2i with 2i+1 and returns the rotated pairs in rotate-half
order. Permuting the RoPE rows of q and k_rope by [0, p/2, 1, p/2+1, …] makes its rotated q and k
equal ours bit for bit, and its cached ``k_rot`` identical to ours.

The latent norm. DeepSeek-V3 always applies ``kv_a_layernorm`` (and ``q_a_layernorm`` with
``q_lora_rank``); the paper's MLA has none. Two exact mappings:

* ``norm``: the checkpoint has a latent norm (``init-svd --latent-norm``, trained by distill):
  weights map one to one; no biases, so every engine loads it.
* ``identity`` (the constant channel): one extra latent channel with zero weights and a bias C
  (``attention_bias: true``). With C² ≥ 2^26 · max‖c‖², fp32 computes mean(c_ext²) = C²/(r+1)
  exactly, so RMSNorm(c_ext) = c · s with a constant s, and the norm weight 1/s undoes it (the
  extra channel's weight is 0, so it is cached as 0 and its up-projection column is 0). Exact to
  ~1 ulp; costs one cached value per token per layer (r + 1 + p). C is a power of two times a
  mantissa chosen so that fl(1/s)·s is 1 to within ~1e-5 even in bf16.

Anything else is refused with a line saying why (hybrid layers, query/up-projection biases,
per-layer ranks without --pad-ranks, RoPE frequencies the config cannot express); ``--format
xecomla`` writes our own format instead.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import META_FILE, atomic_directory, command_line, read_meta
from .errors import XecomlaError
from .mla.spec import MLASpec

FORMATS = ("hf", "xecomla")
EXPORT_DTYPES = ("auto", "float32", "bfloat16")
EXPORT_META_FILE = "xecomla_export.json"
MAX_SHARD_SIZE = "4GB"
# Logit agreement the written model must reach before the directory is renamed into place,
# relative to the largest |logit|, computed in fp32 (bf16: against our weights rounded to bf16);
# `verify_export` widens it to the model's own numerical noise. Mapping errors show up as O(1)
# differences; rounding alone gives ~1e-6 on tiny models and ~1e-4 on the 30-layer demo.
VERIFY_RTOL = {"float32": 1e-3, "bfloat16": 2e-3}
# C² must exceed the latent's squared norm by this factor (2^24 is fp32's relative precision).
MARGIN_BITS = 26
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- the plan: how a checkpoint maps onto DeepSeek-V3 ----------------------------------------
@dataclass
class ExportPlan:
    """Every choice the export makes, saved in the export and shown in the model card."""

    latent: str  # "norm" (checkpoint's latent norm) | "identity" (constant-channel emulation)
    queries: str  # "dense" | "dense-from-lora" | "lora-identity"
    kv_rank: int  # the checkpoint's latent rank (padded max with --pad-ranks)
    kv_lora_rank: int  # as exported: kv_rank (+1 with the identity emulation)
    q_lora_rank: int | None
    rope_dim: int
    attention_bias: bool
    dtype: str
    rope_theta: float | None = None  # rope_theta written to config.json, when not the base model's
    padded_layers: list[int] = field(default_factory=list)
    latent_constants: list[float] = field(default_factory=list)  # C per layer (identity)
    q_constants: list[float] = field(default_factory=list)  # C per layer (lora-identity)
    notes: list[str] = field(default_factory=list)

    @property
    def portable(self) -> bool:
        """No attention biases: vLLM and SGLang (which drop DeepSeek attention biases) load it."""
        return not self.attention_bias

    def cache_values_per_token(self, num_layers: int) -> int:
        return num_layers * (self.kv_lora_rank + self.rope_dim)


@dataclass
class ExportResult:
    path: Path
    format: str
    plan: ExportPlan | None
    verify: dict[str, Any] | None = None
    hub_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "plan": asdict(self.plan) if self.plan else None,
            "portable": self.plan.portable if self.plan else None,
            "verify": self.verify,
            "hub_url": self.hub_url,
        }


def plan_export(
    loaded, *, dtype: str = "float32", pad_ranks: bool = False, portable: bool = False, latent_width: int | None = None
) -> ExportPlan:
    """Decide the mapping, or raise one clear line saying why the layout cannot hold it exactly."""
    spec: MLASpec | None = loaded.spec
    alt = "export with --format xecomla (our own format) instead"
    if spec is None:
        raise XecomlaError("this checkpoint has no MLA layers (it is an original model): run init-svd first")
    unconverted = [i for i, r in enumerate(spec.kv_ranks) if r is None]
    if unconverted:
        raise XecomlaError(
            f"layers {_ranges(unconverted)} keep their original attention (hybrid checkpoint): the DeepSeek-V3 "
            f"layout has MLA in every layer; {alt}"
        )
    family = loaded.family
    config = loaded.config
    if getattr(config, "mlp_bias", False):
        raise XecomlaError(f"the MLP has biases (mlp_bias: true), which the DeepSeek-V3 layout lacks; {alt}")
    window = getattr(config, "sliding_window", None)
    if window is not None and _uses_sliding_window(config) and window < config.max_position_embeddings:
        raise XecomlaError(
            f"the model uses sliding-window attention ({window} tokens < {config.max_position_embeddings} "
            f"positions), which the DeepSeek-V3 layout lacks; {alt}"
        )
    biases = _attention_biases(loaded.model)
    if biases:
        raise XecomlaError(
            f"the attention has biases ({', '.join(biases)}; {family}) that the DeepSeek-V3 layout cannot hold "
            f"exactly (it has no query or up-projection biases); {alt}"
        )
    ranks = [int(r) for r in spec.kv_ranks]
    R = max(ranks)
    latent = "norm" if spec.latent_norm else "identity"
    extra = 1 if latent == "identity" else 0
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
            f"cache grows to {R + extra + spec.rope_dim} values per layer), or {alt}"
        )
    if dtype not in DTYPES:
        raise XecomlaError(f"export --dtype {dtype} is not supported: use float32 or bfloat16")

    if latent == "identity" and portable:
        raise XecomlaError(
            "this checkpoint has no latent norm, so the export emulates DeepSeek-V3's mandatory kv_a_layernorm "
            "with an attention bias, which vLLM and SGLang silently drop: --portable needs a checkpoint made with "
            "`init-svd --latent-norm` (then distilled); without --portable the export is exact in transformers"
        )
    attention_bias = latent == "identity"
    if spec.q_rank is None:
        queries, q_lora_rank = "dense", None
    elif attention_bias:
        queries, q_lora_rank = "lora-identity", spec.q_rank + 1
    else:  # keep the export bias-free (portable): DeepSeek-V3's q_lora would need a norm we lack
        queries, q_lora_rank = "dense-from-lora", None
    plan = ExportPlan(
        latent=latent, queries=queries, kv_rank=R, kv_lora_rank=R + extra,
        q_lora_rank=q_lora_rank, rope_dim=spec.rope_dim, attention_bias=attention_bias, dtype=dtype,
        padded_layers=padded,
    )  # fmt: skip
    _check_rope(loaded, plan)
    if latent == "identity":
        plan.notes.append(
            "kv_a_layernorm emulates the identity with one constant latent channel (bias C, norm weight 1/s): "
            f"DeepSeek-V3 caches {plan.kv_lora_rank} + {spec.rope_dim} values per token per layer against xecomla's "
            f"{max(ranks)} + {spec.rope_dim}"
        )
    if queries == "dense-from-lora":
        plan.notes.append(
            f"low-rank queries (q_rank {spec.q_rank}) are exported as the dense product q_b·q_a: DeepSeek-V3's "
            "q_lora applies a norm the checkpoint does not have"
        )
    if queries == "lora-identity":
        plan.notes.append(f"q_a_layernorm emulates the identity with one constant channel (q_lora_rank {q_lora_rank})")
    if padded:
        plan.notes.append(f"layers {_ranges(padded)} are padded with zero latent channels to r={R}")
        if latent == "norm":
            plan.notes.append(
                "padded latent norms are rescaled by sqrt(r/R): exact but for the norm's eps, which grows to eps·R/r"
            )
    return plan


def _uses_sliding_window(config) -> bool:
    if getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any(t == "sliding_attention" for t in layer_types)
    return True


def _attention_biases(model) -> list[str]:
    from .mla.convert import decoder_layers

    names: set[str] = set()
    for layer in decoder_layers(model):
        for name, _ in layer.self_attn.named_parameters():
            if name.endswith(".bias"):
                names.add(name)
    return sorted(names)


def _ranges(items: list[int]) -> str:
    out, start = [], None
    for a, b in zip(items, items[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = None
    return ",".join(out)


def _rank_summary(ranks: list[int]) -> str:
    uniq = sorted(set(ranks))
    return ", ".join(f"r={r} in layers {_ranges([i for i, x in enumerate(ranks) if x == r])}" for r in uniq)


# ---- RoPE -------------------------------------------------------------------------------------
def _rope_parameters(config, theta: float | None = None) -> dict[str, Any]:
    """The base model's rope_parameters, with rope_theta replaced by ``theta`` when given."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}
    params = {k: v for k, v in dict(params).items() if v is not None}
    if theta is not None:
        params["rope_theta"] = theta
    return params


def _frequencies_match(attns: list, inv_freq: torch.Tensor) -> bool:
    """Every layer's RoPE frequencies equal ``inv_freq`` to 1e-6 relative."""
    return all(
        a.rope_inv_freq.shape == inv_freq.shape and torch.allclose(a.rope_inv_freq.float().cpu(), inv_freq, rtol=1e-6, atol=0)
        for a in attns
    )


def deepseek_rope(config_dsv3) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as DeepSeek-V3's rotary embedding computes them."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    rotary = DeepseekV3RotaryEmbedding(config_dsv3)
    return rotary.inv_freq.float().cpu(), float(rotary.attention_scaling)


def _check_rope(loaded, plan: ExportPlan) -> None:
    """Every layer's RoPE frequencies must be the ones the exported rope_parameters give.

    Two layouts qualify: the base model's rope_parameters at dim p (the paper init's fresh
    frequencies), and the same with rope_theta' = θ^{p/h}, whose frequencies at dim p are the
    original model's p/2 fastest pairs θ^{-2j/h}, j < p/2 (``--method fast-pairs``, ``deepseek``).
    """
    from .mla.convert import decoder_layers

    attns = [layer.self_attn for layer in decoder_layers(loaded.model)]
    config = deepseek_config(loaded, plan)
    inv_freq, scaling = deepseek_rope(config)
    if not _frequencies_match(attns, inv_freq):
        theta = float(config.rope_parameters.get("rope_theta", 10000.0))
        plan.rope_theta = theta ** (plan.rope_dim / loaded.spec.head_dim)
        fast_config = deepseek_config(loaded, plan)
        fast_freq, fast_scaling = deepseek_rope(fast_config)
        if _frequencies_match(attns, fast_freq):
            config, inv_freq, scaling = fast_config, fast_freq, fast_scaling
            plan.notes.append(
                f"RoPE on the original model's {plan.rope_dim // 2} fastest frequency pairs: rope_theta "
                f"{theta:g}^({plan.rope_dim}/{loaded.spec.head_dim}) = {plan.rope_theta:.6g} at dim {plan.rope_dim}"
            )
        else:
            plan.rope_theta = None
    rope_type = config.rope_parameters.get("rope_type", "default")
    for i, attn in enumerate(attns):
        if not _frequencies_match([attn], inv_freq):
            ours = attn.rope_inv_freq.float().cpu()
            worst = (ours - inv_freq).abs().max().item() if ours.shape == inv_freq.shape else float("nan")
            raise XecomlaError(
                f"layer {i}'s RoPE frequencies differ from those DeepSeek-V3 computes from the base model's "
                f"rope_parameters ({rope_type}, theta {config.rope_parameters.get('rope_theta')}, dim "
                f"{plan.rope_dim}; max difference {worst:.3g}): this init keeps per-layer frequencies the layout "
                "cannot express (init with --method deepseek or fast-pairs to export), or use --format xecomla"
            )
        if abs(float(attn.rope_attention_scaling) - scaling) > 1e-7:
            raise XecomlaError(
                f"layer {i}'s RoPE attention scaling {attn.rope_attention_scaling} differs from DeepSeek-V3's "
                f"{scaling} for these rope_parameters; export with --format xecomla instead"
            )
    if not all(torch.equal(attn.rope_inv_freq.float().cpu(), inv_freq) for attn in attns):
        plan.notes.append("RoPE frequencies agree with DeepSeek-V3's to 1e-6 relative (not bit for bit)")
    if rope_type != "default":
        plan.notes.append(
            f"rope_type '{rope_type}': transformers matches exactly; vLLM maps every non-default DeepSeek rope "
            "type to its own YaRN variant, so check vLLM output before serving"
        )


# ---- config -----------------------------------------------------------------------------------
def deepseek_config(loaded, plan: ExportPlan):
    """The DeepSeek-V3 config: dense MLP in every layer, our MLA sizes, the base model's RoPE."""
    from transformers import DeepseekV3Config

    base = loaded.config
    spec: MLASpec = loaded.spec
    L = spec.num_layers

    def tok(name):
        return getattr(base, name, None)

    cfg = DeepseekV3Config(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        moe_intermediate_size=base.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,  # K/V are expanded per head: no grouping
        n_shared_experts=1,
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        first_k_dense_replace=L,  # dense MLP in every layer: no MoE module is built
        kv_lora_rank=plan.kv_lora_rank,
        q_lora_rank=plan.q_lora_rank,
        qk_rope_head_dim=spec.rope_dim,
        qk_nope_head_dim=spec.nope_dim,
        v_head_dim=spec.head_dim,
        hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings,
        initializer_range=getattr(base, "initializer_range", 0.02),
        rms_norm_eps=base.rms_norm_eps,
        use_cache=True,
        pad_token_id=tok("pad_token_id"),
        bos_token_id=tok("bos_token_id"),
        eos_token_id=tok("eos_token_id"),
        tie_word_embeddings=bool(getattr(base, "tie_word_embeddings", False)),
        rope_parameters=_rope_parameters(base, plan.rope_theta),
        rope_interleave=True,
        attention_bias=plan.attention_bias,
        attention_dropout=float(getattr(base, "attention_dropout", 0.0) or 0.0),
        num_mtp_layers=0,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.dtype = plan.dtype
    return cfg


# ---- weights ----------------------------------------------------------------------------------
def interleave_perm(p: int) -> torch.Tensor:
    """Row order that turns rotate-half pairs (j, j + p/2) into interleaved pairs (2i, 2i + 1)."""
    half = torch.arange(p // 2)
    return torch.stack([half, half + p // 2], dim=1).flatten()


def latent_bound(weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor) -> float:
    """An upper bound of ‖W x + b‖ over every input x = ln_weight ⊙ x̂, ‖x̂‖² ≤ d (an RMSNorm output)."""
    d = weight.shape[1]
    w = weight.double() * ln_weight.double().abs()[None, :]
    bound = torch.linalg.matrix_norm(w, ord=2).item() * math.sqrt(d)
    if bias is not None:
        bound += bias.double().norm().item()
    return bound


def norm_scale(C: float, channels: int, dtype: torch.dtype) -> float:
    """s such that DeepSeek-V3's RMSNorm maps [x, C] (x negligible against C) to [x·s, C·s]·weight,
    computed with the very operations of ``DeepseekV3RMSNorm`` (eps 1e-6)."""
    v = torch.zeros(channels, dtype=dtype)
    v[-1] = C
    h = v.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    return float(torch.rsqrt(variance + 1e-6).item())


def identity_constant(bound: float, channels: int, dtype: torch.dtype) -> tuple[float, float]:
    """(C, w): the extra channel's bias C and the norm weight w = 1/s for the real channels.

    C = 2^k·m with C² ≥ 2^MARGIN_BITS · bound², and the mantissa m (exact in bf16) chosen so that
    w rounded to ``dtype`` times s is closest to 1.
    """
    k = MARGIN_BITS // 2 + math.ceil(math.log2(max(bound, 1e-30)))
    k = max(k, 0)
    if k > 60:
        raise XecomlaError(
            f"a latent is too large (bound {bound:.3g}) for the identity emulation to stay in fp32 range: "
            "export with --format xecomla instead"
        )
    best = None
    for j in range(128):
        C = 2.0**k * (1 + j / 128)
        s = norm_scale(C, channels, dtype)
        w = float(torch.tensor(1.0 / s, dtype=torch.float64).to(dtype).item())
        err = abs(w * s - 1.0)
        if best is None or err < best[0]:
            best = (err, C, w)
    return best[1], best[2]


def deepseek_state_dict(loaded, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in the DeepSeek-V3 layout (fp32 math, cast to the export dtype)."""
    from .mla.convert import decoder_layers

    spec: MLASpec = loaded.spec
    model = loaded.model
    dtype = DTYPES[plan.dtype]
    H, h, p, n = spec.num_heads, spec.head_dim, spec.rope_dim, spec.nope_dim
    R, Rx = plan.kv_rank, plan.kv_lora_rank
    perm = interleave_perm(p)
    q_order = torch.cat([torch.arange(n), n + perm])  # per head: [nope | rope permuted]

    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".self_attn." in name or name.endswith("rotary_emb.inv_freq"):
            continue
        state[name] = t.detach().float().cpu()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)

    plan.latent_constants, plan.q_constants = [], []
    for i, layer in enumerate(decoder_layers(model)):
        a = layer.self_attn
        prefix = f"model.layers.{i}.self_attn."
        ln_w = layer.input_layernorm.weight.detach().float().cpu()
        r = a.kv_rank
        d = a.kv_a_proj_with_mqa.weight.shape[1]

        # Queries.
        if plan.queries == "dense":
            wq = a.q_proj.weight.detach().float().cpu().view(H, h, d)[:, q_order].reshape(H * h, d)
            state[prefix + "q_proj.weight"] = wq
        elif plan.queries == "dense-from-lora":
            wq = (a.q_b_proj.weight.detach().double() @ a.q_a_proj.weight.detach().double()).float().cpu()
            state[prefix + "q_proj.weight"] = wq.view(H, h, d)[:, q_order].reshape(H * h, d)
        else:  # lora-identity: [q_a; 0] with bias [0; C], norm weight 1/s, q_b gets a zero column
            qr = a.q_rank
            qa = a.q_a_proj.weight.detach().float().cpu()
            C, w = identity_constant(latent_bound(qa, None, ln_w), qr + 1, dtype)
            plan.q_constants.append(C)
            state[prefix + "q_a_proj.weight"] = torch.cat([qa, torch.zeros(1, d)])
            state[prefix + "q_a_proj.bias"] = torch.cat([torch.zeros(qr), torch.tensor([C])])
            state[prefix + "q_a_layernorm.weight"] = torch.cat([torch.full((qr,), w), torch.zeros(1)])
            qb = a.q_b_proj.weight.detach().float().cpu().view(H, h, qr)[:, q_order].reshape(H * h, qr)
            state[prefix + "q_b_proj.weight"] = torch.cat([qb, torch.zeros(H * h, 1)], dim=1)

        # KV latent and the shared RoPE key: rows [c (r) | zero padding (R - r) | constant (identity) | k_rope].
        wkv = a.kv_a_proj_with_mqa.weight.detach().float().cpu()
        w_c, w_rope = wkv[:r], wkv[r:][perm]
        pad = Rx - r
        state[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat([w_c, torch.zeros(pad, d), w_rope])
        wb = a.kv_b_proj.weight.detach().float().cpu()  # (H·(n + h), r)
        state[prefix + "kv_b_proj.weight"] = torch.cat([wb, torch.zeros(wb.shape[0], pad)], dim=1)
        if plan.latent == "norm":
            g = a.kv_a_layernorm.weight.detach().float().cpu()
            if R != r:  # mean over R channels instead of r: rescale (exact up to eps)
                g = g * math.sqrt(r / R)
            state[prefix + "kv_a_layernorm.weight"] = torch.cat([g, torch.zeros(R - r)])
        else:
            C, w = identity_constant(latent_bound(w_c, None, ln_w), Rx, dtype)
            plan.latent_constants.append(C)
            bias = torch.zeros(Rx + p)
            bias[Rx - 1] = C
            state[prefix + "kv_a_proj_with_mqa.bias"] = bias
            state[prefix + "kv_a_layernorm.weight"] = torch.cat([torch.full((Rx - 1,), w), torch.zeros(1)])
        state[prefix + "o_proj.weight"] = a.o_proj.weight.detach().float().cpu()
        if plan.attention_bias:
            state[prefix + "o_proj.bias"] = torch.zeros(a.o_proj.weight.shape[0])
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


# ---- writing ----------------------------------------------------------------------------------
def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "hf",
    dtype: str = "auto",
    pad_ranks: bool = False,
    portable: bool = False,
    latent_width: int | None = None,
    verify: bool = True,
    force: bool = False,
    loaded=None,
) -> ExportResult:
    """Write the export directory atomically (verified before it is renamed into place)."""
    from .checkpoint import load_checkpoint
    from .model_card import lineage, render_card

    if fmt not in FORMATS:
        raise XecomlaError(f"unknown --format '{fmt}': choose hf (DeepSeek-V3 layout) or xecomla")
    if dtype not in EXPORT_DTYPES:
        raise XecomlaError(f"unknown --dtype '{dtype}' for export: use auto, float32 or bfloat16")
    ckpt_dir = Path(ckpt_dir).resolve()
    out_dir = Path(out_dir)
    meta = read_meta(ckpt_dir)
    if out_dir.resolve() == ckpt_dir:
        raise XecomlaError("the export directory is the checkpoint itself: choose another -o")
    if out_dir.exists() and not force:
        raise XecomlaError(f"output '{out_dir}' already exists: pass --force to replace it, or choose another -o")
    export_command = _export_command(ckpt_dir)
    history = lineage(ckpt_dir, meta)

    if fmt == "xecomla":
        spec = MLASpec.from_dict(meta["mla"]) if meta.get("mla") else None

        def write_own(tmp: Path) -> None:
            for f in sorted(ckpt_dir.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            (tmp / "README.md").write_text(render_card(meta, spec, None, history, export_command, "xecomla"))

        path = atomic_directory(out_dir, write_own, force=force)
        return ExportResult(path, "xecomla", None)

    if dtype == "auto":
        dtype = meta.get("dtype", "float32")
        dtype = dtype if dtype in DTYPES else "float32"
    loaded = loaded or load_checkpoint(ckpt_dir, dtype="float32", device="cpu")
    plan = plan_export(loaded, dtype=dtype, pad_ranks=pad_ranks, portable=portable, latent_width=latent_width)
    config = deepseek_config(loaded, plan)
    state = deepseek_state_dict(loaded, plan)
    report: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(state, tmp, max_shard_size=MAX_SHARD_SIZE)
        config.save_pretrained(tmp)
        _generation_config(ckpt_dir, loaded).save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_META_FILE).write_text(json.dumps(_export_meta(meta, plan, export_command), indent=2) + "\n")
        if verify:
            report.update(verify_export(tmp, loaded, plan))
        card = render_card(meta, loaded.spec, plan, history, export_command, "hf", report or None)
        (tmp / "README.md").write_text(card)

    path = atomic_directory(out_dir, write, force=force)
    return ExportResult(path, "hf", plan, report or None)


def _export_command(ckpt_dir: Path) -> str:
    """This command line, with a '-' (path read from stdin) replaced by the checkpoint it read."""
    words = command_line().split(" ")
    if "export" in words:
        at = words.index("export")
        if "-" in words[at + 1 :]:
            words[words.index("-", at + 1)] = str(ckpt_dir)
    return " ".join(words)


def _generation_config(ckpt_dir: Path, loaded):
    from transformers import GenerationConfig

    if (ckpt_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(ckpt_dir)
    return GenerationConfig.from_model_config(loaded.config)


def _export_meta(meta: dict, plan: ExportPlan, command: str) -> dict:
    return {
        "exported_from": {
            k: meta.get(k) for k in ("stage", "source", "parent", "command", "created", "xecomla_version")
        },
        "mla": meta.get("mla"),
        "metrics": meta.get("metrics", {}),
        "export": {"command": command, "plan": asdict(plan), "portable": plan.portable},
    }


# ---- verification -----------------------------------------------------------------------------
VERIFY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? "
    "Multi-head latent attention caches one small vector per token."
)


def verify_inputs(tokenizer, vocab_size: int, length: int = 48) -> torch.Tensor:
    ids = tokenizer(VERIFY_TEXT, return_tensors="pt")["input_ids"][:, :length]
    if ids.shape[1] < 8:
        ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return ids


@torch.no_grad()
def verify_export(directory: Path, loaded, plan: ExportPlan) -> dict[str, Any]:
    """Load the written directory with stock transformers (no remote code) and compare logits and
    a short greedy continuation with xecomla's model of the checkpoint (fp32 compute).

    The allowed difference is the larger of a fixed relative tolerance and the model's own
    numerical noise: twice our model's SDPA-vs-eager difference, and for a bf16 export half of
    what computing our model in bf16 changes (an ill-conditioned model, e.g. an untrained paper
    init, amplifies ulp-level differences a thousandfold).
    """
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False).eval()
    ours = loaded.model
    restore = {k: v.clone() for k, v in ours.state_dict().items()} if plan.dtype != "float32" else None
    if restore is not None:  # compare against our model with weights rounded the same way
        for k, t in ours.state_dict().items():
            if t.is_floating_point() and not k.endswith("rope_inv_freq"):  # kept in fp32 by design
                t.copy_(t.to(DTYPES[plan.dtype]).float())
    impl = ours.config._attn_implementation
    try:
        ids = verify_inputs(loaded.tokenizer, loaded.config.vocab_size).to(next(ours.parameters()).device)
        a = ours(ids).logits.float()
        b = exported(ids.to(exported.device)).logits.float()
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id or 0)
        prompt = ids[:, :16]
        out_ours = ours.generate(prompt, **gen)[0, prompt.shape[1] :].tolist()
        out_exp = exported.generate(prompt.to(exported.device), **gen)[0, prompt.shape[1] :].tolist()
        ours.config._attn_implementation = "eager"
        noise = (ours(ids).logits.float() - a).abs().max().item()
        ours.config._attn_implementation = impl
        noise_dtype = 0.0
        if restore is not None:
            ours.to(DTYPES[plan.dtype])
            noise_dtype = (ours(ids).logits.float() - a).abs().max().item()
    finally:
        ours.config._attn_implementation = impl
        if restore is not None:
            ours.float()
            ours.load_state_dict(restore)
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    allowed = max(VERIFY_RTOL[plan.dtype] * scale, 2 * noise, 0.5 * noise_dtype)
    report = {
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / max(scale, 1e-30),
        "allowed": allowed,
        "noise_sdpa_vs_eager": noise,
        "greedy_tokens_equal": out_ours == out_exp,
        "tokens": len(ids[0]),
    }
    if restore is not None:
        report[f"noise_{plan.dtype}_compute"] = noise_dtype
    if diff > allowed:
        raise XecomlaError(
            f"the exported model's logits differ from xecomla's by {diff:.3g} (max |logit| {scale:.3g}, allowed "
            f"{allowed:.3g}): nothing was written; report this with the checkpoint's xecomla.json"
        )
    return report


# ---- Hugging Face Hub -------------------------------------------------------------------------
def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload an export directory with the user's login or HF_TOKEN; the token is never printed."""
    import os

    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(token=token)

    def scrub(exc: BaseException) -> str:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if token:
            text = text.replace(token, "***")
        return text

    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            folder_path=str(directory),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=f"xecomla export ({Path(directory).name})",
        )
    except Exception as exc:  # hub errors: auth, permissions, network
        hint = "run `hf auth login` or set HF_TOKEN" if _is_auth_error(exc) else "check the repo id and your network"
        raise XecomlaError(f"push to the Hugging Face Hub repo '{repo_id}' failed ({scrub(exc)}): {hint}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return str(url)


def _is_auth_error(exc: BaseException) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403) or "token" in str(exc).lower() or "login" in str(exc).lower()
