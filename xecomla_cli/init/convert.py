"""Convert a loaded model's attention to MLA, choosing the initialisation once (``init.methods``).

``paper`` is data-free (``init.paper``); every other method calibrates first: one pass of the
original model over the calibration tokens collects each converted layer's statistics
(``init.calibration``), then each layer is built by ``init.calibrated``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..errors import XecomlaError
from ..mla.attention import MLAAttention
from ..mla.convert import decoder_layers, has_o_bias, has_qkv_bias, new_mla_attention
from ..mla.spec import MLASpec
from .calibrated import layer_energy, method_state_dict, refit_output
from .calibration import LayerRunner, LayerStats, calibration_loss
from .common import AttentionWeights
from .freqfold import fold_candidates
from .latent import budget_ranks
from .latent_norm import add_norm_channel, data_rank_spec
from .methods import ROPE_CONTEXT, MethodConfig, parse_method
from .paper import paper_state_dict
from .rope_pairs import layer_plans, merged_plan
from .transmla import search_freqfold, transmla_energy, transmla_state_dict

FREQFOLD_SEARCH_TOKENS = 2048  # calibration tokens scored per fold tried (a full model forward each)


def convert_layer(
    model,
    spec: MLASpec,
    layer: int,
    method: MethodConfig | str = "paper",
    stats: LayerStats | None = None,
    inputs: list[torch.Tensor] | None = None,
) -> MLAAttention:
    """The MLA attention of one layer, built from the model's original attention.

    ``stats``: the layer's calibration statistics, needed by the data-aware methods; ``inputs``: its
    attention inputs on the calibration tokens, needed by the latent norm (``init.latent_norm``)."""
    cfg = parse_method(method) if isinstance(method, str) else method
    old = decoder_layers(model)[layer].self_attn
    w = AttentionWeights.of(old)
    built = data_rank_spec(spec, layer)  # with a latent norm: rank r - 1, the last channel is the norm channel's
    if cfg.freqfold is not None:
        sd, plan = transmla_state_dict(model, w, built, layer, cfg, stats)
    else:
        plans = layer_plans(model, built, cfg, stats, spec.options.get("rope_context", ROPE_CONTEXT))
        plan = merged_plan(plans)
        if cfg.is_paper:
            sd = paper_state_dict(w, built, layer, plan, spec.options.get("kv_svd_rows", "all"))
        else:
            sd = method_state_dict(w, built, layer, plans, cfg, stats)
        if cfg.pairs is not None:
            pairs = [pl.rope_idx[: pl.rope_idx.numel() // 2].tolist() for pl in plans]
            spec.options.setdefault("rope_pairs", {})[str(layer)] = pairs[0] if len(pairs) == 1 else pairs
    if spec.latent_norm:
        add_norm_channel(sd, inputs, spec.kv_ranks[layer])
    new = new_mla_attention(model.config, spec, layer, has_qkv_bias(old), has_o_bias(old))
    new.load_state_dict(sd)
    new.rope_attention_scaling = plan.attention_scaling
    spec.options["rope_attention_scaling"] = plan.attention_scaling
    new.train(old.training)
    return new.to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype)


def convert_model(
    model,
    spec: MLASpec,
    method: MethodConfig | str = "paper",
    calib_ids: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Replace every converted layer's attention by its MLA, in place.

    A data-aware ``method`` calibrates on ``calib_ids`` (B, T) first (and, for ``refit``, keeps
    each layer's attention inputs in fp16); ``freqfold`` without a fold searches it (TransMLA's
    ``--freqfold auto``, recorded in ``spec.options``); with ``budget`` the spec's ranks are
    replaced by the budgeted per-layer ranks. ``progress(i)`` is called after each calibrated layer,
    each fold of the search (i = -1) and each converted layer (``calibration_steps`` + converted
    layers in all).
    """
    cfg = parse_method(method) if isinstance(method, str) else method
    layers = spec.converted_layers
    tick = progress or (lambda i: None)
    stats: dict[int, LayerStats] = {}
    inputs: dict[int, list[torch.Tensor]] = {}
    runner = None
    if not cfg.is_paper or spec.latent_norm:
        if calib_ids is None:
            raise XecomlaError("this --method or the latent norm needs calibration data: pass calibration token ids")
        runner = LayerRunner(model, calib_ids)
        for i in range(max(layers) + 1):
            if i in layers:
                stats[i] = runner.stats(i)
                if cfg.refit or spec.latent_norm:
                    inputs[i] = runner.attention_inputs(i)
            if i < max(layers):
                runner.advance(i)
            tick(i)
    if cfg.freqfold == 0:

        def fold_loss() -> float:
            loss = calibration_loss(model, calib_ids, FREQFOLD_SEARCH_TOKENS)
            tick(-1)
            return loss

        fold, tried = search_freqfold(
            spec, lambda full, fold: swap_layers(model, full, replace(cfg, freqfold=fold), stats), fold_loss
        )
        for _ in range(len(fold_candidates(spec.head_dim, spec.rope_dim)) - len(tried)):
            tick(-1)  # folds not tried
        spec.options["freqfold"] = {"fold": fold, "calibration_loss": tried}
        cfg = replace(cfg, freqfold=fold)
    if cfg.budget:
        apply_budget(model, spec, cfg, stats)
    for i in layers:
        old = decoder_layers(model)[i].self_attn
        new = convert_layer(model, spec, i, cfg, stats.get(i), inputs.get(i))
        if cfg.refit:
            refit_output(old, new, inputs[i], runner.chunks)
        inputs.pop(i, None)
        decoder_layers(model)[i].self_attn = new
        tick(i)


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


def apply_budget(model, spec: MLASpec, cfg: MethodConfig, stats: dict[int, LayerStats]) -> None:
    """Replace the spec's ranks by per-layer ranks with the same total (``budget``)."""
    layers = spec.converted_layers
    context = spec.options.get("rope_context", ROPE_CONTEXT)
    energies = {}
    for i in layers:
        w = AttentionWeights.of(decoder_layers(model)[i].self_attn)
        if cfg.freqfold is not None:
            energies[i] = transmla_energy(w, spec, cfg, stats[i])
        else:
            energies[i] = layer_energy(w, spec, layer_plans(model, spec, cfg, stats[i], context), cfg, stats[i])
    rank = budget_rank(spec)
    ranks = budget_ranks(energies, rank, max_rank=min(spec.hidden_size, energies[layers[0]].numel()))
    for i in layers:
        spec.kv_ranks[i] = ranks[i]
    spec.options["rank_budget"] = rank * len(layers)


def budget_rank(spec: MLASpec) -> int:
    """The average rank the budget keeps: the spec's rank before budgeting (recorded once)."""
    if "budget_rank" not in spec.options:
        ranks = [spec.kv_ranks[i] for i in spec.converted_layers]
        spec.options["budget_rank"] = round(sum(ranks) / len(ranks))
    return spec.options["budget_rank"]


def calibration_steps(spec: MLASpec, method: MethodConfig | str) -> int:
    """How many calibration steps ``convert_model`` reports (for a progress bar): the layers of the
    calibration pass, and the folds a ``freqfold`` search may try."""
    cfg = parse_method(method) if isinstance(method, str) else method
    if cfg.is_paper and not spec.latent_norm:
        return 0
    folds = len(fold_candidates(spec.head_dim, spec.rope_dim)) if cfg.freqfold == 0 else 0
    return max(spec.converted_layers) + 1 + folds
