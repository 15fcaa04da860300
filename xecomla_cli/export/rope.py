"""RoPE: every layer's frequencies must be the ones DeepSeek-V3's rotary embedding computes from the config.

DeepSeek-V3 has one ``rope_parameters`` for all layers at dim p = ``qk_rope_head_dim``. What every
engine reads the same way is ``rope_type: default``: frequencies θ'^{-2t/p}. Our inits give that
for the paper's fresh frequencies (θ' = θ), TransMLA's slots at pairs c·t (θ' = θ^{c·p/h}, θ itself
when the fold covers every pair) and the p/2 fastest pairs (θ' = θ^{p/h}; ``fast-pairs``,
``deepseek``), and for a scaled source (Llama 3) by construction (``init.engine_ready``). A scaled
source converted with ``--rope-frequencies source`` keeps its rope_parameters (llama3 at dim p):
exact in transformers, misread by vLLM and SGLang, refused for llama.cpp.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import XecomlaError
from ..mla.rope import default_inv_freq
from .config import deepseek_config, rope_parameters
from .model_view import model_view
from .records import ExportPlan


def deepseek_rope(config_dsv3) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as DeepSeek-V3's rotary embedding computes them."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    rotary = DeepseekV3RotaryEmbedding(config_dsv3)
    return rotary.inv_freq.float().cpu(), float(rotary.attention_scaling)


def frequencies_match(freqs: list[torch.Tensor], inv_freq: torch.Tensor) -> bool:
    """Every layer's RoPE frequencies equal ``inv_freq`` to 1e-6 relative."""
    return all(
        f.shape == inv_freq.shape and torch.allclose(f.float().cpu(), inv_freq, rtol=1e-6, atol=0) for f in freqs
    )


def default_theta(inv_freq: torch.Tensor, base_theta: float, head_dim: int) -> float | None:
    """θ' such that ``inv_freq`` (p/2,) is default RoPE at dim p, θ'^(-2t/p), or None when it is not.

    θ' is snapped to the source's θ^(c·p/h) for a whole c when that is what the frequencies are
    (TransMLA's slots at pairs c·t, the fast pairs at c = 1), so that config.json carries it exactly."""
    f = inv_freq.double().cpu()
    p = 2 * f.numel()
    if f.numel() < 2:
        theta = base_theta
    else:
        t = torch.arange(1, f.numel(), dtype=torch.float64)
        theta = float(torch.exp((-torch.log(f[1:]) * p / (2 * t)).mean()))
        c = math.log(theta) / math.log(base_theta) * head_dim / p
        if abs(c - round(c)) < 1e-3 and round(c) >= 1:
            theta = base_theta ** (round(c) * p / head_dim)
    ok = torch.allclose(f, default_inv_freq(theta, p).double(), rtol=1e-6, atol=0)
    return theta if ok else None


def rope_choice(loaded, plan: ExportPlan) -> tuple[float | None, str | None, list[str]]:
    """(rope_theta, rope_type) to write — (θ', "default") when every layer's RoPE is default RoPE at dim p
    (what llama.cpp, vLLM and SGLang all read exactly), (None, None) for the base model's own
    rope_parameters (a scaled source's frequencies kept: exact in transformers only) — and notes on
    what the export keeps; or one line naming the first layer whose frequencies the config cannot express."""
    loaded = model_view(loaded)
    ropes = [loaded.rope(i) for i in range(loaded.num_layers)]  # (inv_freq (p/2,), attention scaling) per layer
    freqs = [f for f, _ in ropes]
    base = rope_parameters(loaded.config)
    source_type, theta = base.get("rope_type", "default"), float(base.get("rope_theta", 10000.0))
    h = loaded.spec.head_dim
    found = default_theta(freqs[0], theta, h)
    if found is not None and all(default_theta(f, theta, h) == found for f in freqs):
        for i, (_, scaling) in enumerate(ropes):
            if abs(scaling - 1.0) > 1e-7:
                raise XecomlaError(
                    f"layer {i}'s RoPE attention scaling {scaling} has no place in default RoPE; "
                    "export with --format xecomla instead"
                )
        notes = []
        if found != theta:
            notes.append(f"RoPE: default at dim {plan.rope_dim}, rope_theta {found:.6g} (the source's {theta:g})")
        if source_type != "default":
            notes.append(
                f"the source's {source_type} RoPE scaling is not carried: the MLA's RoPE dims turn at default RoPE "
                "(init-svd's engine-exact construction), which llama.cpp, vLLM and SGLang read exactly"
            )
        return found, "default", notes
    # The base model's scaled rope_parameters at dim p (θ, or θ^{p/h} for the fast pairs): the source's frequencies.
    candidates = {}
    for source_theta in (None, theta ** (plan.rope_dim / h)):
        config = deepseek_config(loaded, replace(plan, rope_theta=source_theta, rope_type=None))
        candidates[source_theta] = deepseek_rope(config)
    matching = [t for t, (inv_freq, _) in candidates.items() if frequencies_match(freqs, inv_freq)]
    source_theta = matching[0] if matching else None  # else the errors below name the first layer that differs
    inv_freq, scaling = candidates[source_theta]
    for i, (ours, ours_scaling) in enumerate(ropes):
        if not frequencies_match([ours], inv_freq):
            worst = (ours - inv_freq).abs().max().item() if ours.shape == inv_freq.shape else float("nan")
            raise XecomlaError(
                f"layer {i}'s RoPE frequencies differ from those DeepSeek-V3 computes from the base model's "
                f"rope_parameters ({source_type}, theta {theta:g}, dim {plan.rope_dim}; max difference {worst:.3g}) "
                "and are not default RoPE either: this init keeps per-layer frequencies the layout cannot express "
                "(init with --method transmla, deepseek or fast-pairs to export), or use --format xecomla"
            )
        if abs(ours_scaling - scaling) > 1e-7:
            raise XecomlaError(
                f"layer {i}'s RoPE attention scaling {ours_scaling} differs from DeepSeek-V3's "
                f"{scaling} for these rope_parameters; export with --format xecomla instead"
            )
    return source_theta, None, [SOURCE_ROPE_NOTE.format(kind=source_type)]


SOURCE_ROPE_NOTE = (
    "rope_type '{kind}' as the source has it (init-svd --rope-frequencies source): exact in transformers only; "
    "vLLM and SGLang rewrite it to their DeepSeek YaRN and llama.cpp cannot apply it (wrong outputs there): "
    "re-init with the default --rope-frequencies default to serve it"
)
