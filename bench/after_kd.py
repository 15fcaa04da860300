"""The stages after KD, measured on the demo: LAMBADA, the six-task average, and greedy agreement
with the teacher on simple chat prompts, for each checkpoint given (KD alone, + on-policy, + DPO ...).

    python bench/after_kd.py runs/d-kd runs/d-kd-dpo ... [--limit 50] [--out bench/results/after_kd.json]

Agreement: for each of PROMPTS (our own set, kept apart from the README's three), the first 16
greedy tokens of the answer, compared position by position with the teacher's (`match`) and as
the length of the common prefix over 16 (`prefix`). LAMBADA and the tasks come from
`xecomla eval --json` (8192 LAMBADA tokens; `--limit` questions per task, with standard errors).
The README's three prompts' greedy answers (40 tokens) are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of Italy?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Name the largest planet in our solar system.",
    "What do bees make?",
    "How many legs does a spider have?",
    "What is 2 plus 2?",
    "Which animal is known as the king of the jungle?",
    "What is the opposite of hot?",
    "In which continent is Egypt?",
]
README_PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Why do we have seasons?"]


def greedy(model, tokenizer, prompts: list[str], tokens: int) -> list[list[int]]:
    from xecomla_cli.distill.preferences import render_prompt
    from xecomla_cli.text.chat import left_pad, stop_ids, trim_at_stop
    from xecomla_cli.text.sampling import sample

    stop = stop_ids(tokenizer)
    ids, mask = left_pad([render_prompt(tokenizer, p) for p in prompts], stop[0], torch.device("cpu"))
    return [trim_at_stop(r, stop) for r in sample(model, ids, mask, tokens, stop, 0.0)]


def agreement(a: list[list[int]], t: list[list[int]], n: int = 16) -> dict[str, float]:
    match, prefix = [], []
    for x, y in zip(a, t, strict=True):
        x, y = (x + [-1] * n)[:n], (y + [-2] * n)[:n]
        same = [u == v for u, v in zip(x, y, strict=True)]
        match.append(sum(same) / n)
        prefix.append(next((k for k, s in enumerate(same) if not s), n) / n)
    return {"match": round(sum(match) / len(match), 4), "prefix": round(sum(prefix) / len(prefix), 4)}


def run_eval(ckpt: str, limit: int) -> dict:
    """LAMBADA perplexity and the six default tasks (`limit` questions each) from `xecomla eval --json`;
    the average's standard error from the tasks' (independent questions): sqrt(Σ se²) / tasks."""
    cmd = ["xecomla", "-q", "eval", ckpt, "--json", "--no-kv", "--tasks", "default", "--limit", str(limit)]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    ppl = res["results"]["model"]["perplexity"]["ppl"]
    return {"lambada_ppl": ppl, **six_task(res), "eval_seconds": res["seconds"]}


def six_task(res: dict) -> dict:
    """The six-task average of an `xecomla eval --json` result, its standard error from the tasks'
    (independent questions: sqrt(Σ se²) / tasks) and the tasks' own values."""
    m = res["results"]["model"]
    tasks = {k: {"value": v[v["primary"]], "stderr": v.get(f"{v['primary']}_stderr"), "n": v.get("n")}
             for k, v in m["tasks"].items()}  # fmt: skip
    ses = [t["stderr"] or 0.0 for t in tasks.values()]
    return {
        "six_task_average": m["average"]["value"],
        "six_task_stderr": round(sum(x * x for x in ses) ** 0.5 / len(ses), 4),
        "tasks": tasks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--limit", type=int, default=50, help="questions per task")
    ap.add_argument("--no-eval", action="store_true", help="agreement and answers only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from xecomla_cli.sources import load_model

    teacher = load_model("demo")
    tok = teacher.tokenizer
    ref = greedy(teacher.model, tok, PROMPTS, 16)
    results = {"prompts": len(PROMPTS), "limit": args.limit, "load": os.getloadavg()[0], "runs": {}}
    results["teacher_readme"] = [
        tok.decode(x, skip_special_tokens=True) for x in greedy(teacher.model, tok, README_PROMPTS, 40)
    ]
    for ckpt in args.checkpoints:
        t0 = time.perf_counter()
        lm = load_model(ckpt)
        row = {"agreement": agreement(greedy(lm.model, tok, PROMPTS, 16), ref)}
        row["readme"] = [tok.decode(x, skip_special_tokens=True) for x in greedy(lm.model, tok, README_PROMPTS, 40)]
        meta = lm.meta or {}
        row["stage"] = meta.get("stage")
        del lm
        if not args.no_eval:
            row.update(run_eval(ckpt, args.limit))
        row["bench_seconds"] = round(time.perf_counter() - t0, 1)
        results["runs"][ckpt] = row
        print(json.dumps({ckpt: row}), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
