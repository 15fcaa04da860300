"""Benchmark the Triton MLA decode kernel; prints one JSON object.

For each shape: kernel time, GB/s of latent cache read ((r + p) * L * B * bytes / time), and
speedups over (a) PyTorch SDPA on the ORIGINAL GQA cache of the same batch and context (fastest
SDPA backend that runs, enable_gqa) and (b) the PyTorch decode path on the same latent cache
(``mla_decode_torch``: two batched GEMMs in the cache dtype with an fp32 softmax, DeepSeek-V3's
``absorb`` decode as X-EcoMLA ships it, and what the model runs where the kernel does not).

    python bench/decode_kernel.py            # full table on a GPU (bf16, triton.testing.do_bench)
    python bench/decode_kernel.py --quick    # tiny shapes; runs on CPU through the Triton interpreter
    python bench/decode_kernel.py --sweep    # also sweep tile parameters on the target shape
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time

import torch
import triton

from xecomla_cli.kernels.mla_decode import _mla_decode, default_config, default_num_splits, mla_decode
from xecomla_cli.kernels.reference import mla_decode_reference
from xecomla_cli.kernels.torch_decode import mla_decode_torch

# attention shapes of the original models: query heads H, KV heads G, head dim hd
LLAMA_1B = dict(model="Llama-3.2-1B", H=32, G=8, hd=64, p=32)
SMOLLM2_135M = dict(model="SmolLM2-135M (demo)", H=9, G=3, hd=64, p=32)

FULL_SHAPES = [dict(LLAMA_1B, r=r, B=B, L=L) for r in (128, 64) for B in (1, 32, 64) for L in (4096, 8192, 32768)]
FULL_SHAPES += [dict(SMOLLM2_135M, r=64, B=32, L=8192)]
QUICK_SHAPES = [dict(LLAMA_1B, r=128, B=2, L=256), dict(SMOLLM2_135M, r=64, B=2, L=256)]
TARGET = dict(LLAMA_1B, r=128, B=64, L=8192)  # DESIGN.md: >= 2,500 GB/s and >= 5x SDPA on an H100


def bench_ms(fn, device) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA, a few timed calls on CPU."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sdpa_gqa_ms(B, H, G, hd, L, dtype, device) -> tuple[float, str]:
    """Fastest SDPA backend on the original GQA cache: one query token over K, V [B, G, L, hd]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(B, H, 1, hd, device=device, dtype=dtype)
    k = torch.randn(B, G, L, hd, device=device, dtype=dtype)
    v = torch.randn(B, G, L, hd, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    best = (math.inf, "none")
    for backend in (fused if device.type == "cuda" else []) + [SDPBackend.MATH]:
        if backend == SDPBackend.MATH and best[0] < math.inf:
            break  # the math backend materialises repeated K/V: only a fallback

        def fn(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, enable_gqa=True)

        try:
            fn()
        except RuntimeError:  # this backend does not take these shapes / GQA
            continue
        best = min(best, (bench_ms(fn, device), backend.name))
    return best


def sig(x: float, digits: int = 3) -> float:
    """x rounded to a few significant digits, for a readable report."""
    return float(f"{x:.{digits}g}")


def make_inputs(B, H, r, p, L, dtype, device):
    """Latent queries and a full latent cache of L rows per sequence."""
    q_lat = torch.randn(B, H, r, device=device, dtype=dtype)
    q_rope = torch.randn(B, H, p, device=device, dtype=dtype)
    kv = torch.randn(B, L, r, device=device, dtype=dtype)
    k_rope = torch.randn(B, L, p, device=device, dtype=dtype)
    seq_lens = torch.full((B,), L, device=device, dtype=torch.int32)
    return q_lat, q_rope, kv, k_rope, seq_lens, 1.0 / math.sqrt(r + p)


def time_latent_decode(args: tuple, device) -> tuple[float, float, float]:
    """Kernel ms, PyTorch-path ms, and the kernel's max abs error against the fp32 reference."""
    kernel_ms = bench_ms(lambda: mla_decode(*args), device)
    torch_ms = bench_ms(lambda: mla_decode_torch(*args), device)
    max_abs_err = (mla_decode(*args).float() - mla_decode_reference(*args).float()).abs().max().item()
    return kernel_ms, torch_ms, max_abs_err


def benchmark(shape, dtype, device) -> dict:
    """One row of the report."""
    B, H, r, p, L, G, hd = (shape[k] for k in ("B", "H", "r", "p", "L", "G", "hd"))
    elt = torch.finfo(dtype).bits // 8
    kernel_ms, torch_ms, max_abs_err = time_latent_decode(make_inputs(B, H, r, p, L, dtype, device), device)
    sdpa_ms, sdpa_backend = sdpa_gqa_ms(B, H, G, hd, L, dtype, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    mla_bytes = (r + p) * L * B * elt  # latent cache rows read by the kernel
    gqa_bytes = 2 * G * hd * L * B * elt  # K and V rows read by SDPA
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return dict(
        shape,
        dtype=str(dtype).removeprefix("torch."),
        num_splits=default_num_splits(B, H, L, num_sms, r),
        kernel_us=sig(kernel_ms * 1e3),
        kernel_gbps=sig(mla_bytes / kernel_ms / 1e6),
        torch_us=sig(torch_ms * 1e3),
        sdpa_us=sig(sdpa_ms * 1e3),
        sdpa_gbps=sig(gqa_bytes / sdpa_ms / 1e6),
        sdpa_backend=sdpa_backend,
        speedup_vs_sdpa=sig(sdpa_ms / kernel_ms),
        speedup_vs_torch=sig(torch_ms / kernel_ms),
        max_abs_err=sig(max_abs_err, 2),
    )


SWEEP = dict(BLOCK_H=(16, 32), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2,), num_splits=(2, 4, 8))
QUICK_SWEEP = dict(BLOCK_H=(16,), BLOCK_N=(32,), num_warps=(4,), num_stages=(2,), num_splits=(1, 2))


def sweep(shape, dtype, device, grid: dict) -> list[dict]:
    """Time tile parameters (BLOCK_H, BLOCK_N, warps, stages, splits) on one shape; best first."""
    B, H, r, p, L = (shape[k] for k in ("B", "H", "r", "p", "L"))
    q_lat, q_rope, kv, k_rope, seq_lens, scale = make_inputs(B, H, r, p, L, dtype, device)
    mla_bytes = (r + p) * L * B * (torch.finfo(dtype).bits // 8)
    rows = []
    for values in itertools.product(*grid.values()):
        tile = dict(zip(grid, values, strict=True))
        if tile["BLOCK_H"] > max(16, triton.next_power_of_2(H)):
            continue
        launch = dict(tile)
        splits = launch.pop("num_splits")

        def fn(launch=launch, splits=splits):
            return _mla_decode(q_lat, q_rope, kv, k_rope, seq_lens, scale, None, None, splits, **launch)

        try:
            ms = bench_ms(fn, device)
        except Exception as e:  # out of shared memory / registers for this tile
            print(f"sweep: skip {tile}: {type(e).__name__}", file=sys.stderr)
            continue
        rows.append(dict(tile, us=sig(ms * 1e3), gbps=sig(mla_bytes / ms / 1e6)))
    return sorted(rows, key=lambda row: row["us"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test; CPU works)")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile parameters on the target shape")
    opts = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = opts.quick or device.type == "cpu"
    if quick and not opts.quick:
        print("no GPU: running the --quick shapes through the Triton interpreter", file=sys.stderr)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # interpreter: no bf16 tl.dot

    report = dict(
        device=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        triton=triton.__version__,
        default_config=default_config(128, 32, dtype),
        shapes=[],
    )
    for shape in QUICK_SHAPES if quick else FULL_SHAPES:
        row = benchmark(shape, dtype, device)
        print(
            f"{row['model']:>20} B={row['B']:<3} r={row['r']:<4} L={row['L']:<6} "
            f"{row['kernel_us']:>9.1f} us {row['kernel_gbps']:>7.0f} GB/s  "
            f"x{row['speedup_vs_sdpa']:.2f} SDPA  x{row['speedup_vs_torch']:.2f} torch",
            file=sys.stderr,
        )
        report["shapes"].append(row)
    if opts.sweep:
        target = QUICK_SHAPES[0] if quick else TARGET
        report["sweep"] = dict(shape=target, top=sweep(target, dtype, device, QUICK_SWEEP if quick else SWEEP)[:15])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
