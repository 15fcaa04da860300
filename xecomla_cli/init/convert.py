"""Convert a loaded model's attention to MLA, choosing the initialisation once (``init.methods``).

``paper`` is data-free (``init.paper``); every other method calibrates first: one pass of the
original model over the calibration tokens (``layerwise``) collects each converted layer's
statistics (``init.stats``), then each layer is built by ``init.method_weights`` (and, with
``refit``, its output projection refitted by ``init.refit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..errors import XecomlaError
from ..layerwise import LayerRunner, walk
from ..mla.attention import MLAAttention
from ..mla.rebuild import decoder_layers, has_o_bias, has_qkv_bias, new_mla_attention
from ..mla.spec import MLASpec
from .engine_ready import attention_error, constant_direction, fold_state_biases, fold_value_bias, held_out_direction
from .freqfold import fold_candidates
from .latent import budget_ranks
from .latent_norm import add_norm_channel, data_rank_spec
from .layer_weights import AttentionWeights
from .method_weights import layer_energy, method_state_dict
from .methods import ROPE_CONTEXT, MethodConfig, parse_method
from .paper import paper_state_dict
from .refit import refit_output
from .rope_pairs import layer_plans, merged_plan
from .stats import LayerStats, calibration_loss, layer_stats
from .transmla import search_freqfold, transmla_energy, transmla_state_dict

FREQFOLD_SEARCH_TOKENS = 1024  # calibration tokens scored per fold tried (a full model forward each)


@dataclass
class ConvertedLayer:
    """One layer's MLA attention, and the RoPE pairs it kept (pair methods; per slice with group-rope)."""

    attn: MLAAttention
    rope_pairs: list | None = None


def convert_layer(
    model,
    spec: MLASpec,
    layer: int,
    method: MethodConfig | str = "paper",
    stats: LayerStats | None = None,
    inputs: list[torch.Tensor] | None = None,
) -> MLAAttention:
    """The MLA attention of one layer, built from the model's original attention (the spec is not changed).

    ``stats``: the layer's calibration statistics, needed by the data-aware methods; ``inputs``: its
    attention inputs on the calibration tokens, needed by the latent norm (``init.latent_norm``)."""
    return build_layer(model, spec, layer, method, stats, inputs).attn


def build_layer(
    model,
    spec: MLASpec,
    layer: int,
    method: MethodConfig | str = "paper",
    stats: LayerStats | None = None,
    inputs: list[torch.Tensor] | None = None,
) -> ConvertedLayer:
    """``convert_layer``, with what the layer's conversion found for the spec's record."""
    return build_attention(model.config, decoder_layers(model)[layer].self_attn, spec, layer, method, stats, inputs)


def build_attention(
    config,
    old,
    spec: MLASpec,
    layer: int,
    method: MethodConfig | str = "paper",
    stats: LayerStats | None = None,
    inputs: list[torch.Tensor] | None = None,
) -> ConvertedLayer:
    """The MLA of layer ``layer`` of a model of this ``config`` from its original attention module ``old``
    (all a layer's conversion reads: what the streamed init (``init.streamed``) holds of one layer)."""
    cfg = parse_method(method) if isinstance(method, str) else method
    w = AttentionWeights.of(old)
    u = None
    if spec.biases_folded and w.bq is not None:  # bias-free for the engines (``init.engine_ready``)
        if inputs is not None:  # the ridge chosen on held-out calibration sequences
            u = held_out_direction(inputs)[0]
        elif stats is not None:
            u = constant_direction(stats.cov, stats.cov_aug[:-1, -1])
        else:
            raise XecomlaError("folding the attention biases needs calibration statistics: a bug")
        w = fold_value_bias(w, u)
    pairs = None
    built = data_rank_spec(spec, layer)  # with a latent norm: rank r - 1, the last channel is the norm channel's
    if cfg.freqfold is not None:
        sd, plan = transmla_state_dict(config, w, built, layer, cfg, stats)
    else:
        plans = layer_plans(config, built, cfg, stats, ROPE_CONTEXT)
        plan = merged_plan(plans)
        if cfg.is_paper:
            sd = paper_state_dict(w, built, layer, plan, spec.kv_svd_rows)
        else:
            sd = method_state_dict(w, built, layer, plans, cfg, stats)
        if cfg.pairs is not None:
            pairs = [pl.rope_idx[: pl.rope_idx.numel() // 2].tolist() for pl in plans]
            pairs = pairs[0] if len(pairs) == 1 else pairs
    if u is not None:
        fold_state_biases(sd, u, spec.nope_dim, spec.head_dim)
    if spec.latent_norm:
        add_norm_channel(sd, inputs, spec.kv_ranks[layer])
    new = new_mla_attention(config, spec, layer, has_qkv_bias(old) and u is None, has_o_bias(old))
    new.load_state_dict(sd)
    new.rope_attention_scaling = plan.attention_scaling
    new.train(old.training)
    return ConvertedLayer(new.to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype), pairs)


def bias_fold_error(config, old, spec: MLASpec, layer: int, cfg, stats, inputs, built: ConvertedLayer) -> float:
    """What folding a biased layer's biases costs against its exact biased MLA (on half the calibration
    blocks): the attention output's relative error (``MLASpec.bias_fold``)."""
    exact = build_attention(config, old, replace(spec, attention_bias="kept"), layer, cfg, stats, inputs)
    held = inputs[len(inputs) // 2 :] or inputs
    return round(attention_error(built.attn, exact.attn, held), 6)


def convert_model(
    model,
    spec: MLASpec,
    method: MethodConfig | str = "paper",
    calib_ids: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> MLASpec:
    """Replace every converted layer's attention by its MLA, in place; returns the spec of the
    converted model (``spec`` itself is not changed): ``spec`` with what the conversion found
    (RoPE attention scaling, kept RoPE pairs, a searched fold, budgeted ranks).

    A data-aware ``method`` calibrates on ``calib_ids`` (B, T) first (and, for ``refit``, keeps
    each layer's attention inputs in fp16); ``freqfold`` without a fold searches it (TransMLA's
    ``--freqfold auto``); with ``budget`` the spec's ranks are replaced by the budgeted per-layer
    ranks. ``progress(i)`` is called after each calibrated layer, each fold of the search (i = -1)
    and each converted layer (``calibration_steps`` + converted layers in all).
    """
    cfg = parse_method(method) if isinstance(method, str) else method
    layers = spec.converted_layers
    tick = progress or (lambda i: None)
    stats: dict[int, LayerStats] = {}
    inputs: dict[int, list[torch.Tensor]] = {}
    runner = None
    if not cfg.is_paper or spec.latent_norm or spec.biases_folded:
        if calib_ids is None:
            raise XecomlaError(
                "this --method, the latent norm or folding biases needs calibration data: pass calibration token ids"
            )
        runner = LayerRunner(model, calib_ids)
        for i in walk([runner], layers):
            if not cfg.is_paper or spec.biases_folded:  # the paper's factors are data-free
                stats[i] = layer_stats(runner, i)
            if cfg.refit or spec.latent_norm or spec.biases_folded:
                inputs[i] = runner.attention_inputs(i)
            tick(i)
    found = {}
    if cfg.freqfold == 0:

        def fold_loss() -> float:
            loss = calibration_loss(model, calib_ids, FREQFOLD_SEARCH_TOKENS)
            tick(-1)
            return loss

        fold, tried = search_freqfold(
            spec, lambda full, fold: swap_layers(model, full, replace(cfg, freqfold=fold), stats), fold_loss
        )
        for _ in range(len(fold_candidates(spec.head_dim, spec.rope_dim, spec.rope_span)) - len(tried)):
            tick(-1)  # folds not tried
        found["freqfold"] = {"fold": fold, "calibration_loss": tried}
        cfg = replace(cfg, freqfold=fold)
    if cfg.budget:
        spec = budgeted_spec(model, spec, cfg, stats)
    pairs: dict[str, list] = {}
    scaling: set[float] = set()
    bias_errors: dict[str, float] = {}
    for i in layers:
        old = decoder_layers(model)[i].self_attn
        built = build_layer(model, spec, i, cfg, stats.get(i), inputs.get(i))
        if spec.biases_folded and i in inputs:  # what folding costs against the exact biased layer (half the tokens)
            bias_errors[str(i)] = bias_fold_error(model.config, old, spec, i, cfg, stats.get(i), inputs[i], built)
        if cfg.refit:
            refit_output(old, built.attn, inputs[i], runner.chunks)
        inputs.pop(i, None)
        decoder_layers(model)[i].self_attn = built.attn
        if built.rope_pairs is not None:
            pairs[str(i)] = built.rope_pairs
        scaling.add(float(built.attn.rope_attention_scaling))
        tick(i)
    if len(scaling) != 1:  # one rotary embedding per model: the same for every layer
        raise XecomlaError(f"the converted layers' RoPE attention scalings differ ({sorted(scaling)}): a bug")
    if bias_errors:
        found["bias_fold"] = {"attention_error": bias_errors}
    return replace(spec, rope_attention_scaling=scaling.pop(), rope_pairs=pairs or None, **found)


def swap_layers(model, spec: MLASpec, cfg: MethodConfig, stats: dict[int, LayerStats]) -> Callable[[], None]:
    """Convert every layer of ``spec`` in place; returns the function that puts the originals back."""
    layers = decoder_layers(model)
    originals = {i: layers[i].self_attn for i in spec.converted_layers}
    for i in spec.converted_layers:
        layers[i].self_attn = convert_layer(model, spec, i, cfg, stats[i])

    def undo() -> None:
        for i, attn in originals.items():
            layers[i].self_attn = attn

    return undo


def budgeted_spec(model, spec: MLASpec, cfg: MethodConfig, stats: dict[int, LayerStats]) -> MLASpec:
    """``spec`` with per-layer ranks of the same total (``budget``): layers x its average rank."""
    energies = {
        i: attention_energy(model.config, decoder_layers(model)[i].self_attn, spec, cfg, stats[i])
        for i in spec.converted_layers
    }
    return budget_spec(spec, energies)


def attention_energy(config, attn, spec: MLASpec, cfg: MethodConfig, stats: LayerStats) -> torch.Tensor:
    """Output-energy eigenvalues of one original attention's latent rows (what ``budget`` allocates by)."""
    w = AttentionWeights.of(attn)
    if cfg.freqfold is not None:
        return transmla_energy(config, w, spec, cfg, stats)
    return layer_energy(w, spec, layer_plans(config, spec, cfg, stats, ROPE_CONTEXT), cfg, stats)


def budget_spec(spec: MLASpec, energies: dict[int, torch.Tensor]) -> MLASpec:
    """``spec`` with the budgeted per-layer ranks for these per-layer energies (``attention_energy``)."""
    layers = spec.converted_layers
    if spec.rank_budget is not None:  # budgeted already: keep its total
        rank = spec.rank_budget // len(layers)
    else:
        rank = round(sum(spec.kv_ranks[i] for i in layers) / len(layers))
    ranks = budget_ranks(energies, rank, max_rank=min(spec.hidden_size, energies[layers[0]].numel()))
    kv_ranks = [ranks.get(i) if r is not None else None for i, r in enumerate(spec.kv_ranks)]
    return replace(spec, kv_ranks=kv_ranks, rank_budget=rank * len(layers))


def calibration_steps(spec: MLASpec, method: MethodConfig | str) -> int:
    """How many calibration steps ``convert_model`` reports (for a progress bar): the converted
    layers of the calibration pass, and the folds a ``freqfold`` search may try."""
    cfg = parse_method(method) if isinstance(method, str) else method
    if cfg.is_paper and not spec.latent_norm:
        return 0
    folds = len(fold_candidates(spec.head_dim, spec.rope_dim, spec.rope_span)) if cfg.freqfold == 0 else 0
    return len(spec.converted_layers) + folds
