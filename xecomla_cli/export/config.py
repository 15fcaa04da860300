"""The DeepSeek-V3 ``config.json`` of an export: a dense MLP in every layer, our MLA sizes, the base model's RoPE."""

from __future__ import annotations

from typing import Any

from ..mla.spec import MLASpec
from .records import ExportPlan


def rope_parameters(config, theta: float | None = None, kind: str | None = None) -> dict[str, Any]:
    """The base model's rope_parameters, with rope_theta replaced by ``theta`` when given; ``kind``
    "default": plain default RoPE at that theta (no scaling keys)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}
    params = {k: v for k, v in dict(params).items() if v is not None}
    if kind == "default":
        params = {"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)}
    if theta is not None:
        params["rope_theta"] = theta
    return params


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
        rope_parameters=rope_parameters(base, plan.rope_theta, plan.rope_type),
        rope_interleave=True,
        attention_bias=plan.attention_bias,
        attention_dropout=float(getattr(base, "attention_dropout", 0.0) or 0.0),
        num_mtp_layers=0,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    cfg.dtype = plan.dtype
    return cfg
