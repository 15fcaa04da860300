"""``convert_model`` for a model that is never whole in memory: the same conversion, one decoder layer
at a time from the source's files (``init.layer_source``), written tensor by tensor into the
checkpoint's shards (``weights_writer``). The result is the in-memory conversion's, bit for bit.

1. **Calibration** (data-aware methods, the latent norm, folded biases): the calibration batch's
   hidden states go through the original layers (``layerwise``), each layer read, run and dropped.
   At each converted layer its statistics and attention inputs are taken.
2. **Fold search** (TransMLA's ``freqfold`` with no fold): per fold tried, in the in-memory search's
   order and with its stopping rule, one more pass over the layers with the first
   ``FREQFOLD_SEARCH_TOKENS`` tokens through the layers converted at full rank with that fold.
   **Ranks** (``budget``): each layer's energies, then the budgeted ranks.
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

        if stats is not None:
            t = dict(n=torch.tensor([stats.n]), xx=stats.xx, q_norm=stats.q_norm, k_norm=stats.k_norm)
            save_file(t, self.directory / f"stats{i}.safetensors")
        if inputs is not None:
            save_file({str(k): x.contiguous() for k, x in enumerate(inputs)}, self.directory / f"inputs{i}.safetensors")

    def stats(self, i: int) -> LayerStats | None:
        from safetensors.torch import load_file

        path = self.directory / f"stats{i}.safetensors"
        if not path.is_file():
            return None
        t = load_file(path)
        return LayerStats(int(t["n"][0]), t["xx"], t["q_norm"], t["k_norm"])

    def inputs(self, i: int) -> list[torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self.directory / f"inputs{i}.safetensors"
        if not path.is_file():
            return None
        t = load_file(path)
        return [t[str(k)] for k in range(len(t))]


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
                runner = calibrate(source, spec, cfg, calib_ids, spill, writer, dtype, record, tick)
                if cfg.freqfold == 0:
                    fold, tried = search_fold(source, spec, cfg, calib_ids, spill, tick)
                    found["freqfold"] = {"fold": fold, "calibration_loss": tried}
                    cfg = replace(cfg, freqfold=fold)
            if cfg.budget:
                energies = {}
                for i in layers:
                    attn = source.materialise(i, attention_only=True).self_attn
                    energies[i] = attention_energy(source.config, attn, spec, cfg, spill.stats(i))
                    source.release(i)
                spec = budget_spec(spec, energies)
            if deferred:
                writer = ShardedWriter(directory, output_tensors(source, spec, dtype))
                for i in layers:
                    old = source.materialise(i, attention_only=True).self_attn
                    write_layer(
                        source, spec, cfg, i, old, spill.stats(i), spill.inputs(i), runner, writer, dtype, record
                    )
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


def calibrate(source, spec, cfg, calib_ids, spill, writer, dtype, record, tick) -> LayerRunner:
    """Step 1 (module docstring): the calibration walk over the original layers. Returns the runner
    (its chunks' positions, masks and RoPE, for ``refit``)."""
    layers = spec.converted_layers
    runner = LayerRunner.from_parts(
        source.config, source.embedder(), source.rotary_emb(), source.layers, calib_ids, source.device
    )
    for i in range(max(layers) + 1):
        layer = source.materialise(i)
        if i in layers:
            stats = on_cpu(layer_stats(runner, i)) if not cfg.is_paper or spec.biases_folded else None
            inputs = None
            if cfg.refit or spec.latent_norm or spec.biases_folded:
                inputs = [x.cpu() for x in runner.attention_inputs(i)]
            tick(i)
            if writer is None:
                spill.put(i, stats, inputs)
            else:  # converted at once (no search, no budget)
                write_layer(source, spec, cfg, i, layer.self_attn, stats, inputs, runner, writer, dtype, record)
                tick(i)
        if i < max(layers):
            runner.advance(i)
        source.release(i)
    for c in runner.chunks:
        c.h = None  # what refit reads of the chunks: positions, masks, RoPE
    return runner


def search_fold(source, spec, cfg, calib_ids, spill, tick) -> tuple[int, dict[int, float]]:
    """TransMLA's fold search (``transmla.search_freqfold``, the in-memory search's rule and order): per
    fold tried, one pass of its first ``FREQFOLD_SEARCH_TOKENS`` tokens through every layer, the
    converted ones at full rank with that fold (from their statistics on disk), then the output head."""
    B = min(calib_ids.shape[0], -(-FREQFOLD_SEARCH_TOKENS // calib_ids.shape[1]))
    ids = calib_ids[:B]
    full = full_rank_spec(spec)
    current = {}

    def convert_all(_full, fold):
        current["fold"] = fold
        return lambda: None

    def loss() -> float:
        fold_cfg = replace(cfg, freqfold=current["fold"])
        stream = LayerRunner.from_parts(
            source.config, source.embedder(), source.rotary_emb(), source.layers, ids, source.device, MICRO_BATCH
        )
        for i in range(source.num_layers):
            layer = source.materialise(i)
            if i in spec.converted_layers:
                original = layer.self_attn
                layer.self_attn = build_attention(source.config, original, full, i, fold_cfg, spill.stats(i)).attn
                stream.advance(i)
                layer.self_attn = original
            else:
                stream.advance(i)
            source.release(i)
        tick(-1)
        return stream_loss(source, stream, ids)

    fold, tried = search_freqfold(spec, convert_all, loss)
    for _ in range(len(fold_candidates(spec.head_dim, spec.rope_dim, spec.rope_span)) - len(tried)):
        tick(-1)  # folds not tried
    return fold, tried


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
