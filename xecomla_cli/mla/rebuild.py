"""Rebuild MLA modules from an `MLASpec`: swap a loaded model's attention modules for (uninitialised)
MLA ones, and find which layers of a model are MLA already."""

from __future__ import annotations

from torch import nn

from .attention import MLAAttention
from .spec import MLASpec, attention_shape


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a Llama/Qwen2/Mistral causal LM."""
    return model.model.layers


def mla_layers(model) -> list[int]:
    """The indices of the decoder layers whose attention is MLA (in a loaded model)."""
    return [i for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, MLAAttention)]


def has_qkv_bias(attn: nn.Module) -> bool:
    return getattr(attn.q_proj, "bias", None) is not None


def has_o_bias(attn: nn.Module) -> bool:
    return getattr(attn.o_proj, "bias", None) is not None


def new_mla_attention(config, spec: MLASpec, layer_idx: int, bias: bool, o_bias: bool) -> MLAAttention:
    return MLAAttention(
        config,
        layer_idx,
        kv_rank=spec.kv_ranks[layer_idx],
        rope_dim=spec.rope_dim,
        q_rank=spec.q_rank,
        latent_norm=spec.latent_norm,
        bias=bias,
        o_bias=o_bias,
        nope_dim=spec.nope_dim,
    )


def apply_spec(model, spec: MLASpec) -> None:
    """Replace each converted layer's attention by an (uninitialised) MLAAttention in place.

    Used to rebuild a checkpoint's architecture before loading its weights.
    """
    layers = decoder_layers(model)
    for i in spec.converted_layers:
        old = layers[i].self_attn
        new = new_mla_attention(model.config, spec, i, has_qkv_bias(old) and not spec.biases_folded, has_o_bias(old))
        new.rope_attention_scaling = spec.rope_attention_scaling
        new.train(old.training)
        layers[i].self_attn = new.to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype)


def spec_shape_matches(config, spec: MLASpec) -> bool:
    shape = attention_shape(config)
    return all(getattr(spec, k) == v for k, v in shape.items())
