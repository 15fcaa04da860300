"""`init-svd` as one function: load the original model, build the spec, convert, save a checkpoint."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoint import save_checkpoint
from ..choices import DEFAULT_CALIB_DATA, DEFAULT_METHOD
from ..engines import rank_for_width
from ..errors import XecomlaError
from ..loaded import parse_dtype
from ..mla.kv_spectrum import layer_singular_values
from ..mla.spec import attention_shape
from ..outputs import claim, default_output, fault_point
from ..sources import input_paths, load_model
from ..text.calibration import (
    DEFAULT_CALIB_TOKENS,
    SHAKESPEARE,
    TEACHER,
    calibration_ids,
    teacher_blocks,
    teacher_calibration_ids,
)
from .convert import calibration_steps, convert_model
from .methods import MethodConfig, parse_method
from .paper import KV_SVD_ROWS
from .spec_builder import build_spec, parse_layers, rope_dim_default

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
    dtype: str = "float32"
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
    inputs = [*input_paths(source), *([] if opts.calib_data in (None, TEACHER, SHAKESPEARE) else [opts.calib_data])]
    with claim(out, inputs=inputs, force=opts.force):  # before loading: one writer, inputs untouched
        return _convert_and_save(source, opts, out, start, progress, status)


def _convert_and_save(source: str, opts: InitOptions, out: Path, start: float, progress, status) -> Path:
    cfg = opts.method_config
    with status(f"loading {source}"):
        loaded = load_model(source, dtype="float32", device=opts.device, allow_pickle=opts.allow_pickle)
    fault_point("loaded")
    model = loaded.model
    if loaded.is_mla:
        raise XecomlaError(f"'{source}' is already an MLA checkpoint: init-svd takes an original model")
    layer_list = parse_layers(opts.layers, model.config.num_hidden_layers)
    sv = layer_singular_values(model) if opts.energy is not None else None
    kv_rank, rope_dim = opts.kv_rank, opts.rope_dim
    if opts.latent_width is not None:
        shape = attention_shape(model.config)
        G, h = shape["num_kv_heads"], shape["head_dim"]
        kv_rank, rope_dim = rank_for_width(
            opts.latent_width,
            original_per_layer=2 * G * h,
            head_dim=h,
            rope_dim=opts.rope_dim,
            default_rope_dim=rope_dim_default(h, G if cfg.group_rope else 1),
        )
    spec = build_spec(
        model.config,
        kv_rank=kv_rank,
        energy=opts.energy,
        rope_dim=rope_dim,
        q_rank=opts.q_rank,
        layers=layer_list,
        latent_norm=opts.latent_norm,
        method=opts.method_name,
        kv_rows=opts.kv_rows,
        singular_values=sv,
        rope_frequencies=opts.rope_frequencies,
        rope_span=opts.rope_span,
        attention_bias=opts.attention_bias,
    )
    if opts.latent_width is not None:
        spec = replace(spec, latent_width=opts.latent_width)
    calib_ids = None
    if opts.calibrates or spec.biases_folded:
        data = opts.calib_data or DEFAULT_CALIB_DATA
        if data == TEACHER:
            calib_ids = sampled_calibration(loaded, opts.calib_tokens, progress)
        else:
            calib_ids = calibration_ids(loaded.tokenizer, data, opts.calib_tokens)
        spec = replace(spec, calibration={"data": data, "tokens": calib_ids.numel()})
    steps = len(spec.converted_layers) + calibration_steps(spec, cfg)
    advance = progress("SVD init" if cfg.is_paper else f"{opts.method_name} init", steps) if progress else None
    spec = convert_model(model, spec, cfg, calib_ids, progress=None if advance is None else lambda i: advance(1))
    if opts.dtype != "float32":
        model.to(parse_dtype(opts.dtype))
    seconds = time.perf_counter() - start
    path = save_checkpoint(
        out,
        model=model,
        tokenizer=loaded.tokenizer,
        stage="init-svd",
        spec=spec,
        source=loaded.source,
        parent=None,
        metrics={"init_seconds": round(seconds, 2)},
        force=opts.force,
    )
    return path


def sampled_calibration(loaded, tokens: int, progress: ProgressFactory | None):
    """``--calib-data teacher``: calibration blocks the model writes itself (cached after the first run)."""
    advance = progress("sampling calibration text from the model", teacher_blocks(tokens)) if progress else None
    done = [0]

    def tick(n: int) -> None:
        if advance is not None:
            advance(n - done[0])
            done[0] = n

    return teacher_calibration_ids(loaded.model, loaded.tokenizer, tokens, progress=tick)
