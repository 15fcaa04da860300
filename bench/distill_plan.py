#!/usr/bin/env python
"""`distill --plan` against the measured peak memory of the same run on CPU.

    python bench/distill_plan.py [--threads 1] -- CKPT --steps 3 --batch-size 2 --seq-len 512 --data demo

Runs, each in its own process, with the distill options after `--`:

  plan       `xecomla distill ... --plan --json` (nothing loaded): the predicted peak per process
  baseline   what the run holds before any model: python, the imports, the student's checkpoint
             metadata, the tokenizer and the packed data (--data, --seq-len, the budget's tokens)
  loading    the student and the teacher loaded as the run loads them, nothing else
  run        the run itself (-o a temporary directory, --save-every 0)

and reads each child's peak resident memory (ru_maxrss from wait4, what `/usr/bin/time -v` prints
as "Maximum resident set size"). Prints one JSON object: the plan's rows, both peaks, and the
ratios plan / measured for the whole process and with the baselines taken out (the plan's
"runtime" row against the measured baseline).

    python bench/distill_plan.py --layers

checks the per-layer activation formula alone: the bytes autograd saves for one decoder layer (the
graph's saved tensors, parameters excluded, a 2-layer model minus a 1-layer one) against
`memory_plan.layer_activations`, for the demo's layer and the Llama-3.2-1B layer, fp32 and bf16.
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
    parser.add_argument("--val-tokens", default="4k")  # the CPU default
    a, _ = parser.parse_known_args(args)
    from transformers import AutoTokenizer

    import xecomla_cli.cli  # noqa: F401 (every import of a run)
    import xecomla_cli.distill.recipe  # noqa: F401
    from xecomla_cli.checkpoint import read_checkpoint_info
    from xecomla_cli.counts import parse_count
    from xecomla_cli.text.packing import prepare_text_data

    info = read_checkpoint_info(a.ckpt)
    tokenizer = AutoTokenizer.from_pretrained(info.directory)
    budget = a.steps * a.batch_size * a.seq_len
    val_tokens = parse_count(a.val_tokens, "--val-tokens")
    data = prepare_text_data(
        a.data, tokenizer, a.seq_len, val_tokens=val_tokens, max_tokens=max(4 * budget, 10_000_000)
    )
    print(json.dumps({"train_blocks": len(data.train), "val_blocks": len(data.val)}))


LAYERS = {  # name: (LlamaConfig fields, MLASpec fields)
    "demo (SmolLM2-135M) layer, TransMLA layout: n = h = 64, p = 32, r = 64, latent norm": (
        dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64),
        dict(num_heads=9, num_kv_heads=3, head_dim=64, rope_dim=32, latent_norm=True, qk_nope_dim=64, kv_rank=64),
    ),
    "Llama-3.2-1B layer, paper layout: n = 32, p = 32, r = 128": (
        dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
        dict(num_heads=32, num_kv_heads=8, head_dim=64, rope_dim=32, kv_rank=128),
    ),
}


def saved_bytes(model, ids, precision: str) -> int:
    """Bytes of the distinct storages autograd saved for the backward pass (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    seen, stack, visited = {}, [h.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for attr in dir(fn):
            value = getattr(fn, attr) if attr.startswith("_saved_") else None
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in params:
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        stack += [f for f, _ in fn.next_functions]
    return sum(seen.values())


def layer_check() -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xecomla_cli.distill.memory_plan import StepShape, layer_activations
    from xecomla_cli.distill.model_sizes import model_sizes
    from xecomla_cli.mla.rebuild import apply_spec
    from xecomla_cli.mla.spec import MLASpec

    torch.manual_seed(0)
    rows = []
    for name, (config, spec) in LAYERS.items():
        for precision in ("fp32", "bf16"):
            for blocks in (1, 2):
                seq_len, measured = 256, {}
                for n_layers in (1, 2):
                    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, num_hidden_layers=n_layers, **config))
                    kw = {**spec, "hidden_size": config["hidden_size"]}
                    rank = kw.pop("kv_rank")
                    apply_spec(model, MLASpec(num_layers=n_layers, kv_ranks=[rank] * n_layers, **kw))
                    model.train()
                    ids = torch.randint(0, 512, (blocks, seq_len))
                    measured[n_layers] = saved_bytes(model, ids, precision)
                layer = model_sizes(model).layers[1]
                step = StepShape(micro_batch=blocks, seq_len=seq_len, accumulation=1, precision=precision, device="cpu")
                planned = layer_activations(layer, step) + (2 * layer.linear_weights if precision == "bf16" else 0)
                one = measured[2] - measured[1]
                rows.append(
                    {
                        "layer": name,
                        "precision": precision,
                        "blocks": blocks,
                        "seq_len": seq_len,
                        "measured_bytes": one,
                        "planned_bytes": planned,
                        "planned_over_measured": round(planned / one, 4),
                    }
                )
    return rows


def loading(args: list[str]) -> None:
    """The run's loading alone: the student and the teacher, as the recipe loads them (then exit)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--teacher", default=None)
    a, _ = parser.parse_known_args(args)
    import torch

    from xecomla_cli.checkpoint import read_checkpoint_info
    from xecomla_cli.distill.config import resolve_precision
    from xecomla_cli.distill.models import load_models

    info = read_checkpoint_info(a.ckpt)
    bf16 = resolve_precision(a.precision, torch.device("cpu")) == "bf16"
    load_models(info, a.teacher or info.source, torch.device("cpu"), teacher_dtype="bfloat16" if bf16 else "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loading", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", action="store_true", help="check the per-layer activation formula alone")
    parser.add_argument("distill_args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    args = [x for x in a.distill_args if x != "--"]
    if a.baseline:
        return baseline(args)
    if a.loading:
        return loading(args)
    if a.layers:
        print(json.dumps({"layers": layer_check()}, indent=2))
        return
    py = sys.executable
    cli = [py, "-m", "xecomla_cli", "-q", "distill", *args]
    _, plan_s, plan_out = child([*cli, "--plan", "--json"], a.threads, capture=True)
    plan = json.loads(plan_out)
    base_rss, _, base_out = child([py, __file__, "--baseline", "--", *args], a.threads, capture=True)
    load_rss, _, _ = child([py, __file__, "--loading", "--", *args], a.threads)
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
                    "backward": round(mem["backward"] / mib, 1),
                    "loading": round(mem["loading"] / mib, 1),
                },
                "plan_peak_mib": round(mem["peak"] / mib, 1),
                "plan_peak_moment": mem["peak_moment"],
                "measured_peak_mib": round(run_rss / mib, 1),
                "measured_baseline_mib": round(base_rss / mib, 1),
                "measured_loading_mib": round(load_rss / mib, 1),
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
