"""MLA weights of one layer for the data-aware methods (``init.methods``), and the output refit.

Per layer: the RoPE plan (``rope_pairs``) decides which original pairs keep RoPE, the shared
key (``shared_key``) is fitted per kept pair, and the latent (``latent``) covers the kept rows
[W_k,nope; W_v], optionally whitened by the calibration inputs' second moment C.
"""

from __future__ import annotations

import torch

from ..mla.spec import MLASpec
from .calibration import LayerStats
from .common import AttentionWeights, RopePlan, output_weights, query_weights, single_thread
from .latent import kv_rows_kept, nope_rows, whitened_factors
from .methods import MethodConfig
from .shared_key import rope_weights


def method_state_dict(
    w: AttentionWeights, spec: MLASpec, layer: int, plan: RopePlan, cfg: MethodConfig, stats: LayerStats | None
) -> dict[str, torch.Tensor]:
    """MLA weights of one layer for a data-aware method, as an ``MLAAttention`` state dict."""
    H, G, h, p = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_dim
    n, r, d = h - p, spec.kv_ranks[layer], spec.hidden_size
    bias = w.bk is not None
    sd: dict[str, torch.Tensor] = {}

    # Queries [nope | rope] and the shared RoPE key (rows carry the bias as a last column).
    k_rope, q_rope = rope_weights(w, plan, stats, H, G, h, cfg.key, bias)
    q_nope = nope_rows(w.wq.view(H, h, -1), plan)  # dropped dims: no query, and no latent spent on their keys
    wq = torch.cat([q_nope, q_rope[..., :d]], dim=1).reshape(H * h, -1)
    bq = torch.cat([nope_rows(w.bq.view(H, h), plan), q_rope[..., -1]], dim=1).reshape(-1) if bias else None
    query_weights(sd, wq, bq, spec.q_rank)

    # Latent over the kept rows [K_nope; V] of the G KV heads, repeated to the H query heads.
    W = kv_rows_kept(w, plan, G, h)
    up, down, _ = whitened_factors(W, stats.cov if cfg.whiten else None, r)
    up = up.view(G, n + h, r).repeat_interleave(H // G, dim=0)  # (H, n + h, r)
    sd["kv_b_proj.weight"] = up.reshape(H * (n + h), r)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([down, k_rope[:, :d]])
    if bias:
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r), k_rope[:, -1]])
        bk = w.bk.view(G, h)[:, plan.nope_idx]
        bkv = torch.cat([bk, w.bv.view(G, h)], dim=1).repeat_interleave(H // G, dim=0)
        sd["kv_b_proj.bias"] = bkv.reshape(-1)
    output_weights(sd, w, spec.latent_norm, r, plan)
    return sd


def layer_energy(w: AttentionWeights, spec: MLASpec, plan: RopePlan, cfg: MethodConfig, stats: LayerStats | None):
    """Output-energy eigenvalues of a layer's kept K/V rows (what ``budget`` allocates by)."""
    C = stats.cov if cfg.whiten else None
    return whitened_factors(kv_rows_kept(w, plan, spec.num_kv_heads, spec.head_dim), C, 0)[2]


def attention_head_outputs(attn, x: torch.Tensor, chunk: dict) -> torch.Tensor:
    """The input of ``attn.o_proj`` (N, H·h) for attention inputs x (B, T, d): the heads' outputs."""
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        attn(hidden_states=x, position_embeddings=chunk["emb"], attention_mask=chunk["mask"], position_ids=chunk["pos"])
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


@torch.no_grad()
def refit_output(old, new, inputs: list[torch.Tensor], chunks: list[dict], ridge: float = 1e-3) -> None:
    """Refit the MLA's output projection so that it reproduces the original attention output:

        W_o' = argmin Σ_x ||W_o' y'(x) − W_o y(x)||² + λ||W_o' − W_o||²
             = W_o (Σ y y'ᵀ + λI)(Σ y' y'ᵀ + λI)^{-1},   λ = ridge · tr(Σ y' y'ᵀ)/(H·h)

    with y, y' the original and MLA heads' outputs (before o_proj) on the calibration inputs. It
    absorbs what the latent and the shared RoPE key change systematically (e.g. a shrunken V).
    """
    A = B = None
    for x, chunk in zip(inputs, chunks, strict=True):
        x = x.to(new.o_proj.weight.dtype)
        y = attention_head_outputs(old, x, chunk)
        y2 = attention_head_outputs(new, x, chunk)
        A = y.T @ y2 if A is None else A + y.T @ y2
        B = y2.T @ y2 if B is None else B + y2.T @ y2
    eye = torch.eye(B.shape[0], dtype=B.dtype)
    lam = ridge * torch.trace(B) / B.shape[0]
    wo = new.o_proj.weight.double()
    with single_thread():
        w_new = torch.linalg.solve(B + lam * eye, (wo @ (A + lam * eye)).T).T  # B, λI symmetric
    new.o_proj.weight.copy_(w_new.to(new.o_proj.weight.dtype))
