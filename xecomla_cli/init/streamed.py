"""``convert_model`` for a model that is never whole in memory: the same conversion, one decoder layer
at a time from the source's files (``init.layer_source``), written tensor by tensor into the
checkpoint's shards (``weights_writer``). The result is the in-memory conversion's, bit for bit.

1. **Calibration** (data-aware methods, the latent norm, folded biases): the calibration batch's
   hidden states go through the original layers (``layerwise``), each layer read, run and dropped.
   At each converted layer its statistics and attention inputs are taken; TransMLA's fold search
   (``freqfold`` with no fold) runs its candidate folds side by side, each on its own copy of the
   first ``FREQFOLD_SEARCH_TOKENS`` tokens through the layers converted at full rank with that fold,
   and scores them at the end (the search's rule then picks from these scores, as the in-memory
   search that stops early does).
2. **Ranks** (``budget``): each layer's energies, then the budgeted ranks.
3. **Conversion**: each converted layer's MLA from its attention weights and statistics, cast to the
   checkpoint's dtype and written; every other tensor (embeddings, norms, MLP, the output head, the
   layers not converted) is copied from the source file, never through fp32 when the dtypes agree.

Without a search or a budget a layer is converted as soon as its statistics are taken (step 1 and 3
at once); otherwise each layer's statistics and inputs wait on disk (``spill``) for step 3, so memory
stays that of one layer whatever the depth.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import XecomlaError
from ..layerwise import MICRO_BATCH, LayerRunner
from ..mla.rebuild import has_o_bias, has_qkv_bias, new_mla_attention
from ..mla.spec import MLASpec
from ..weights_writer import ShardedWriter
from .convert import (
    FREQFOLD_SEARCH_TOKENS,
    attention_energy,
    bias_fold_error,
    budget_spec,
    build_attention,
)
from .freqfold import fold_candidates
from .layer_source import SourceModel, meta_model
from .methods import MethodConfig
from .refit import refit_output
from .stats import LayerStats, layer_stats
from .transmla import full_rank_spec, search_freqfold


def output_tensors(source: SourceModel, spec: MLASpec, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every tensor of the checkpoint, in the order of the converted model's
    state dict (what ``checkpoint.write_weights`` stores: a tied output head once)."""
    model = meta_model(source.config)
    with torch.device("meta"):
        for i in spec.converted_layers:
            old = model.model.layers[i].self_attn
            bias = has_qkv_bias(old) and not spec.biases_folded
            model.model.layers[i].self_attn = new_mla_attention(model.config, spec, i, bias, has_o_bias(old))
    state = model.to(dtype).state_dict()  # the dtypes ``model.to(dtype)`` gives (MLA keeps its RoPE frequencies fp32)
    if source.tied:
        state.pop("lm_head.weight", None)
    return [(n, tuple(t.shape), t.dtype) for n, t in state.items()]


class Spill:
    """Each converted layer's statistics and attention inputs, kept on disk between the passes."""

    def __init__(self, directory: Path):
        self.directory = directory

    def put(self, i: int, stats: LayerStats | None, inputs: list[torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        t = {}
        if stats is not None:
            t.update(n=torch.tensor([stats.n]), xx=stats.xx, q_norm=stats.q_norm, k_norm=stats.k_norm)
        for k, x in enumerate(inputs or []):
            t[f"inputs.{k}"] = x.cpu().contiguous()
        save_file(t, self.directory / f"layer{i}.safetensors")

    def get(self, i: int) -> tuple[LayerStats | None, list[torch.Tensor] | None]:
        from safetensors.torch import load_file

        path = self.directory / f"layer{i}.safetensors"
        if not path.is_file():
            return None, None
        t = load_file(path)
        stats = LayerStats(int(t["n"][0]), t["xx"], t["q_norm"], t["k_norm"]) if "xx" in t else None
        k = sorted(int(n.split(".")[1]) for n in t if n.startswith("inputs."))
        inputs = [t[f"inputs.{j}"] for j in k] or None
        path.unlink()
        return stats, inputs


def convert_streamed(
    source: SourceModel,
    spec: MLASpec,
    cfg: MethodConfig,
    calib_ids: torch.Tensor | None,
    directory: Path,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None = None,
) -> MLASpec:
    """Convert ``source`` as ``spec`` and ``cfg`` say and write its weights into ``directory`` in
    ``dtype``; returns the converted model's spec (``convert_model``'s, the same steps and ticks)."""
    tick = progress or (lambda i: None)
    layers = spec.converted_layers
    calibrates = not cfg.is_paper or spec.latent_norm or spec.biases_folded
    if calibrates and calib_ids is None:
        raise XecomlaError(
            "this --method, the latent norm or folding biases needs calibration data: pass calibration token ids"
        )
    deferred = cfg.freqfold == 0 or cfg.budget
    found: dict = {}
    record = {"pairs": {}, "scaling": set(), "bias_errors": {}}
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=directory) as spill_dir:
        spill = Spill(Path(spill_dir))
        writer = None
        runner = None
        try:
            if not deferred:
                writer = ShardedWriter(directory, output_tensors(source, spec, dtype))
            if calibrates:
                runner, losses = calibrate(source, spec, cfg, calib_ids, spill, writer, dtype, record, tick)
                if cfg.freqfold == 0:
                    current = {}

                    def convert_all(full, fold):
                        current["fold"] = fold
                        return lambda: None

                    fold, tried = search_freqfold(spec, convert_all, lambda: losses[current["fold"]])
                    for _ in losses:
                        tick(-1)
                    found["freqfold"] = {"fold": fold, "calibration_loss": tried}
                    cfg = replace(cfg, freqfold=fold)
            if cfg.budget:
                energies = {}
                for i in layers:
                    stats, inputs = spill.get(i)
                    attn = source.materialise(i, attention_only=True).self_attn
                    energies[i] = attention_energy(source.config, attn, spec, cfg, stats)
                    source.release(i)
                    spill.put(i, stats, inputs)
                spec = budget_spec(spec, energies)
            if deferred:
                writer = ShardedWriter(directory, output_tensors(source, spec, dtype))
                for i in layers:
                    stats, inputs = spill.get(i)
                    old = source.materialise(i, attention_only=True).self_attn
                    write_layer(source, spec, cfg, i, old, stats, inputs, runner, writer, dtype, record)
                    source.release(i)
                    tick(i)
            elif not calibrates:
                for i in layers:
                    old = source.materialise(i, attention_only=True).self_attn
                    write_layer(source, spec, cfg, i, old, None, None, None, writer, dtype, record)
                    source.release(i)
                    tick(i)
            copy_unconverted(source, writer, dtype)
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    scaling = record["scaling"]
    if len(scaling) != 1:  # one rotary embedding per model: the same for every layer
        raise XecomlaError(f"the converted layers' RoPE attention scalings differ ({sorted(scaling)}): a bug")
    if record["bias_errors"]:
        found["bias_fold"] = {"attention_error": record["bias_errors"]}
    return replace(spec, rope_attention_scaling=scaling.pop(), rope_pairs=record["pairs"] or None, **found)


def calibrate(source, spec, cfg, calib_ids, spill, writer, dtype, record, tick):
    """Step 1 (module docstring): the calibration walk over the original layers, with the fold search's
    streams beside it. Returns the calibration runner (its chunks' positions, masks and RoPE, for
    ``refit``) and the search's loss per candidate fold ({} without a search)."""
    layers = spec.converted_layers
    embed, rotary = source.embedder(), source.rotary_emb()
    runner = LayerRunner.from_parts(source.config, embed, rotary, source.layers, calib_ids, source.device)
    streams: dict[int, LayerRunner] = {}
    B = min(calib_ids.shape[0], -(-FREQFOLD_SEARCH_TOKENS // calib_ids.shape[1]))
    search_ids = calib_ids[:B]
    if cfg.freqfold == 0:
        for fold in fold_candidates(spec.head_dim, spec.rope_dim, spec.rope_span):
            streams[fold] = LayerRunner.from_parts(
                source.config, embed, rotary, source.layers, search_ids, source.device, MICRO_BATCH
            )
    del embed  # the embedding table
    full = full_rank_spec(spec)
    last = source.num_layers - 1 if streams else max(layers)
    for i in range(last + 1):
        layer = source.materialise(i)
        if i in layers:
            stats = on_cpu(layer_stats(runner, i)) if not cfg.is_paper or spec.biases_folded else None
            inputs = None
            if cfg.refit or spec.latent_norm or spec.biases_folded:
                inputs = [x.cpu() for x in runner.attention_inputs(i)]
            for fold, stream in streams.items():
                original = layer.self_attn
                layer.self_attn = build_attention(
                    source.config, original, full, i, replace(cfg, freqfold=fold), stats
                ).attn
                stream.advance(i)
                layer.self_attn = original
            tick(i)
            if writer is None:
                spill.put(i, stats, inputs)
            else:  # converted at once (no search, no budget)
                write_layer(source, spec, cfg, i, layer.self_attn, stats, inputs, runner, writer, dtype, record)
                tick(i)
        else:
            for stream in streams.values():
                stream.advance(i)
        if i < max(layers):
            runner.advance(i)
        source.release(i)
    for c in runner.chunks:
        c.h = None  # what refit reads of the chunks: positions, masks, RoPE
    losses = {fold: stream_loss(source, stream, search_ids) for fold, stream in streams.items()}
    return runner, losses


def on_cpu(stats: LayerStats) -> LayerStats:
    """The statistics on the CPU, where the conversion's math runs (``AttentionWeights`` is there)."""
    return LayerStats(stats.n, stats.xx.cpu(), stats.q_norm.cpu(), stats.k_norm.cpu())


def write_layer(source, spec, cfg, i, old, stats, inputs, runner, writer, dtype, record) -> None:
    """Step 3 for one layer: its MLA, written in ``dtype``; what it found goes into ``record``."""
    built = build_attention(source.config, old, spec, i, cfg, stats, inputs)
    if spec.biases_folded and inputs is not None:
        record["bias_errors"][str(i)] = bias_fold_error(source.config, old, spec, i, cfg, stats, inputs, built)
    if cfg.refit:
        refit_output(old, built.attn, inputs, runner.chunks)
    for name, t in built.attn.to(dtype).state_dict().items():
        writer.write(f"model.layers.{i}.self_attn.{name}", t)
    if built.rope_pairs is not None:
        record["pairs"][str(i)] = built.rope_pairs
    record["scaling"].add(float(built.attn.rope_attention_scaling))


def copy_unconverted(source: SourceModel, writer: ShardedWriter, dtype: torch.dtype) -> None:
    """Every tensor not written yet, as the source stores it, cast to its planned dtype (``dtype``; a copy
    when they agree)."""
    for name in writer.pending():
        t = source.weights.get(name)
        writer.write(name, t.to(writer.slots[name].dtype))
        del t


@torch.no_grad()
def stream_loss(source: SourceModel, stream: LayerRunner, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of a search stream's final hidden states on its token ids (B, T),
    as ``stats.calibration_loss`` computes it for the whole model."""
    norm = source.final_norm()
    total, count = 0.0, 0
    for k, c in enumerate(stream.chunks):
        h = norm(c.h)
        target = ids[k * MICRO_BATCH : (k + 1) * MICRO_BATCH, 1:].to(h.device)
        heads = source.lm_head_rows()
        first = next(heads)
        if first.shape[0] == source.weights.shape(source.lm_head_name())[0]:  # the whole head: the model's own sum
            logits = torch.nn.functional.linear(h, first)[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        else:  # a large vocabulary: log-sum-exp over blocks of rows
            total += blocked_cross_entropy(h[:, :-1], target, [first], heads)
        count += target.numel()
    return total / count


def blocked_cross_entropy(h: torch.Tensor, target: torch.Tensor, *blocks) -> float:
    """Σ over tokens of −log softmax(W h)[target], W's rows given in blocks (never all logits at once)."""
    h = h.flatten(0, 1)
    target = target.flatten()
    lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
    picked = torch.zeros(h.shape[0], device=h.device)
    start = 0
    for w in (w for part in blocks for w in part):
        logits = torch.nn.functional.linear(h, w).float()  # (N, rows)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        inside = (target >= start) & (target < start + w.shape[0])
        picked[inside] = logits[inside, target[inside] - start]
        start += w.shape[0]
        del logits
    return float((lse - picked).sum())
