"""A conversion that the serving engines read exactly, for the sources whose attention they cannot:
scaled RoPE (Llama 3.x) and q/k/v biases (Qwen2.x).

**RoPE.** llama.cpp's ``deepseek2`` applies no per-frequency factors, and vLLM's and SGLang's DeepSeek
attention rewrite every ``rope_type`` but ``default`` to their own YaRN (``engines.py`` cites the
lines). So the MLA's RoPE dims turn as *default* RoPE at dim p (``MLASpec.rope_frequencies``
``"default"``, ``mla.rope.mla_inv_freq``), which the export writes as ``rope_type: default``. Under
Llama 3's scaling the pairs whose wavelength is below original_max_position_embeddings /
high_freq_factor are unscaled, a geometric sequence; the slower ones turn by less than ~0.2 rad over
8K positions at factor 32. TransMLA's fold then covers only the K fastest pairs (``rope_span``,
``default_rope_span``): its slots turn at the unscaled frequencies, and the slow pairs keep no RoPE.

**Biases.** The DeepSeek layout has no query or up-projection biases, and the engines load no
attention bias at all. Per layer, with x the attention input and b a bias:

* the key bias on no-RoPE dims adds qᵀb to every score of a query: softmax-invariant, dropped
  (exact);
* every other bias (queries, the shared RoPE key, values) is folded into its weights through a
  direction u with uᵀx ≈ 1 on the calibration tokens: W x + b ≈ (W + b uᵀ) x. u is the ridge
  regression of 1 on x, u = (E[x xᵀ] + λ I)⁻¹ E[x]; LLM hidden states have a large mean (the
  "massive activations"), so uᵀx is nearly constant. λ is chosen on held-out tokens (fit on one
  half of the calibration blocks, scored on the other): with as few tokens as hidden dims, a small
  λ interpolates the calibration tokens and fails on any other. The value bias is folded before
  the latent is fitted, so the latent carries it.

The per-layer relative error of the attention output against the exact biased MLA layer, on the
calibration tokens, is recorded in ``MLASpec.bias_fold``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import XecomlaError
from ..threads import single_thread
from .layer_weights import AttentionWeights

RIDGE = 1e-2  # λ = RIDGE · tr(E[x xᵀ]) / d without held-out tokens to choose it
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the λ / (tr(E[x xᵀ]) / d) tried on held-out tokens


def default_rope_span(unscaled: int, head_dim: int, rope_dim: int) -> int | None:
    """K for a scaled source: the multiple of p/2 nearest the number of unscaled pairs (at least p/2,
    at most h/2); None when that is every pair."""
    half, P = rope_dim // 2, head_dim // 2
    span = min(P, half * max(1, round(unscaled / half)))
    return None if span == P else span


def constant_direction(cov: torch.Tensor, mean: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """u (d,) minimising E(uᵀx − 1)² + λ‖u‖²: (E[x xᵀ] + λ I)⁻¹ E[x] (fp64 in, fp32 out)."""
    d = cov.shape[0]
    lam = ridge * torch.trace(cov) / d
    with single_thread():
        u = torch.linalg.solve(cov + lam * torch.eye(d, dtype=cov.dtype), mean)
    return u.float()


def held_out_direction(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """u fitted on all tokens of ``blocks`` [(B, T, d), …] with the ridge that does best on held-out
    tokens (fit on the first half of the sequences, scored on the second), the chosen ridge, and the
    held-out root mean square of uᵀx − 1 at that ridge."""
    x = torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks]).double()
    seqs = torch.cat([torch.arange(b.shape[0] * b.shape[1]) // b.shape[1] + 10_000 * k for k, b in enumerate(blocks)])
    ids = seqs.unique()
    fit = torch.isin(seqs, ids[: max(1, len(ids) // 2)])
    if bool(fit.all()):  # one sequence: the first half of its tokens
        fit = torch.arange(len(x)) < len(x) // 2

    def moments(rows):
        return rows.T @ rows / len(rows), rows.mean(0)

    cov_a, mean_a = moments(x[fit])
    scores = {r: float(((x[~fit] @ constant_direction(cov_a, mean_a, r).double() - 1) ** 2).mean()) for r in RIDGES}
    best = min(scores, key=scores.get)
    return constant_direction(*moments(x), best), best, scores[best] ** 0.5


def fold_value_bias(w: AttentionWeights, u: torch.Tensor) -> AttentionWeights:
    """W_v + b_v uᵀ and a zero value bias: the latent is then fitted on the folded rows."""
    if w.bv is None:
        return w
    return replace(w, wv=w.wv + torch.outer(w.bv, u), bv=torch.zeros_like(w.bv))


def fold_state_biases(sd: dict[str, torch.Tensor], u: torch.Tensor, nope_dim: int, head_dim: int) -> None:
    """Make one MLA layer's state dict bias-free (in place): queries and the latent/RoPE key folded
    through u, the no-RoPE key bias dropped; the value bias must already be folded (zero)."""
    if "q_b_proj.bias" in sd:
        raise XecomlaError("low-rank queries (--q-rank) of a biased source cannot fold the query bias: drop --q-rank")
    for name in ("q_proj", "kv_a_proj_with_mqa"):
        b = sd.pop(f"{name}.bias", None)
        if b is not None:
            sd[f"{name}.weight"] = sd[f"{name}.weight"] + torch.outer(b, u)
    b = sd.pop("kv_b_proj.bias", None)
    if b is not None:
        v_bias = b.view(-1, nope_dim + head_dim)[:, nope_dim:]  # per head [k_nope n | v h]
        if bool(v_bias.ne(0).any()):
            raise XecomlaError("the value bias was not folded before the latent: a bug")
    if "o_proj.bias" in sd:
        raise XecomlaError(
            "the attention output has a bias, which the engines do not load and cannot be folded: "
            "init with --attention-bias keep (xecomla and --format xecomla only)"
        )


def attention_error(folded, exact, blocks: list[torch.Tensor], max_blocks: int = 4) -> float:
    """Relative error sqrt(Σ‖o_f − o‖² / Σ‖o‖²) of two attention modules' outputs on inputs
    ``blocks`` [(B, T, d), …] (causal, positions from 0)."""
    num = den = 0.0
    with torch.no_grad():
        for x in blocks[:max_blocks]:
            x = x.to(device=exact.o_proj.weight.device, dtype=exact.o_proj.weight.dtype)
            T = x.shape[1]
            pos = torch.arange(T, device=x.device).unsqueeze(0).expand(x.shape[0], -1)
            mask = torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device).triu(1)[None, None]  # causal
            o = exact(x, attention_mask=mask, position_ids=pos)[0].double()
            o_f = folded(x, attention_mask=mask, position_ids=pos)[0].double()
            num += float((o_f - o).pow(2).sum())
            den += float(o.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5
