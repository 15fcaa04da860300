"""The checkpoint's weights in the DeepSeek-V3 layout.

Per layer, with H heads, head dim h = n + p, the layer's latent rank r, the exported rank R (the
largest r, or what --latent-width asks) and Rx = kv_lora_rank (R, or R + 1 with the identity
emulation's constant channel):

    q_proj              (H·h, d)        per head [nope n | rope p], RoPE rows permuted to interleaved pairs
    kv_a_proj_with_mqa  (Rx + p, d)     [c r | zeros R - r | constant channel (identity) | k_rope p, permuted]
    kv_b_proj           (H·(n + h), Rx) per head [k_nope n | v h] rows, zero columns past r
    kv_a_layernorm      (Rx,)           norm: the checkpoint's weight · sqrt(r/R), zeros past r;
                                        identity: w = fl(1/s), 0 on the constant channel

The identity emulation: a constant channel C makes DeepSeek-V3's RMSNorm a fixed scale s on the
real channels, which the norm weight w undoes (``identity_constant``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import XecomlaError
from ..loaded import parse_dtype
from ..mla.spec import MLASpec
from .model_view import model_view
from .records import ExportPlan

# C² must exceed the latent's squared norm by this factor (2^24 is fp32's relative precision).
MARGIN_BITS = 26


def interleave_perm(p: int) -> torch.Tensor:
    """Row order that turns rotate-half pairs (j, j + p/2) into interleaved pairs (2i, 2i + 1)."""
    half = torch.arange(p // 2)
    return torch.stack([half, half + p // 2], dim=1).flatten()


def latent_bound(weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor) -> float:
    """An upper bound of ‖W x + b‖ over every input x = ln_weight ⊙ x̂, ‖x̂‖² ≤ d (an RMSNorm output)."""
    d = weight.shape[1]
    w = weight.double() * ln_weight.double().abs()[None, :]
    bound = torch.linalg.matrix_norm(w, ord=2).item() * math.sqrt(d)
    if bias is not None:
        bound += bias.double().norm().item()
    return bound


def norm_scale(C: float, channels: int, dtype: torch.dtype) -> float:
    """s such that DeepSeek-V3's RMSNorm maps [x, C] (x negligible against C) to [x·s, C·s]·weight,
    computed with the very operations of ``DeepseekV3RMSNorm`` (eps 1e-6)."""
    v = torch.zeros(channels, dtype=dtype)
    v[-1] = C
    h = v.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    return float(torch.rsqrt(variance + 1e-6).item())


def identity_constant(bound: float, channels: int, dtype: torch.dtype) -> tuple[float, float]:
    """(C, w): the extra channel's bias C and the norm weight w = 1/s for the real channels.

    C = 2^k·m with C² ≥ 2^MARGIN_BITS · bound², and the mantissa m (exact in bf16) chosen so that
    w rounded to ``dtype`` times s is closest to 1.
    """
    k = MARGIN_BITS // 2 + math.ceil(math.log2(max(bound, 1e-30)))
    k = max(k, 0)
    if k > 60:
        raise XecomlaError(
            f"a latent is too large (bound {bound:.3g}) for the identity emulation to stay in fp32 range: "
            "export with --format xecomla instead"
        )
    best = None
    for j in range(128):
        C = 2.0**k * (1 + j / 128)
        s = norm_scale(C, channels, dtype)
        w = norm_weight(C, channels, dtype)
        err = abs(w * s - 1.0)
        if best is None or err < best[0]:
            best = (err, C, w)
    return best[1], best[2]


def norm_weight(C: float, channels: int, dtype: torch.dtype) -> float:
    """w = fl(1/s): the norm weight that undoes the scale s of the constant channel C."""
    return float(torch.tensor(1.0 / norm_scale(C, channels, dtype), dtype=torch.float64).to(dtype).item())


def emulation_constants(loaded, plan: ExportPlan) -> tuple[list[float], list[float]]:
    """The constants C of the identity emulations, per layer: (latent ``identity``, queries ``lora-identity``);
    empty where the plan uses neither. Part of the plan: the weights read them from it. Reads one layer at a
    time, and none when the plan uses neither."""
    dtype = parse_dtype(plan.dtype)
    latent, queries = [], []
    if plan.latent != "identity" and plan.queries != "lora-identity":
        return latent, queries
    view = model_view(loaded)
    for i in range(view.num_layers):
        layer = view.layer(i)
        a, ln_w = layer.self_attn, _tensor(layer.input_layernorm.weight)
        if plan.latent == "identity":
            w_c = _tensor(a.kv_a_proj_with_mqa.weight)[: a.kv_rank]
            latent.append(identity_constant(latent_bound(w_c, None, ln_w), plan.kv_lora_rank, dtype)[0])
        if plan.queries == "lora-identity":
            qa = _tensor(a.q_a_proj.weight)
            queries.append(identity_constant(latent_bound(qa, None, ln_w), a.q_rank + 1, dtype)[0])
    return latent, queries


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu()


def query_weights(a, plan: ExportPlan, spec: MLASpec, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's query projections, RoPE rows permuted; ``lora-identity`` with the plan's constant."""
    H, n, d = spec.num_heads, spec.nope_dim, a.kv_a_proj_with_mqa.weight.shape[1]
    qk = n + spec.rope_dim  # a query head's dims; DeepSeek-V3 scales scores by qk^-0.5, ours by h^-0.5
    q_order = torch.cat([torch.arange(n), n + interleave_perm(spec.rope_dim)])  # per head: [nope | rope permuted]
    scale = (qk / spec.head_dim) ** 0.5  # 1 unless the no-RoPE dims are not h - p (TransMLA keeps n = h)
    if plan.queries == "dense":
        return {"q_proj.weight": scale * _tensor(a.q_proj.weight).view(H, qk, d)[:, q_order].reshape(H * qk, d)}
    if plan.queries == "dense-from-lora":
        wq = (a.q_b_proj.weight.detach().double() @ a.q_a_proj.weight.detach().double()).float().cpu()
        return {"q_proj.weight": scale * wq.view(H, qk, d)[:, q_order].reshape(H * qk, d)}
    # lora-identity: [q_a; 0] with bias [0; C], norm weight 1/s, q_b gets a zero column
    qr = a.q_rank
    qa = _tensor(a.q_a_proj.weight)
    C = plan.q_constants[layer]
    w = norm_weight(C, qr + 1, dtype)
    qb = scale * _tensor(a.q_b_proj.weight).view(H, qk, qr)[:, q_order].reshape(H * qk, qr)
    return {
        "q_a_proj.weight": torch.cat([qa, torch.zeros(1, d)]),
        "q_a_proj.bias": torch.cat([torch.zeros(qr), torch.tensor([C])]),
        "q_a_layernorm.weight": torch.cat([torch.full((qr,), w), torch.zeros(1)]),
        "q_b_proj.weight": torch.cat([qb, torch.zeros(H * qk, 1)], dim=1),
    }


def latent_weights(a, plan: ExportPlan, spec: MLASpec, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's KV latent and shared RoPE key: rows [c (r) | zero padding (R - r) | constant (identity) | k_rope];
    ``identity`` with the plan's constant."""
    p, r = spec.rope_dim, a.kv_rank
    R, Rx = plan.kv_rank, plan.kv_lora_rank
    wkv = _tensor(a.kv_a_proj_with_mqa.weight)
    w_c, w_rope = wkv[:r], wkv[r:][interleave_perm(p)]
    pad = Rx - r
    wb = _tensor(a.kv_b_proj.weight)  # (H·(n + h), r)
    out = {
        "kv_a_proj_with_mqa.weight": torch.cat([w_c, torch.zeros(pad, wkv.shape[1]), w_rope]),
        "kv_b_proj.weight": torch.cat([wb, torch.zeros(wb.shape[0], pad)], dim=1),
    }
    if plan.latent == "norm":
        g = _tensor(a.kv_a_layernorm.weight)
        if R != r:  # mean over R channels instead of r: rescale (exact up to eps)
            g = g * math.sqrt(r / R)
        out["kv_a_layernorm.weight"] = torch.cat([g, torch.zeros(R - r)])
    else:
        C = plan.latent_constants[layer]
        w = norm_weight(C, Rx, dtype)
        bias = torch.zeros(Rx + p)
        bias[Rx - 1] = C
        out["kv_a_proj_with_mqa.bias"] = bias
        out["kv_a_layernorm.weight"] = torch.cat([torch.full((Rx - 1,), w), torch.zeros(1)])
    return out


def attention_tensors(a, plan: ExportPlan, spec: MLASpec, i: int) -> dict[str, torch.Tensor]:
    """Layer i's attention in the DeepSeek-V3 layout (fp32), full names."""
    dtype = parse_dtype(plan.dtype)
    weights = {
        **query_weights(a, plan, spec, i, dtype),
        **latent_weights(a, plan, spec, i, dtype),
        "o_proj.weight": _tensor(a.o_proj.weight),
    }
    if plan.attention_bias:
        weights["o_proj.bias"] = torch.zeros(a.o_proj.weight.shape[0])
    return {f"model.layers.{i}.self_attn.{k}": v for k, v in weights.items()}


def _kept(name: str) -> bool:
    """A tensor the export copies as it is: everything but the attention and the rotary embedding's buffer."""
    return ".self_attn." not in name and not name.endswith("rotary_emb.inv_freq")


def tensor_groups(view) -> list[tuple[int | None, list[str]]]:
    """The copied tensors in write order, grouped: (None, embeddings), (i, layer i's), (None, final norm, lm_head).
    lm_head is always written (vLLM's DeepSeek ignores the tie)."""
    names = [n for n in view.names() if _kept(n)]
    layers = [(i, [n for n in names if n.startswith(f"model.layers.{i}.")]) for i in range(view.num_layers)]
    top = [n for n in names if not n.startswith("model.layers.")]
    if "lm_head.weight" not in top:
        top.append("lm_head.weight")
    first = [n for n in top if n.startswith("model.embed_tokens.")]
    return [(None, first), *layers, (None, [n for n in top if n not in first])]


def deepseek_groups(loaded, plan: ExportPlan, lm_head: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint's weights in the DeepSeek-V3 layout, in export dtype, one group at a time (the embeddings,
    each decoder layer, the final norm and lm_head unless not ``lm_head``): memory of one layer when ``loaded`` is
    on disk.

    fp32 math, then the cast; the identity emulations use the constants C the plan holds (``emulation_constants``)."""
    view = model_view(loaded)
    dtype = parse_dtype(plan.dtype)
    for i, names in tensor_groups(view):
        if i is not None:
            yield layer_group(view, plan, i, names)
            continue
        yield {name: view.tensor(name, dtype).contiguous() for name in names if lm_head or name != "lm_head.weight"}


def layer_group(loaded, plan: ExportPlan, i: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Decoder layer i in the DeepSeek-V3 layout, in export dtype: its copied tensors (``names``, else all of the
    layer's), then its attention."""
    view = model_view(loaded)
    dtype = parse_dtype(plan.dtype)
    if names is None:
        names = dict(tensor_groups(view)[1 : view.num_layers + 1])[i]
    group = {name: view.tensor(name, dtype) for name in names}  # as fp32 then cast: a cast from the stored dtype
    attention = attention_tensors(view.layer(i).self_attn, plan, view.spec, i)
    group.update({k: v.to(dtype) for k, v in attention.items()})
    return {k: v.contiguous() for k, v in group.items()}


def deepseek_layout(loaded, plan: ExportPlan) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The (name, shape) of every tensor ``deepseek_groups`` yields, in its order, reading one layer (every layer's
    attention has layer 0's shapes: the plan gives every layer one kv_lora_rank)."""
    view = model_view(loaded)
    attention = attention_tensors(view.layer(0).self_attn, plan, view.spec, 0) if view.num_layers else {}
    shapes = [(name.split(".self_attn.")[1], tuple(t.shape)) for name, t in attention.items()]
    layout = []
    for i, names in tensor_groups(view):
        group = [(n, view.shape("model.embed_tokens.weight" if n == "lm_head.weight" else n)) for n in names]
        if i is not None:
            group += [(f"model.layers.{i}.self_attn.{n}", shape) for n, shape in shapes]
        layout.append(group)
    return layout


def deepseek_state_dict(loaded, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The checkpoint's weights in the DeepSeek-V3 layout (fp32 math, cast to the export dtype), all at once."""
    state: dict[str, torch.Tensor] = {}
    for group in deepseek_groups(loaded, plan):
        state.update(group)
    return state
