"""The activation statistics the data-aware initialisations need, and the calibration loss.

Statistics are collected layer by layer (``layerwise``): the calibration batch's hidden states
are kept in memory and pushed through one decoder layer at a time, so a layer can be converted
before the next layer's inputs are computed (sequential calibration) or the original model's
activations can be used for every layer (one pass; the same as forward hooks). Per layer we
keep, over the N calibration tokens, with x the attention input (after ``input_layernorm``):

    xx      Σ [x;1][x;1]ᵀ           (d+1, d+1) fp64: second moment and mean (bias columns)
    q_norm  Σ ||q_{h,j}||           (H, h/2)  norm of each rotate-half pair j of each query head
    k_norm  Σ ||k_{g,j}||           (G, h/2)  the same for each KV head (pre-RoPE: RoPE keeps norms)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layerwise import MICRO_BATCH, LayerRunner


@dataclass
class LayerStats:
    """Calibration statistics of one layer's attention input (sums over ``n`` tokens)."""

    n: int
    xx: torch.Tensor  # (d+1, d+1) fp64, Σ [x;1][x;1]ᵀ
    q_norm: torch.Tensor  # (H, h/2) fp64, Σ ||q pair||
    k_norm: torch.Tensor  # (G, h/2) fp64, Σ ||k pair||

    @property
    def cov(self) -> torch.Tensor:
        """E[x xᵀ] (d, d), fp64 (uncentred: the metric of output errors of bias-free maps)."""
        return self.xx[:-1, :-1] / self.n

    @property
    def cov_aug(self) -> torch.Tensor:
        """E[[x;1][x;1]ᵀ] (d+1, d+1), fp64: the metric of affine maps W x + b."""
        return self.xx / self.n

    @property
    def q_pair_norm(self) -> torch.Tensor:
        """E||q_{h,j}|| (H, h/2)."""
        return self.q_norm / self.n

    @property
    def k_pair_norm(self) -> torch.Tensor:
        """E||k_{g,j}|| (G, h/2)."""
        return self.k_norm / self.n

    def heads(self, s: int, S: int) -> LayerStats:
        """The statistics of the s-th of S equal slices of the query and KV heads (same inputs)."""
        H, G = self.q_norm.shape[0] // S, self.k_norm.shape[0] // S
        return LayerStats(self.n, self.xx, self.q_norm[s * H : (s + 1) * H], self.k_norm[s * G : (s + 1) * G])


def pair_norms(y: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, heads·h) -> (heads, h/2): Σ over tokens of the norm of each rotate-half pair (j, j+h/2).

    ``hypot`` of the two halves: the reference ``y.norm(dim=2)`` gives the same to the last bit or
    so, but a norm over a strided dim of size 2 took 0.14 s per call (60x hypot's time; 8 % of the
    demo's whole init)."""
    y = y.view(y.shape[0], heads, 2, -1)  # (N, heads, 2, h/2): halves of rotate-half
    return torch.hypot(y[:, :, 0], y[:, :, 1]).sum(0).double()


def attention_stats(attn, x: torch.Tensor, stats: LayerStats | None = None) -> LayerStats:
    """Accumulate the statistics of attention inputs x (N, d) for the original attention ``attn``."""
    x = x.reshape(-1, x.shape[-1]).float()
    N, d = x.shape
    H = attn.config.num_attention_heads
    G = getattr(attn.config, "num_key_value_heads", None) or H
    x1 = torch.cat([x, x.new_ones(N, 1)], dim=1)
    xx = (x1.T @ x1).double()
    q = attn.q_proj(x.to(attn.q_proj.weight.dtype)).float()
    k = attn.k_proj(x.to(attn.k_proj.weight.dtype)).float()
    qn, kn = pair_norms(q, H), pair_norms(k, G)
    if stats is None:
        return LayerStats(N, xx, qn, kn)
    stats.n += N
    stats.xx += xx
    stats.q_norm += qn
    stats.k_norm += kn
    return stats


@torch.no_grad()
def layer_stats(runner: LayerRunner, i: int) -> LayerStats:
    """Statistics of layer i's attention input for the runner's current hidden states."""
    layer = runner.layers[i]
    s = None
    for c in runner.chunks:
        s = attention_stats(layer.self_attn, layer.input_layernorm(c.h), s)
    return s


@torch.no_grad()
def calibration_loss(model, input_ids: torch.Tensor, tokens: int | None = None, micro_batch: int = MICRO_BATCH):
    """Mean next-token cross-entropy of ``model`` on the first blocks of ``input_ids`` (B, T)
    holding at least ``tokens`` tokens (all of them when None)."""
    device = next(model.parameters()).device
    B = input_ids.shape[0] if tokens is None else min(input_ids.shape[0], -(-tokens // input_ids.shape[1]))
    total, count = 0.0, 0
    for b in range(0, B, micro_batch):
        ids = input_ids[b : min(b + micro_batch, B)].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
        target = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        count += target.numel()
    return total / count
