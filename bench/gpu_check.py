"""One-shot GPU check: the decode kernel, end-to-end decode at Llama-3.2-1B shape, distillation throughput.

Runs the three benchmarks one after the other, each under its own time limit (about 8.5 minutes
in all on an H100/H200), and writes ONE JSON object with the device name, the date and each
part's result; a part that fails or runs out of time keeps its error and whatever it printed.
Needs only torch, triton and transformers (and this checkout on PYTHONPATH) on the GPU machine.

    python bench/gpu_check.py                      # on a GPU -> bench/results/gpu_check-<date>.json
    python bench/gpu_check.py --tiny -o out.json   # tiny shapes on CPU, seconds (the test suite runs this)

Parts (GPU):
  decode_kernel  bench/decode_kernel.py --sweep: kernel vs SDPA on the GQA cache vs the PyTorch path, tile sweep
  decode_e2e     bench/decode_e2e.py at Llama-3.2-1B shape (random weights: 32 heads, 8 KV heads, head dim 64,
                 r = 128, p = 32), bf16, B in {1, 8, 32} x context in {4K, 16K}, original vs MLA; at B = 8, 16K
                 also StaticCache + torch.compile (CUDA graphs) for both
  distill        bench/distill_throughput.py, Llama-3.2-1B shape, 4 x 2048: naive vs ours vs ours+ckpt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

E2E = "--shape llama-3.2-1b --dtype bfloat16 --contexts 4096,16384 --batches 1,8,32 --new-tokens 16"
GPU_PARTS = {  # name: (command line, seconds allowed): 510 s in all
    "decode_kernel": ("bench/decode_kernel.py --sweep", 130),
    "decode_e2e": (f"bench/decode_e2e.py {E2E} --variants original,original_growing,mla --static-at 8x16384", 270),
    "distill": ("bench/distill_throughput.py --modes naive,ours,ours+ckpt", 110),
}
TINY_PARTS = {
    "decode_kernel": ("bench/decode_kernel.py --quick", 120),
    "decode_e2e": ("bench/decode_e2e.py --tiny", 120),
    "distill": ("bench/distill_throughput.py --quick --modes ours", 120),
}


def last_json(text: str):
    """The JSON object a benchmark printed last on stdout, or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def json_lines(text: str) -> list:
    """The JSON objects a benchmark printed one per line on stderr as it went (what a timeout leaves)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def run_part(name: str, argv: list[str], limit_s: int) -> dict:
    """Run one benchmark under a time limit; its JSON, or its error and the tail of what it printed."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        stdout, stderr, error = done.stdout, done.stderr, None if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = _text(exc.stdout), _text(exc.stderr)
        error = f"timed out after {limit_s} s"
    out = dict(command=" ".join(["python", *argv]), seconds=round(time.perf_counter() - t0, 1))
    result = last_json(stdout) if error is None else None
    if result is None:
        out.update(error=error or "no JSON on stdout", stderr_tail=stderr[-4000:], partial=json_lines(stderr))
    else:
        out["result"] = result
    print(f"{name}: {out.get('error', 'ok')} in {out['seconds']} s", file=sys.stderr, flush=True)
    return out


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds): checks that every part runs")
    ap.add_argument("-o", "--output", help="the JSON file to write (default: bench/results/gpu_check-<date>.json)")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    report = dict(
        benchmark="gpu_check",
        device=torch.cuda.get_device_name(0) if on_gpu else "cpu",
        date=time.strftime("%Y-%m-%d %H:%M"),
        torch=torch.__version__,
        mode="tiny" if args.tiny else "full",
        parts={},
    )
    if not on_gpu and not args.tiny:
        print("no GPU: running --tiny instead", file=sys.stderr)
        report["mode"] = "tiny"
    for name, (command, limit_s) in (TINY_PARTS if report["mode"] == "tiny" else GPU_PARTS).items():
        report["parts"][name] = run_part(name, command.split(), limit_s)
    output = Path(args.output or ROOT / "bench" / "results" / f"gpu_check-{time.strftime('%Y-%m-%d')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(output)
    return report


if __name__ == "__main__":
    main()
