"""A real latent RMSNorm that keeps the un-normed latent's quality at init: one norm channel.

DeepSeek-V3's layout (and every engine that runs it: vLLM, SGLang, llama.cpp) always normalises
the latent before the up-projection and the cache, with no attention biases:

    ĉ = γ ⊙ c / sqrt(mean(c²) + ε)                      c, γ, ĉ: (R,)   ε = 1e-6

while the SVD-based inits give a latent c = D x that the up-projection U expects un-normed. A
unit γ (what ``--latent-norm`` did before) rescales every token's latent to unit RMS, which the
up-projection never saw (demo, 4x, ``deepseek``: LAMBADA perplexity 86,287 against 222.7).

The construction. Of a layer's R = r latent channels, r − 1 carry the method's latent (its best
rank r − 1 factors, so the cache stays r + p values) and the last one is a *norm channel*:

    c_ext = [D x ; vᵀx]        up-projection columns [U ; 0],   γ = [γ₀ … γ₀ ; 0]

x is the attention input (after ``input_layernorm``). Per token, the data channels come out as

    ĉ = s·c,    s = γ₀ / sqrt(ρ/R + ε),    ρ = (vᵀx)² + ‖D x‖²,

so the normed path equals the un-normed one exactly when ρ is the same for every token. The
channel makes up the latent's energy to a constant K = (1 + k²)·E‖D x‖²: on the calibration
tokens, v is the weighted ridge regression of the target y = sqrt(K − ‖D x‖²) (floored at
sqrt(K)/10) on x,

    v = (Xᵀ W X + λ I)⁻¹ Xᵀ W y,        λ = ``RIDGE`` · tr(Xᵀ W X) / d,

and γ₀ = Σ w f / Σ w f², f = (ρ/R + ε)^(-1/2), minimises Σ w (s − 1)², the weighted mean square of
the per-token scale error (whose square root is the relative error of the normed latent against
the un-normed one when every token's latent counts by its weight). The weights are 1, except the
first token of each calibration block (an attention sink that every query reads: its latent's
error costs far more than one token's share), which together weigh ``SINK_SHARE`` of the total.

Why these constants (demo model, 4x, ``deepseek``; perplexity on 2,048 LAMBADA tokens, 264 with
the norm removed, i.e. s = 1): a channel that is merely nearly constant (u ∝ Σ⁻¹μ, the
"massive-activation" direction; k = 16) has a 2 % calibration error but rare held-out tokens on
which vᵀx is small get s up to 3: perplexity 5,210; k = 8: 841; k = 2: 312; k = 1 (the channel
compensates the latent's own energy and bounds s ≤ sqrt(K/‖D x‖²)): 295, with the sink share:
275, with ``RIDGE`` 1e-3: 271. ``bench/latent_norm.py`` measures it per layer and per method.

The norm channel's γ and up-projection column are zero: it is cached as 0 and, both being zero,
gradients leave them zero (each one's gradient is proportional to the other), so distillation
trains γ, D, U and the channel's row v but never turns the channel into a data channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import XecomlaError
from ..mla.spec import MLASpec
from ..threads import single_thread

DOMINANCE = 1.0  # k: the channel's target energy over the data latent's, K = (1 + k²)·E‖D x‖²
RIDGE = 1e-3  # λ = RIDGE · tr(Xᵀ W X) / d
SINK_SHARE = 0.1  # the share of the fit's weight on the first token of each calibration block
EPS = 1e-6  # the latent RMSNorm's ε (ours and transformers' DeepSeek-V3)


@dataclass
class NormChannel:
    """One layer's norm channel and what it achieves on the calibration tokens."""

    row: torch.Tensor  # (d,) v
    gain: float  # γ₀
    error: float  # sqrt(Σ w (s − 1)² / Σ w): the weighted relative error of the normed latent
    max_scale: float  # max s over the calibration tokens


def data_rank_spec(spec: MLASpec, layer: int) -> MLASpec:
    """The spec an init method builds layer ``layer`` with: with a latent norm, its rank r − 1 (the
    last channel is the norm channel's); the same spec otherwise."""
    if not spec.latent_norm:
        return spec
    r = spec.kv_ranks[layer]
    if r < 2:
        raise XecomlaError(
            f"layer {layer} has latent rank {r}: the latent norm needs r >= 2 (one channel is the norm channel); "
            "raise --kv-rank or pass --no-latent-norm"
        )
    ranks = list(spec.kv_ranks)
    ranks[layer] = r - 1
    return replace(spec, kv_ranks=ranks)


def token_weights(blocks: list[torch.Tensor], sink_share: float = SINK_SHARE) -> torch.Tensor:
    """(N,) fit weights of the tokens of ``blocks`` [(B, T, d), …]: 1, the first token of each block
    together ``sink_share`` of the total."""
    first = torch.cat([torch.arange(x.shape[0] * x.shape[1]) % x.shape[1] == 0 for x in blocks])
    w = torch.ones(first.numel(), dtype=torch.float64)
    if 0 < sink_share < 1 and first.any() and not first.all():
        w[first] = sink_share / (1 - sink_share) * (~first).sum() / first.sum()
    return w


def scale_error(
    x: torch.Tensor,
    down: torch.Tensor,
    row: torch.Tensor,
    gain: float,
    rank: int,
    eps: float = EPS,
    energy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per token, s − 1 (N,): how far the normed data latent γ₀·c/rms([c; vᵀx]) is from c = D x.

    ``energy``: ‖D x‖² (N,) when the caller has it (``fit_norm_channel``: the same product)."""
    x = x.double()
    if energy is None:
        energy = (x @ down.double().T).pow(2).sum(-1)
    rho = (x @ row.double()).pow(2) + energy
    return gain * torch.rsqrt(rho / rank + eps) - 1


def fit_norm_channel(
    blocks: list[torch.Tensor],
    down: torch.Tensor,
    rank: int,
    dominance: float = DOMINANCE,
    ridge: float = RIDGE,
    sink_share: float = SINK_SHARE,
    eps: float = EPS,
) -> NormChannel:
    """The norm channel of a data latent c = D x (``down`` (r − 1, d)) in a latent of ``rank`` channels,
    fitted on attention inputs ``blocks`` [(B, T, d), …] (see the module docstring)."""
    x32 = torch.cat([b.reshape(-1, b.shape[-1]) for b in blocks]).float()  # (N, d)
    x, d = x32.double(), x32.shape[1]
    w = token_weights(blocks, sink_share)
    energy = (x32 @ down.float().T).double().pow(2).sum(-1)  # ‖D x‖² (N,)
    K = (1 + dominance**2) * float((w * energy).sum() / w.sum())
    y = torch.sqrt(torch.clamp(K - energy, min=K / 100))
    # The two products over the N tokens in fp32 on every thread (fp64 on one thread took 0.25 s a
    # layer, 11% of the demo's init); the d x d solve in fp64.
    A = (x32.T @ (w.float()[:, None] * x32)).double()  # Xᵀ W X (d, d)
    b = (x32.T @ (w * y).float()).double()  # Xᵀ W y (d,)
    with single_thread():
        lam = ridge * torch.trace(A) / d
        v = torch.linalg.solve(A + lam * torch.eye(d, dtype=A.dtype), b)
    f = scale_error(x, down, v, 1.0, rank, eps, energy) + 1
    gain = float((w * f).sum() / (w * f * f).sum())
    s = gain * f
    err = math.sqrt(float((w * (s - 1) ** 2).sum() / w.sum()))
    return NormChannel(v.float(), gain, err, float(s.max()))


def add_norm_channel(sd: dict[str, torch.Tensor], blocks: list[torch.Tensor] | None, rank: int) -> NormChannel:
    """Turn a layer's state dict with a latent of rank − 1 channels into one of ``rank`` channels whose
    last channel is the norm channel (in place): down row v, zero up-projection column, γ = [γ₀…, 0].

    ``blocks``: the layer's attention inputs on the calibration tokens [(B, T, d), …]."""
    if blocks is None:
        raise XecomlaError("the latent norm's channel is fitted on calibration inputs: pass calibration token ids")
    r = rank - 1
    wkv = sd["kv_a_proj_with_mqa.weight"]  # (r + p, d): [D ; W_krope]
    bkv = sd.get("kv_a_proj_with_mqa.bias")
    if bkv is not None and bool(bkv[:r].ne(0).any()):
        raise XecomlaError("the latent norm's channel expects a latent without bias (c = D x)")
    ch = fit_norm_channel(blocks, wkv[:r], rank)
    sd["kv_a_proj_with_mqa.weight"] = torch.cat([wkv[:r], ch.row[None], wkv[r:]])
    if bkv is not None:
        sd["kv_a_proj_with_mqa.bias"] = torch.cat([bkv[:r], bkv.new_zeros(1), bkv[r:]])
    wb = sd["kv_b_proj.weight"]  # (H·(n + h), r − 1)
    sd["kv_b_proj.weight"] = torch.cat([wb, wb.new_zeros(wb.shape[0], 1)], dim=1)
    sd["kv_a_layernorm.weight"] = torch.cat([torch.full((r,), ch.gain), torch.zeros(1)])
    return ch


def normed_latent_error(attn, x: torch.Tensor) -> float:
    """Relative error of a layer's normed latent path against the un-normed one on inputs x (…, d),
    through the module's own projections and norm:

        sqrt(Σ ‖U(ĉ − c)‖² / Σ ‖U c‖²),   c = D x,  ĉ = the module's normed latent,

    over the data channels (those with a non-zero up-projection column; not the norm channel)."""
    with torch.no_grad():
        x = x.reshape(-1, x.shape[-1]).to(attn.kv_a_proj_with_mqa.weight.dtype)
        c_ext = attn.kv_a_proj_with_mqa(x)[:, : attn.kv_rank]
        data = attn.kv_b_proj.weight.ne(0).any(0)  # (r,)
        normed = attn.kv_a_layernorm(c_ext)[:, data].double()
        c = c_ext[:, data].double()
        up = attn.kv_b_proj.weight[:, data].double()
        return float(((normed - c) @ up.T).norm() / (c @ up.T).norm().clamp_min(1e-30))
