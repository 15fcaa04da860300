"""Multi-head latent attention that drops into Hugging Face Llama / Qwen2 / Mistral layers.

Per token x (hidden d), with H heads of value dim h, n no-RoPE and p RoPE query/key dims
(n + p = h, except with per-group RoPE slices), latent rank r:

    q            = W_q x                      (H, n + p)   [q_nope | q_rope] per head
    [c ; k_rope] = W_dkv x                    (r + p)      latent and one shared RoPE key
    c            = RMSNorm(c)                 optional (``latent_norm``)
    [k_nope ; v] = W_ukv c                    (H, n + h)   per head, up-projection
    k            = [k_nope | RoPE(k_rope)]    the RoPE key is shared by all heads

Only ``c`` and ``RoPE(k_rope)`` are cached: r + p values per token per layer, as that layer's
"keys" and "values" in the model's ordinary transformers cache. Where that cache would give the
layer a plain ``DynamicLayer`` (which copies itself at every step), the layer's slot gets a
``GrowingLayer`` instead: preallocated, written in place (``kv_cache.py``).

Prefill and training expand K/V and use the model's attention backend (SDPA, eager…).
Decoding (one new token, with a cache) uses the absorbed form, which never expands the cache:
all H heads attend over the one shared row [c, k_rope] per token, like the queries of MQA:

    q_lat = q_nope · W_uk                     (H, r)
    o_lat = softmax(scale · (q_lat · cᵀ + q_rope · k_ropeᵀ)) · c
    o     = o_lat · W_uvᵀ                     (H, h)

The middle line is ``kernels.mla_decode_auto``: the Triton kernel on CUDA, two batched GEMMs elsewhere.
Where it is cheaper, W_uv is folded into ``o_proj`` once per weights (``decode.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .decode import OutputAbsorption, latent_attention, output_absorption_pays, up_project
from .kv_cache import static_seq_lens, use_growing_layer
from .rope import apply_rope, rope_cos_sin
from .spec import attention_shape, layer_sliding_window


class LatentRMSNorm(nn.Module):
    """RMSNorm over the latent (as DeepSeek-V3's ``kv_a_layernorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class MLAAttention(nn.Module):
    """MLA replacement for ``LlamaAttention`` (same forward arguments and return values)."""

    def __init__(
        self,
        config,
        layer_idx: int,
        kv_rank: int,
        rope_dim: int,
        q_rank: int | None = None,
        latent_norm: bool = False,
        bias: bool = False,
        o_bias: bool = False,
        nope_dim: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        shape = attention_shape(config)
        self.num_heads = shape["num_heads"]
        self.head_dim = shape["head_dim"]
        self.kv_rank = kv_rank
        self.rope_dim = rope_dim
        # n: query/key dims without RoPE (h - p by default; fewer with per-group RoPE slices)
        self.nope_dim = self.head_dim - rope_dim if nope_dim is None else nope_dim
        self.qk_head_dim = self.nope_dim + rope_dim  # n + p
        self.q_rank = q_rank
        self.scaling = self.head_dim**-0.5  # the original model's softmax scale, 1/sqrt(h)
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.num_key_value_groups = 1  # K/V are expanded to all heads before the backend
        self.sliding_window = layer_sliding_window(config, layer_idx)
        H, h, d = self.num_heads, self.head_dim, config.hidden_size

        if q_rank is None:
            self.q_proj = nn.Linear(d, H * self.qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(d, q_rank, bias=False)
            self.q_b_proj = nn.Linear(q_rank, H * self.qk_head_dim, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(d, kv_rank + rope_dim, bias=bias)
        self.kv_a_layernorm = LatentRMSNorm(kv_rank) if latent_norm else None
        self.kv_b_proj = nn.Linear(kv_rank, H * (self.nope_dim + h), bias=bias)
        self.o_proj = nn.Linear(H * h, d, bias=o_bias)
        # Per-layer RoPE frequencies of the p RoPE dims (rotate-half pairs), saved with the weights.
        self.register_buffer("rope_inv_freq", torch.zeros(rope_dim // 2), persistent=True)
        self.rope_attention_scaling = 1.0
        # decoding folds W_uv into o_proj when that reads fewer weights (decode.py)
        self.absorb_output = output_absorption_pays(d, h, kv_rank)
        self.output_absorption = OutputAbsorption()

    def _apply(self, fn, recurse=True):
        # Keep the RoPE frequencies in fp32 whatever the module dtype: a bf16 frequency is off
        # by ~0.4%, i.e. radians of phase error a few thousand positions in.
        inv_freq = self.rope_inv_freq
        super()._apply(fn, recurse)
        self._buffers["rope_inv_freq"] = inv_freq.to(device=self.rope_inv_freq.device, dtype=torch.float32)
        return self

    # ---- projections ----------------------------------------------------------------------
    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_proj(x))

    def project_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> c (B, T, r), k_rope (B, T, p) before rotation."""
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            c = self.kv_a_layernorm(c)
        return c, k_rope

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, n, r) and W_uv (H, h, r) from the up-projection."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.head_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        H, n, p = self.num_heads, self.nope_dim, self.rope_dim

        q = self.project_q(hidden_states).view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, n + p)
        q_nope, q_rope = q.split([n, p], dim=-1)
        c, k_rope = self.project_latent(hidden_states)  # (B, T, r), (B, T, p)

        if position_ids is None:
            position_ids = self._default_positions(B, T, past_key_values, hidden_states.device)
        cos, sin = rope_cos_sin(position_ids, self.rope_inv_freq, self.rope_attention_scaling, q.dtype)
        # RoPE on the H query heads and the shared key in one go: (B, H + 1, T, p)
        q_rope, k_rope = apply_rope(torch.cat([q_rope, k_rope.unsqueeze(1)], dim=1), cos, sin).split([H, 1], dim=1)
        c = c.unsqueeze(1)  # (B, 1, T, r)

        seq_lens = None
        if past_key_values is not None:
            # The latent cache: r + p values per token, in the layer's ordinary cache slots.
            use_growing_layer(past_key_values, self.layer_idx)
            c, k_rope = past_key_values.update(c, k_rope, self.layer_idx)  # (B, 1, L, r), (B, 1, L, p)
            seq_lens = static_seq_lens(past_key_values, self.layer_idx, B)  # a static cache: rows in use
            if self.absorb_output and not self.training:  # W_ol made eagerly at prefill, not in a compiled step
                self.output_absorption(self)

        if past_key_values is not None and T == 1 and not self.training:
            o_lat = latent_attention(self, q_nope, q_rope, c, k_rope, attention_mask, seq_lens)  # (B, H, r)
            if self.absorb_output:  # o = W_ol · o_lat + b_ol
                return nn.functional.linear(o_lat.reshape(B, 1, -1), *self.output_absorption(self)), None
            out, attn_weights = up_project(self, o_lat).unsqueeze(1), None  # (B, 1, H, h)
        else:
            out, attn_weights = self.expanded_attention(q_nope, q_rope, c, k_rope, attention_mask, **kwargs)
        out = out.reshape(B, T, H * self.head_dim)
        return self.o_proj(out), attn_weights

    def expanded_attention(self, q_nope, q_rope, c, k_rope, attention_mask, **kwargs):
        """Prefill/training path: expand the latents to per-head K and V, then the model's backend."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        B, H, L = c.shape[0], self.num_heads, c.shape[2]
        kv = self.kv_b_proj(c.squeeze(1)).view(B, L, H, self.nope_dim + self.head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.head_dim], dim=-1)  # (B, H, L, n), (B, H, L, h)
        k = torch.cat([k_nope, k_rope.expand(B, H, L, self.rope_dim)], dim=-1)  # (B, H, L, n + p)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, n + p)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        kwargs.pop("sliding_window", None)
        return attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

    @staticmethod
    def _default_positions(B, T, cache, device):
        start = cache.get_seq_length() if cache is not None else 0
        return torch.arange(start, start + T, device=device).unsqueeze(0).expand(B, T)
