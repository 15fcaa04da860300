"""What an init-svd run will cost, said before it starts (one line on stderr when it is long).

Time is estimated from FLOPs and a rate measured now: a short timed probe (an fp32 matrix product
of the model's width, ``probe_rate``) gives this machine's FLOP/s at this moment (other jobs on
the cores included), and the run's work is counted in FLOPs:

    calibration   2 · (one layer's parameters) · tokens · layers walked    (plus the attention scores)
    fold search   each candidate fold: its 1024 tokens through every layer and the output head
    teacher text  2 · (all parameters) per sampled token

each divided by the probe's rate times how much of it that step reaches (``*_EFFICIENCY``). The
calibration's was measured: the 16-layer Llama-3.2-1B-shaped run of
``docs/results/2026-12-07-streamed-init.md`` did 14 layers' calibration FLOPs at 0.8 of the rate its
probe gave (on a shared, loaded machine). Sampling's is an assumption, not a measurement: batches of
32 tokens a step reach less of a matrix product's rate, taken as a quarter. Memory is counted from
the shapes: one decoder layer in fp32 (and its copy as read), the embedding table as stored, the
calibration hidden states and one layer's statistics; sampling teacher text needs the whole model
(bf16, and the sampler's fp32 copy: 6 bytes a parameter).
"""

from __future__ import annotations

import time

import torch

from ..errors import XecomlaError
from ..host_memory import mem_available
from ..mla.spec import attention_shape
from ..text.calibration import DEFAULT_SEQ_LEN, TEACHER, calibration_parts, teacher_blocks
from ..weights_on_disk import WeightsOnDisk
from .convert import FREQFOLD_SEARCH_TOKENS
from .freqfold import fold_candidates

CALIB_EFFICIENCY = 0.8  # the calibration pass's FLOP/s over the probe's (measured, see above)
SAMPLING_EFFICIENCY = 0.25  # teacher sampling's (batch 32, a token at a time) over the probe's (assumed)
LONG_SECONDS = 60  # the line is printed for runs expected to take longer (teacher sampling included)
BASE_BYTES = 600 * 2**20  # Python, torch and transformers themselves
BIG_MODEL = 1e9  # parameters above which sampling teacher text on a CPU deserves a word
SAMPLING_BYTES = 6  # a parameter while teacher text is sampled: bf16 as loaded + the sampler's fp32 copy


def check_sampling_fits(weights: WeightsOnDisk, device: torch.device, available: int | None = None) -> None:
    """``--calib-data teacher`` loads the whole model to sample its text: refused before loading, on a
    CPU, when that cannot fit in the memory free now (``available``: MemAvailable by default)."""
    if device.type != "cpu":
        return
    available = mem_available() if available is None else available
    need = BASE_BYTES + SAMPLING_BYTES * sum(weights.numel(n) for n in weights.names)
    if available is not None and need > available:
        raise XecomlaError(
            f"--calib-data teacher samples text from the whole model, ~{gb(need)} here with {gb(available)} free: "
            "pass --calib-data FILE (a .txt or .jsonl of your own text) or --calib-data shakespeare"
        )


def probe_rate(width: int, device: torch.device) -> float:
    """FLOP/s of an fp32 (512, d) x (d, d) product on ``device`` now (best of 3 after a warm-up)."""
    a = torch.randn(512, width, device=device)
    b = torch.randn(width, width, device=device)
    best = float("inf")
    for k in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k:
            best = min(best, time.perf_counter() - t)
    return 2 * 512 * width * width / max(best, 1e-9)


def layer_parameters(weights: WeightsOnDisk, layer: int = 0) -> int:
    prefix = f"model.layers.{layer}."
    return sum(weights.numel(n) for n in weights.names if n.startswith(prefix))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def estimate_line(
    config, weights: WeightsOnDisk, opts, cfg, data: str | None, layers, device: torch.device
) -> str | None:
    """The cost line for this run, or None for a short one (see the module docstring)."""
    shape = attention_shape(config)
    d, L, h = shape["hidden_size"], shape["num_layers"], shape["head_dim"]
    params = sum(weights.numel(n) for n in weights.names)
    per_layer = layer_parameters(weights)
    ffn = getattr(config, "intermediate_size", 4 * d)
    vocab = config.vocab_size
    dev = device
    rate = probe_rate(d, dev)
    seconds = 0.0
    peak = BASE_BYTES + 2 * per_layer * 4 + vocab * d * weights.floating_dtype().itemsize
    if data is not None:
        tokens = opts.calib_tokens
        T = min(DEFAULT_SEQ_LEN, tokens)
        walked = max(layers or range(L)) + 1
        flops = (2 * per_layer + 4 * T * d) * tokens * walked
        if cfg.freqfold == 0:
            folds = len(fold_candidates(h, opts.rope_dim or h // 2, opts.rope_span))
            flops += folds * ((2 * per_layer + 4 * T * d) * L + 2 * vocab * d) * FREQFOLD_SEARCH_TOKENS
            walked = L
        seconds += flops / (rate * CALIB_EFFICIENCY)
        # hidden states, one layer's MLP activations (a chunk of 4 blocks), attention inputs (fp16), statistics
        peak += tokens * d * 4 * 2 + 4 * T * ffn * 4 * 3 + tokens * d * 2 + 2 * (d + 1) ** 2 * 8
    line = (
        f"init-svd: {params / 1e9:.2f}B parameters, {L} layers; expect ~{duration(seconds)} "
        f"(from FLOPs at {rate / 1e9:.0f} GFLOP/s, a probe of this machine now) and a peak of ~{gb(peak)}"
    )
    parts = calibration_parts(data) if data is not None else []
    if TEACHER in parts:
        share = opts.calib_tokens // len(parts)
        sampled = teacher_blocks(share) * min(DEFAULT_SEQ_LEN, share)
        per_s = rate * SAMPLING_EFFICIENCY / (2 * params)
        memory = gb(SAMPLING_BYTES * params)
        seconds += sampled / per_s
        line += (
            f"; --calib-data teacher samples {sampled:,} tokens from the model itself unless cached "
            f"(~{duration(sampled / per_s)} at ~{per_s:.0f} tokens/s, the whole model in memory: ~{memory})"
        )
        if params > BIG_MODEL and dev.type == "cpu":
            line += ": on a CPU pass --calib-data FILE (a .txt or .jsonl of your own text) instead"
    return line if seconds > LONG_SECONDS else None
