"""RoPE: every layer's frequencies must be the ones DeepSeek-V3's rotary embedding computes from the config.

DeepSeek-V3 has one ``rope_parameters`` for all layers at dim p = ``qk_rope_head_dim``. Two
layouts of ours qualify: the base model's rope_parameters at dim p (the paper init's fresh
frequencies), and the same with rope_theta' = θ^{p/h}, whose frequencies at dim p,
θ'^{-2j/p} = θ^{-2j/h} for j < p/2, are the original model's p/2 fastest pairs
(``--method fast-pairs``, ``deepseek``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..errors import XecomlaError
from ..mla.rebuild import decoder_layers
from .config import deepseek_config

if TYPE_CHECKING:  # annotations only: plan.py imports this module
    from .plan import ExportPlan


def deepseek_rope(config_dsv3) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as DeepSeek-V3's rotary embedding computes them."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    rotary = DeepseekV3RotaryEmbedding(config_dsv3)
    return rotary.inv_freq.float().cpu(), float(rotary.attention_scaling)


def frequencies_match(attns: list, inv_freq: torch.Tensor) -> bool:
    """Every layer's RoPE frequencies equal ``inv_freq`` to 1e-6 relative."""
    return all(
        a.rope_inv_freq.shape == inv_freq.shape
        and torch.allclose(a.rope_inv_freq.float().cpu(), inv_freq, rtol=1e-6, atol=0)
        for a in attns
    )


def rope_choice(loaded, plan: ExportPlan) -> tuple[float | None, list[str]]:
    """The ``rope_theta`` to write (θ^{p/h} for the fast-pairs layout, None for the base model's) and
    notes on what the export keeps, or one line naming the first layer whose frequencies the config
    cannot express."""
    attns = [layer.self_attn for layer in decoder_layers(loaded.model)]
    config = deepseek_config(loaded, replace(plan, rope_theta=None))
    inv_freq, scaling = deepseek_rope(config)
    rope_theta, notes = None, []
    if not frequencies_match(attns, inv_freq):
        theta = float(config.rope_parameters.get("rope_theta", 10000.0))
        fast_theta = theta ** (plan.rope_dim / loaded.spec.head_dim)
        fast_config = deepseek_config(loaded, replace(plan, rope_theta=fast_theta))
        fast_freq, fast_scaling = deepseek_rope(fast_config)
        if frequencies_match(attns, fast_freq):
            config, inv_freq, scaling, rope_theta = fast_config, fast_freq, fast_scaling, fast_theta
            notes.append(
                f"RoPE on the original model's {plan.rope_dim // 2} fastest frequency pairs: rope_theta "
                f"{theta:g}^({plan.rope_dim}/{loaded.spec.head_dim}) = {fast_theta:.6g} at dim {plan.rope_dim}"
            )
    rope_type = config.rope_parameters.get("rope_type", "default")
    for i, attn in enumerate(attns):
        if not frequencies_match([attn], inv_freq):
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
        notes.append("RoPE frequencies agree with DeepSeek-V3's to 1e-6 relative (not bit for bit)")
    if rope_type != "default":
        notes.append(
            f"rope_type '{rope_type}': transformers matches exactly; vLLM maps every non-default DeepSeek rope "
            "type to its own YaRN variant, so check vLLM output before serving"
        )
    return rope_theta, notes
