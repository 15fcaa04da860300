"""The model as llama.cpp tensors and hyper-parameters: ``deepseek2`` for an MLA checkpoint, ``llama`` for an
original (unconverted) Llama / Mistral / Qwen2 model.

deepseek2, per layer (H heads, head dim h = n + p, latent rank R, GGUF shapes in torch order, the
reverse of ggml's ``ne``); the weights come from the DeepSeek-V3 layout (``weights.deepseek_groups``, one layer
at a time), whose RoPE rows are already interleaved pairs, which is llama.cpp's ``LLAMA_ROPE_TYPE_NORM`` for deepseek2:

    blk.i.attn_q            (H·(n + p), d)   q_proj, scaled so that llama.cpp's 1/sqrt(n + p) is our 1/sqrt(h)
    blk.i.attn_kv_a_mqa     (R + p, d)       [c | k_rope]; the c rows scaled by alpha (below)
    blk.i.attn_kv_a_norm    (R,)             the latent RMSNorm
    blk.i.attn_k_b          (H, R, n)        kv_b_proj's K rows per head, transposed (absorbed into q)
    blk.i.attn_v_b          (H, h, R)        kv_b_proj's V rows per head
    blk.i.attn_output       (d, H·h)

llama.cpp applies every RMSNorm with the model's ``rms_norm_eps``; our latent norm has its own eps.
RMSNorm_e(alpha·c) = c / sqrt(ms(c) + e/alpha²), so alpha = sqrt(e_model / e_latent) makes them equal
(with padded ranks alpha² also carries R/r: ``latent_alpha``).

llama: q/k rows permuted from Hugging Face's rotate-half halves to interleaved pairs (llama.cpp's
converter does the same), optional q/k/v biases, ``rope_freqs`` when the RoPE is scaled (llama3).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import XecomlaError
from .config import rope_parameters
from .model_view import model_view
from .weights import deepseek_groups, layer_group, tensor_groups

GGUF_ALTERNATIVE = "export --format hf (DeepSeek-V3 layout for transformers) instead"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def common_tensors(state: dict[str, torch.Tensor], num_layers: int, tied: bool) -> dict[str, np.ndarray]:
    """Embeddings, norms and MLP: the same names in both layouts."""
    out = {
        "token_embd.weight": _np(state["model.embed_tokens.weight"]),
        "output_norm.weight": _np(state["model.norm.weight"]),
    }
    if not tied:
        out["output.weight"] = _np(state["lm_head.weight"])
    for i in range(num_layers):
        src = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = _np(state[src + "input_layernorm.weight"])
        out[f"blk.{i}.ffn_norm.weight"] = _np(state[src + "post_attention_layernorm.weight"])
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[f"blk.{i}.{theirs}.weight"] = _np(state[f"{src}mlp.{ours}.weight"])
    return out


def latent_alpha(eps_model: float, eps_latent: float, rank: int, padded_rank: int) -> float:
    """The scale of the latent rows that makes llama.cpp's RMSNorm (eps_model, mean over padded_rank
    channels, weight already times sqrt(rank/padded_rank)) equal ours (eps_latent over rank channels)."""
    return math.sqrt(eps_model * padded_rank / (eps_latent * rank))


def deepseek2_layer(spec, config, plan, i: int, group: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Decoder layer i's GGUF tensors from its DeepSeek-V3 tensors (``weights.layer_group``)."""
    from ..mla.attention import LatentRMSNorm

    H, n, h, R = spec.num_heads, spec.nope_dim, spec.head_dim, plan.kv_lora_rank
    src = f"model.layers.{i}."
    eps_latent = LatentRMSNorm(1).variance_epsilon  # every MLA layer's latent norm
    alpha = latent_alpha(config.rms_norm_eps, eps_latent, int(spec.kv_ranks[i]), R)
    kv_a = group[src + "self_attn.kv_a_proj_with_mqa.weight"].clone()
    kv_a[:R] *= alpha
    kv_b = group[src + "self_attn.kv_b_proj.weight"].view(H, n + h, R)
    k_b, v_b = kv_b.split([n, h], dim=1)
    out = {
        f"blk.{i}.attn_norm.weight": _np(group[src + "input_layernorm.weight"]),
        f"blk.{i}.ffn_norm.weight": _np(group[src + "post_attention_layernorm.weight"]),
    }
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
        out[f"blk.{i}.{theirs}.weight"] = _np(group[f"{src}mlp.{ours}.weight"])
    a = src + "self_attn."
    out.update(
        {
            f"blk.{i}.attn_q.weight": _np(group[a + "q_proj.weight"]),
            f"blk.{i}.attn_kv_a_mqa.weight": _np(kv_a),
            f"blk.{i}.attn_kv_a_norm.weight": _np(group[a + "kv_a_layernorm.weight"]),
            f"blk.{i}.attn_k_b.weight": _np(k_b.transpose(1, 2)),
            f"blk.{i}.attn_v_b.weight": _np(v_b),
            f"blk.{i}.attn_output.weight": _np(group[a + "o_proj.weight"]),
        }
    )
    return out


TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def deepseek2_groups(loaded, plan) -> Iterator[dict[str, np.ndarray]]:
    """The GGUF tensors of an MLA checkpoint (LoadedModel or on disk), one group at a time (the embeddings, each
    decoder layer, the output norm and head): memory of one layer when the checkpoint is on disk."""
    view = model_view(loaded)
    tied = bool(getattr(view.config, "tie_word_embeddings", False))
    groups = deepseek_groups(view, plan, lm_head=not tied)
    for layer, _ in tensor_groups(view):
        group = next(groups)
        if layer is not None:
            yield deepseek2_layer(view.spec, view.config, plan, layer, group)
        else:
            yield {TOP_NAMES[k]: _np(t) for k, t in group.items()}


def deepseek2_layout(loaded, plan) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``deepseek2_groups`` yields, in order, reading layer 0 only (every layer has
    its shapes: one kv_lora_rank)."""
    view = model_view(loaded)
    tied = bool(getattr(view.config, "tie_word_embeddings", False))
    first = deepseek2_layer(view.spec, view.config, plan, 0, layer_group(view, plan, 0))
    layout = []
    for layer, names in tensor_groups(view):
        if layer is not None:
            layout += [(k.replace("blk.0.", f"blk.{layer}.", 1), v.shape) for k, v in first.items()]
            continue
        for name in names:
            if name == "lm_head.weight" and tied:
                continue
            shape = view.shape("model.embed_tokens.weight" if name == "lm_head.weight" else name)
            layout.append((TOP_NAMES[name], shape))
    return layout


def deepseek2_params(loaded, plan, rope_theta: float) -> dict:
    """The deepseek2 keys llama.cpp's loader reads: a dense MLP in every layer, no experts, no query
    compression (q_lora_rank 0), the MLA head sizes, one KV head of width R + p."""
    spec, config = loaded.spec, loaded.config
    R, p = plan.kv_lora_rank, spec.rope_dim
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": spec.num_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": spec.num_heads,
        "head_count_kv": 1,
        "rope_freq_base": rope_theta,
        "layer_norm_rms_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "leading_dense_block_count": spec.num_layers,
        "q_lora_rank": 0,
        "kv_lora_rank": R,
        "key_length": R + p,
        "value_length": R,
        "key_length_mla": spec.nope_dim + p,
        "value_length_mla": spec.head_dim,
        "expert_feed_forward_length": config.intermediate_size,
        "expert_shared_count": 0,
        "rope_dimension_count": p,
    }


def rope_pairs_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (j, j + h/2) to interleaved pairs (2j, 2j + 1)."""
    rows = w.shape[0] // heads
    return w.reshape(heads, 2, rows // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freq_factors(model, head_dim: int, theta: float) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (divisors of the base frequencies) when the model scales its RoPE, else None."""
    rotary = model.model.rotary_emb
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-7:
        raise XecomlaError(
            f"the RoPE scales attention ({rotary.attention_scaling:g}), which llama.cpp's llama "
            f"arch cannot express; {GGUF_ALTERNATIVE}"
        )
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    actual = rotary.inv_freq.double().cpu()
    if torch.allclose(actual, base, rtol=1e-6, atol=0):
        return None
    return (base / actual).float().numpy()


def llama_tensors(loaded) -> tuple[dict[str, np.ndarray], dict]:
    """GGUF tensors and keys (llama arch) of an original Llama / Mistral / Qwen2 model."""
    model, config = loaded.model, loaded.config
    H, G = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // H
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = common_tensors(state, config.num_hidden_layers, tied)
    for i in range(config.num_hidden_layers):
        src = f"model.layers.{i}.self_attn."
        for ours, theirs, heads in (("q_proj", "attn_q", H), ("k_proj", "attn_k", G), ("v_proj", "attn_v", None)):
            for kind in ("weight", "bias"):
                t = state.get(f"{src}{ours}.{kind}")
                if t is not None:
                    out[f"blk.{i}.{theirs}.{kind}"] = _np(rope_pairs_to_interleaved(t, heads) if heads else t)
        out[f"blk.{i}.attn_output.weight"] = _np(state[src + "o_proj.weight"])
        if src + "o_proj.bias" in state:
            out[f"blk.{i}.attn_output.bias"] = _np(state[src + "o_proj.bias"])
    params = rope_parameters(config)
    if params.get("rope_type", "default") not in ("default", "llama3", "linear"):
        raise XecomlaError(f"rope_type '{params['rope_type']}' is not written by this export; {GGUF_ALTERNATIVE}")
    theta = float(params.get("rope_theta", 10000.0))
    factors = rope_freq_factors(model, hd, theta)
    if factors is not None:
        out["rope_freqs.weight"] = factors
    keys = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": H,
        "head_count_kv": G,
        "rope_freq_base": theta,
        "layer_norm_rms_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "key_length": hd,
        "value_length": hd,
        "rope_dimension_count": hd,
    }
    return out, keys
