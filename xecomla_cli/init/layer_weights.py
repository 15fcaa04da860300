"""A layer's original attention weights, the RoPE plan, and the query / output projections that
every initialisation builds from them the same way.

Shapes (per layer): d hidden, H query heads, G KV heads, h head dim, p RoPE dims, n = h - p,
r latent rank. Weight matrices are (out, in) as in ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .svd import truncated_svd


@dataclass
class AttentionWeights:
    """A layer's original attention weights in fp32 (biases None when absent)."""

    wq: torch.Tensor  # (H·h, d)
    wk: torch.Tensor  # (G·h, d)
    wv: torch.Tensor  # (G·h, d)
    wo: torch.Tensor  # (d, H·h)
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None

    @classmethod
    def of(cls, attn) -> AttentionWeights:
        def f(t):
            return None if t is None else t.detach().float().cpu()

        return cls(
            f(attn.q_proj.weight),
            f(attn.k_proj.weight),
            f(attn.v_proj.weight),
            f(attn.o_proj.weight),
            f(attn.q_proj.bias),
            f(attn.k_proj.bias),
            f(attn.v_proj.bias),
            f(attn.o_proj.bias),
        )

    def heads(self, s: int, S: int) -> AttentionWeights:
        """The rows of the s-th of S equal slices of the query and KV heads (W_o whole)."""

        def rows(t):
            return None if t is None else t[s * (t.shape[0] // S) : (s + 1) * (t.shape[0] // S)]

        w = self
        return AttentionWeights(rows(w.wq), rows(w.wk), rows(w.wv), w.wo, rows(w.bq), rows(w.bk), rows(w.bv), w.bo)


@dataclass
class RopePlan:
    """Which of each head's h dims carry RoPE in MLA, and at which frequencies.

    ``rope_idx`` (p,) lists the original dims that become the RoPE dims, in rotate-half order
    (dim j pairs with dim j + p/2); ``nope_idx`` (n,) the rest; ``inv_freq`` (p/2,).
    ``drop`` (n,) bool, optional: no-RoPE dims whose query·key term is dropped (``init.rope_pairs``).
    """

    rope_idx: torch.Tensor
    nope_idx: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    drop: torch.Tensor | None = None


def repeat_heads(w: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """(G·h, …) -> (H, h, …): KV head g serves query heads g·H/G … (g+1)·H/G − 1 (HF repeat_kv)."""
    w = w.view(num_kv_heads, -1, *w.shape[1:])
    return w.repeat_interleave(num_heads // num_kv_heads, dim=0)


def query_weights(sd: dict[str, torch.Tensor], wq: torch.Tensor, bq: torch.Tensor | None, q_rank: int | None) -> None:
    """The query projection (H·h, d), rows per head [nope | rope], optionally factored by SVD."""
    if q_rank is None:
        sd["q_proj.weight"] = wq
    else:
        u, s, vt = truncated_svd(wq, q_rank)
        sd["q_a_proj.weight"] = s[:, None] * vt
        sd["q_b_proj.weight"] = u
    if bq is not None:
        sd["q_proj.bias" if q_rank is None else "q_b_proj.bias"] = bq


def output_weights(sd: dict[str, torch.Tensor], w: AttentionWeights, latent_norm: bool, rank: int, plan: RopePlan):
    """What every method keeps as it is: the output projection, a unit latent norm, the RoPE frequencies."""
    if latent_norm:
        sd["kv_a_layernorm.weight"] = torch.ones(rank)
    sd["o_proj.weight"] = w.wo
    if w.bo is not None:
        sd["o_proj.bias"] = w.bo
    sd["rope_inv_freq"] = plan.inv_freq.float()
