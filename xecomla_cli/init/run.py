"""`init-svd` as one function: read the source's config (every refusal it decides comes first), build
the spec, convert layer by layer from the files (``init.streamed``) and write the checkpoint."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import save_streamed_checkpoint
from ..choices import DEFAULT_CALIB_DATA, DEFAULT_METHOD
from ..engines import rank_for_width
from ..errors import XecomlaError
from ..loaded import dtype_name, first_line, parse_device, parse_dtype
from ..mla.kv_spectrum import stacked_kv_singular_values
from ..mla.rope import mla_inv_freq, rope_type
from ..mla.spec import MLASpec, attention_shape, source_biases
from ..outputs import claim, default_output, fault_point
from ..sources import input_paths
from ..text.calibration import (
    DEFAULT_CALIB_TOKENS,
    SHAKESPEARE,
    TEACHER,
    calibration_ids,
    calibration_parts,
    teacher_blocks,
    teacher_calibration_ids,
)
from ..weights_on_disk import WeightsOnDisk
from .convert import calibration_steps
from .estimate import check_sampling_fits, estimate_line
from .latent import budget_ranks
from .latent_norm import data_rank_spec
from .layer_source import SourceModel
from .methods import RANK_MULTIPLE, MethodConfig, parse_method
from .paper import KV_SVD_ROWS
from .source_files import SourceFiles
from .spec_builder import build_spec, parse_layers, rope_dim_default
from .streamed import convert_streamed

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)


@dataclass(frozen=True)
class InitOptions:
    """The options of an init-svd run, checked on creation (before any model is loaded)."""

    kv_rank: int | None = None
    energy: float | None = None
    latent_width: str | None = None  # r + p as a number, or 'vllm' (engines.rank_for_width)
    q_rank: int | None = None
    rope_dim: int | None = None
    layers: str | None = None  # '0-11,20'; None: all
    latent_norm: bool = True  # DeepSeek-V3's kv_a_layernorm with its norm channel (``init.latent_norm``)
    kv_svd_rows: str = "all"
    method: str = DEFAULT_METHOD
    calib_data: str | None = None  # 'teacher', 'shakespeare' or a path; None: DEFAULT_CALIB_DATA
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    rope_frequencies: str | None = None  # 'default' | 'source' (a scaled RoPE; None: default)
    rope_span: int | None = None  # TransMLA's fold over the K fastest pairs
    attention_bias: str = "fold"  # 'fold' | 'keep' (q/k/v biases; a source with an output bias must keep)
    output: Path | None = None
    dtype: str = "auto"  # the checkpoint's: 'auto' keeps the source's (bf16 in, bf16 out)
    device: str = "cpu"
    force: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.kv_svd_rows not in KV_SVD_ROWS:
            raise XecomlaError(f"--kv-svd-rows must be one of {', '.join(KV_SVD_ROWS)}")
        if [self.kv_rank, self.energy, self.latent_width].count(None) != 2:
            raise XecomlaError("give exactly one of --kv-rank R, --energy δ or --latent-width W|vllm")
        cfg = self.method_config
        if not self.calibrates and self.calib_data is not None:
            raise XecomlaError(
                "--calib-data is only used by a data-aware --method (e.g. --method best) or the latent norm: "
                "the paper init with --no-latent-norm is data-free"
            )
        if cfg.budget and self.kv_rank is None:
            raise XecomlaError(
                "--method ...+budget spreads a total of layers x --kv-rank: give --kv-rank, not --energy"
            )

    @property
    def method_config(self) -> MethodConfig:
        return parse_method(self.method)

    @property
    def calibrates(self) -> bool:
        """Whether the init reads calibration text: a data-aware method, or the latent norm's channel
        (folding a biased source's biases reads it too, whatever the options)."""
        return not self.method_config.is_paper or self.latent_norm

    @property
    def method_name(self) -> str:
        """'paper', or the method as given (a preset or components)."""
        return "paper" if self.method_config.is_paper else self.method

    @property
    def kv_rows(self) -> str:
        """The data-aware latent is always fitted on the kept rows only."""
        return self.kv_svd_rows if self.method_config.is_paper else "nope-v"

    def output_suffix(self) -> str:
        """mla-r64[-method] (no method suffix for the default method): runs/<source>-mla-r64."""
        budget = f"r{self.kv_rank}" if self.kv_rank else f"e{self.energy:g}" if self.energy else f"w{self.latent_width}"
        method = "" if self.method == DEFAULT_METHOD else "-" + self.method_name.replace("+", "-")
        return f"mla-{budget}{method}"


def run_init(
    source: str,
    opts: InitOptions,
    *,
    progress: ProgressFactory | None = None,
    status: Callable[[str], AbstractContextManager] = lambda s: contextlib.nullcontext(),
) -> Path:
    """Convert ``source`` to MLA as ``opts`` say and write an init-svd checkpoint; returns its path.

    ``progress(description, total)`` makes a progress bar, ``status(message)`` shows a spinner."""
    start = time.perf_counter()
    out = opts.output or default_output(source, opts.output_suffix(), parent=Path("runs"))
    named = (TEACHER, SHAKESPEARE)
    calib_paths = [p for p in calibration_parts(opts.calib_data or DEFAULT_CALIB_DATA) if p not in named]
    inputs = [*input_paths(source), *calib_paths]
    with claim(out, inputs=inputs, force=opts.force):  # before loading: one writer, inputs untouched
        return _convert_and_save(source, opts, out, start, progress, status)


def _convert_and_save(source: str, opts: InitOptions, out: Path, start: float, progress, status) -> Path:
    cfg = opts.method_config
    src = SourceFiles(source, allow_pickle=opts.allow_pickle)  # the config only: refusals before any weight
    config = src.config
    device = parse_device(opts.device)
    layer_list = parse_layers(opts.layers, config.num_hidden_layers)
    kv_rank, rope_dim = opts.kv_rank, opts.rope_dim
    if opts.latent_width is not None:
        shape = attention_shape(config)
        G, h = shape["num_kv_heads"], shape["head_dim"]
        kv_rank, rope_dim = rank_for_width(
            opts.latent_width,
            original_per_layer=2 * G * h,
            head_dim=h,
            rope_dim=opts.rope_dim,
            default_rope_dim=rope_dim_default(h, G if cfg.group_rope else 1),
        )
    spec_args = dict(
        rope_dim=rope_dim,
        q_rank=opts.q_rank,
        layers=layer_list,
        latent_norm=opts.latent_norm,
        method=opts.method_name,
        kv_rows=opts.kv_rows,
        rope_frequencies=opts.rope_frequencies,
        rope_span=opts.rope_span,
        attention_bias=opts.attention_bias,
    )
    check_spec(config, cfg, build_spec(config, kv_rank=kv_rank or max_rank(config), **spec_args))
    with status(f"reading {source}"):
        directory = src.weights_directory()  # a GGUF file is de-quantized (and cached) first
    weights = WeightsOnDisk(directory, f"'{source}'")
    dtype = weights.floating_dtype() if opts.dtype == "auto" else parse_dtype(opts.dtype)
    data = (opts.calib_data or DEFAULT_CALIB_DATA) if opts.calibrates or spec_has_biases(config, opts) else None
    console_line(estimate_line(config, weights, opts, cfg, data, layer_list, device))
    sv = disk_singular_values(weights, config.num_hidden_layers) if opts.energy is not None else None
    spec = build_spec(config, kv_rank=kv_rank, energy=opts.energy, singular_values=sv, **spec_args)
    if opts.latent_width is not None:
        spec = replace(spec, latent_width=opts.latent_width)
    tokenizer = src.tokenizer()
    calib_ids = None
    if data is not None:
        parts = calibration_parts(data)  # a mix ('teacher+shakespeare'): the tokens shared evenly
        if TEACHER in parts:
            check_sampling_fits(weights, device)  # before the whole model is loaded to sample from it
        share = opts.calib_tokens // len(parts)
        calib_ids = torch.cat([
            sampled_calibration(src, share, progress, status) if part == TEACHER
            else calibration_ids(tokenizer, part, share)
            for part in parts
        ])  # fmt: skip
        spec = replace(spec, calibration={"data": data, "tokens": calib_ids.numel()})
    fault_point("loaded")
    model = SourceModel(weights, config, device)
    steps = len(spec.converted_layers) + calibration_steps(spec, cfg)
    advance = progress("SVD init" if cfg.is_paper else f"{opts.method_name} init", steps) if progress else None

    def write_weights(tmp: Path):
        tick = None if advance is None else lambda i: advance(1)
        done = convert_streamed(model, spec, cfg, calib_ids, tmp, dtype, progress=tick)
        return done, {"init_seconds": round(time.perf_counter() - start, 2)}

    config.dtype = dtype_name(dtype)
    return save_streamed_checkpoint(
        out,
        write_weights=write_weights,
        config=config,
        generation_config=src.generation_config(),
        tokenizer=tokenizer,
        stage="init-svd",
        dtype=dtype_name(dtype),
        source=src.portable,
        force=opts.force,
    )


def check_spec(config, cfg: MethodConfig, spec: MLASpec) -> None:
    """The refusals the config and options decide that ``build_spec`` leaves to the conversion: the
    latent norm's rank, the budget's smallest rank, a RoPE type no initialiser knows."""
    for i in spec.converted_layers:
        data_rank_spec(spec, i)
    if cfg.budget and min(r for r in spec.kv_ranks if r is not None) < RANK_MULTIPLE:
        budget_ranks({i: torch.ones(RANK_MULTIPLE) for i in spec.converted_layers}, min(spec.kv_ranks))
    try:
        mla_inv_freq(config, spec.head_dim, spec.rope_frequencies)
    except (KeyError, ValueError, TypeError) as exc:
        raise XecomlaError(
            f"the source's RoPE ({rope_type(config)}) cannot be converted ({first_line(exc)}): "
            "xecomla converts default, linear, dynamic, YaRN and Llama 3 RoPE"
        ) from None


def max_rank(config) -> int:
    """The largest rank ``build_spec`` takes for this config (a stand-in while the real ranks wait on the weights)."""
    shape = attention_shape(config)
    return min(2 * shape["num_heads"] * shape["head_dim"], shape["hidden_size"])


def spec_has_biases(config, opts: InitOptions) -> bool:
    """Whether the conversion folds q/k/v biases (which reads calibration text whatever the method)."""
    return source_biases(config)[0] and opts.attention_bias == "fold"


def disk_singular_values(weights: WeightsOnDisk, layers: int) -> dict[int, torch.Tensor]:
    """``layer_singular_values`` from the files: per layer, the K and V projections only."""
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        out[i] = stacked_kv_singular_values(
            weights.get(p + "k_proj.weight").float(), weights.get(p + "v_proj.weight").float()
        )
    return out


def console_line(line: str | None) -> None:
    if line:
        from .. import console

        console.err.print(line, soft_wrap=True)  # one line, however wide


def sampled_calibration(src, tokens: int, progress: ProgressFactory | None, status):
    """``--calib-data teacher``: calibration blocks the model writes itself (cached after the first run).
    The one step that needs the whole model: it is loaded for it (in bf16: the text is sampled from the
    weights rounded to bf16 whatever the load, ``text.teacher``) and dropped after."""
    with status("loading the model to sample calibration text"):
        loaded = src.load(dtype="bfloat16")
    advance = progress("sampling calibration text from the model", teacher_blocks(tokens)) if progress else None
    done = [0]

    def tick(n: int) -> None:
        if advance is not None:
            advance(n - done[0])
            done[0] = n

    try:
        return teacher_calibration_ids(loaded.model, loaded.tokenizer, tokens, progress=tick)
    finally:
        del loaded
        gc.collect()
