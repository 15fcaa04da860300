#!/usr/bin/env python
"""`distill --plan` against the measured peak memory of the same run on CPU.

    python bench/distill_plan.py [--threads 1] -- CKPT --steps 3 --batch-size 2 --seq-len 512 --data demo

Runs, each in its own process, with the distill options after `--`:

  plan       `xecomla distill ... --plan --json` (nothing loaded): the predicted peak per process
  baseline   what the run holds before any model: python, the imports, the student's checkpoint
             metadata, the tokenizer and the packed data (--data, --seq-len, the budget's tokens)
  run        the run itself (-o a temporary directory, --save-every 0)

and reads each child's peak resident memory (ru_maxrss from wait4, what `/usr/bin/time -v` prints
as "Maximum resident set size"). Prints one JSON object: the plan's rows, both peaks, and the
ratios plan / measured for the whole process and with the baselines taken out (the plan's
"runtime" row against the measured baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(cmd: list[str], threads: int, capture: bool = False) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, stdout) of one child process (wait4's rusage: that child alone)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = tempfile.TemporaryFile() if capture else None
    proc = subprocess.Popen(cmd, env=env, stdout=out or subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {code}")
    text = ""
    if out is not None:
        out.seek(0)
        text = out.read().decode()
    return usage.ru_maxrss * 1024, seconds, text


def baseline(args: list[str]) -> None:
    """The run's memory before its models: imports, checkpoint metadata, tokenizer, packed data."""
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    a, _ = parser.parse_known_args(args)
    from transformers import AutoTokenizer

    import xecomla_cli.cli  # noqa: F401 (every import of a run)
    import xecomla_cli.distill.recipe  # noqa: F401
    from xecomla_cli.checkpoint import read_checkpoint_info
    from xecomla_cli.text.packing import prepare_text_data

    info = read_checkpoint_info(a.ckpt)
    tokenizer = AutoTokenizer.from_pretrained(info.directory)
    budget = a.steps * a.batch_size * a.seq_len
    data = prepare_text_data(a.data, tokenizer, a.seq_len, val_tokens=4096, max_tokens=max(4 * budget, 10_000_000))
    print(json.dumps({"train_blocks": len(data.train), "val_blocks": len(data.val)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("distill_args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    args = [x for x in a.distill_args if x != "--"]
    if a.baseline:
        return baseline(args)
    py = sys.executable
    cli = [py, "-m", "xecomla_cli", "-q", "distill", *args]
    _, plan_s, plan_out = child([*cli, "--plan", "--json"], a.threads, capture=True)
    plan = json.loads(plan_out)
    base_rss, _, base_out = child([py, __file__, "--baseline", "--", *args], a.threads, capture=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_rss, run_s, _ = child([*cli, "-o", f"{tmp}/out", "--save-every", "0"], a.threads)
    mem = plan["memory"]
    runtime = mem["rows"]["runtime"]
    mib = 2**20
    print(
        json.dumps(
            {
                "args": args,
                "threads": a.threads,
                "plan_seconds": round(plan_s, 1),
                "run_seconds": round(run_s, 1),
                "plan": {k: round(v / mib, 1) for k, v in mem["rows"].items()},
                "plan_moments_mib": {
                    "end_of_forward": round(mem["end_of_forward"] / mib, 1),
                    "optimizer_step": round(mem["optimizer_step"] / mib, 1),
                    "loading": round(mem["loading"] / mib, 1),
                },
                "plan_peak_mib": round(mem["peak"] / mib, 1),
                "plan_peak_moment": mem["peak_moment"],
                "measured_peak_mib": round(run_rss / mib, 1),
                "measured_baseline_mib": round(base_rss / mib, 1),
                "baseline_data": json.loads(base_out),
                "plan_over_measured": round(mem["peak"] / run_rss, 3),
                "plan_over_measured_without_baseline": round((mem["peak"] - runtime) / (run_rss - base_rss), 3),
                "plan_runtime_over_baseline": round(runtime / base_rss, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
