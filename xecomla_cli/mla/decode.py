"""The decode step of an MLA layer: one new token attends over the latent cache, which is never expanded.

With W_uk (H, n, r) and W_uv (H, h, r) the two halves of the up-projection ``kv_b_proj``:

    q_lat = q_nope · W_uk                                          (B, H, r)  per step, batched over heads
    o_lat = softmax(scale · (q_lat · cᵀ + q_rope · k_ropeᵀ)) · c    (B, H, r)  kernels.mla_decode_auto
    o     = W_o · (o_lat · W_uvᵀ + b_v) + b_o                      (B, d)

The last line folds into one product, ``o = W_ol · o_lat + b_ol`` with ``W_ol = W_o ∘ W_uv``
(d, H·r) and ``b_ol = W_o · b_v + b_o``, which reads d·H·r weights instead of H·h·r + d·H·h:
cheaper when r < d·h / (d − h) (the demo: r = 64 < 72; Llama-3.2-1B at r = 128: not). Where it
is, ``OutputAbsorption`` computes W_ol once and again only when the weights change (at the
prefill, eagerly: a compiled decode step takes it as the last eager call left it). The query side
does not pay: W_q ∘ W_uk would read H·r·d weights instead of H·n·d + H·n·r, more as soon as
r > n·d / (d − n), i.e. about r > n (the demo: 64 > 34).
"""

from __future__ import annotations

import torch

from ..kernels import mla_decode_auto


def output_absorption_pays(hidden_size: int, head_dim: int, kv_rank: int) -> bool:
    """Whether W_o ∘ W_uv (d x H·r) is smaller than W_uv and W_o apart (H·h·r + d·H·h): r (d - h) < d h."""
    return kv_rank * (hidden_size - head_dim) < hidden_size * head_dim


def decode_mask(attention_mask: torch.Tensor | None, L: int) -> torch.Tensor | None:
    """The decode step's row of transformers' 4-D attention mask as (B, L) booleans, True = may attend.

    Boolean masks (SDPA) are sliced, not copied; additive ones (eager) hold 0 where a position may
    be attended and a large negative number where not. No host sync: the mask is never inspected.
    """
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :L]  # (B, L)
    return row if row.dtype == torch.bool else row == 0


def latent_attention(attn, q_nope, q_rope, c, k_rope, attention_mask, seq_lens=None) -> torch.Tensor:
    """o_lat (B, H, r) for one new token of MLA layer `attn`.

    q_nope (B, H, 1, n), q_rope (B, H, 1, p) rotated; c (B, 1, L, r), k_rope (B, 1, L, p);
    attention_mask as transformers passes it (None, bool or additive, (B, 1, 1, ≥L));
    seq_lens (B,) rows of c in use (a static cache), None when all L are.
    """
    w_uk, _ = attn.up_weights()
    # q_lat = q_nope · W_uk, batched over heads: (H, B, n) @ (H, n, r) -> (B, H, r)
    q_lat = torch.bmm(q_nope[:, :, 0].transpose(0, 1), w_uk).transpose(0, 1)
    mask = decode_mask(attention_mask, c.shape[2])  # (B, L) True = may attend, or None
    return mla_decode_auto(q_lat, q_rope[:, :, 0], c[:, 0], k_rope[:, 0], seq_lens, attn.scaling, mask=mask)


def up_project(attn, o_lat: torch.Tensor) -> torch.Tensor:
    """o_lat (B, H, r) -> per-head values (B, H, h): o_lat · W_uvᵀ + b_v (the V bias passes through softmax)."""
    _, w_uv = attn.up_weights()
    # (H, B, r) @ (H, r, h) -> (B, H, h)
    out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
    if attn.kv_b_proj.bias is not None:
        out = out + attn.kv_b_proj.bias.view(attn.num_heads, -1)[:, attn.nope_dim :]
    return out


class OutputAbsorption:
    """W_ol = W_o ∘ W_uv (d, H·r) and b_ol of one layer, recomputed only when either weight changes."""

    def __init__(self):
        self.key = None
        self.weight = self.bias = None

    def __call__(self, attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.compiler.is_compiling() and self.key is not None:  # as made by the eager prefill
            return self.weight, self.bias
        tensors = (attn.o_proj.weight, attn.o_proj.bias, attn.kv_b_proj.weight, attn.kv_b_proj.bias)
        key = tuple(
            (t.data_ptr(), t._version) if t is not None else None for t in tensors
        )  # in-place updates bump _version
        if key != self.key:
            self.weight, self.bias = self.compute(attn)
            self.key = key
        return self.weight, self.bias

    @staticmethod
    @torch.no_grad()
    def compute(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
        H, h, r = attn.num_heads, attn.head_dim, attn.kv_rank
        w_o = attn.o_proj.weight.float().view(-1, H, h)  # (d, H, h)
        _, w_uv = attn.up_weights()  # (H, h, r)
        weight = torch.einsum("dhv,hvr->dhr", w_o, w_uv.float()).reshape(-1, H * r)  # (d, H·r)
        bias = attn.o_proj.bias.float() if attn.o_proj.bias is not None else None
        if attn.kv_b_proj.bias is not None:
            b_v = attn.kv_b_proj.bias.float().view(H, -1)[:, attn.nope_dim :].reshape(H * h)
            bias = w_o.reshape(-1, H * h) @ b_v + (0 if bias is None else bias)
        dtype = attn.o_proj.weight.dtype
        return weight.to(dtype), None if bias is None else bias.to(dtype)
