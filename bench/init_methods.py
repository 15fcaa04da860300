#!/usr/bin/env python
"""Initialisation methods compared on one model: perplexity and zero-shot average before and
after the same distillation budget, against the original model and the paper's init.

    python bench/init_methods.py                               # demo model, 4x and 8x, six tasks
    python bench/init_methods.py --budgets 64:32 --methods paper,best --distill-tokens 0

Every step runs the `xecomla` CLI exactly as a user would (init-svd, eval --json, distill), so
the numbers are those of the commands. Results are cached under ``--out`` (a step whose output
exists is not run again), which makes a long comparison resumable. Prints one JSON object on
stdout (each row, and each method's perplexity increase over the original relative to the
paper init's at the same budget and stage); ``--markdown FILE`` also writes the README table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_METHODS = "paper,mha2mla,rorope,complex,whiten,best,deepseek"
SIX_TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa"


def xecomla(*args: str) -> str:
    """Run the CLI (same interpreter), return stdout; stderr (progress, tables) passes through."""
    exe = Path(sys.executable).with_name("xecomla")
    cmd = [str(exe) if exe.exists() else "xecomla", *args]
    print("$ xecomla " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}): xecomla {' '.join(args)}")
    return done.stdout


def evaluate(model: str, cache: Path, opts: argparse.Namespace) -> dict:
    """eval --json of a model, cached in ``cache``: perplexity, six-task average, cache bytes."""
    if not cache.exists():
        args = ["eval", model, "--json", "--tasks", opts.tasks, "--limit", str(opts.limit),
                "--ppl-tokens", str(opts.ppl_tokens)]  # fmt: skip
        result = json.loads(xecomla(*args))
        cache.write_text(json.dumps(result, indent=2) + "\n")
    res = json.loads(cache.read_text())["results"]["model"]
    return {
        "ppl": res["perplexity"]["ppl"],
        "avg": res["average"]["value"],
        "tasks": {k: v[v["primary"]] for k, v in res["tasks"].items()},
        "kv_bytes_per_token": res["kv_cache"]["bytes_per_token"],
    }


def init(method: str, rank: int, rope: int, out: Path) -> float:
    """init-svd with a method; returns the command's wall-clock seconds (model load included), cached beside it."""
    if not (out / "xecomla.json").exists():
        t0 = time.perf_counter()
        xecomla("--quiet", "init-svd", OPTS.source, "--kv-rank", str(rank), "--rope-dim", str(rope), "--method", method,
                "-o", str(out), "--force")  # fmt: skip
        (out.parent / f"{out.name}.seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return float((out.parent / f"{out.name}.seconds").read_text())


def distill(ckpt: Path, tokens: str) -> Path:
    out = ckpt.parent / f"{ckpt.name}-distill-{tokens}"
    if not (out / "xecomla.json").exists():
        xecomla("--quiet", "distill", str(ckpt), "--tokens", tokens, "--seq-len", str(OPTS.seq_len),
                "--batch-size", str(OPTS.batch_size), "-o", str(out), "--force")  # fmt: skip
        shutil.rmtree(out.parent / f"{out.name}.run", ignore_errors=True)  # resumable state, not needed
    return out


def markdown(rows: list[dict], original: dict, opts: argparse.Namespace) -> str:
    """The README table: one row per budget and method, the original first."""
    trained = opts.distill_tokens not in ("0", "")
    cols = ["budget", "method", "init s", "ppl", "avg"]
    cols += [f"ppl after {opts.distill_tokens}", f"avg after {opts.distill_tokens}"] if trained else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cells = ["—", "original", "—", f"{original['ppl']:.2f}", f"{original['avg']:.4f}"]
    cells += ["", ""] if trained else []
    lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["budget"], r["method"], f"{r['init_seconds']:.0f}", f"{r['ppl']:,.1f}", f"{r['avg']:.4f}"]
        if trained:
            d = r.get("distilled")
            cells += [f"{d['ppl']:,.1f}", f"{d['avg']:.4f}"] if d else ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    global OPTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="demo")
    ap.add_argument("--budgets", default="64:32,32:16", help="kv_rank:rope_dim pairs")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--tasks", default=SIX_TASKS)
    ap.add_argument("--limit", type=int, default=100, help="questions per task")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--distill-tokens", default="16k", help="distillation budget per method (0: none)")
    ap.add_argument("--distill-methods", help="distil only these methods (default: all)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/init-methods"))
    ap.add_argument("--markdown", type=Path)
    OPTS = opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)

    original = evaluate(opts.source, opts.out / "original.eval.json", opts)
    rows, ckpts = [], []
    for budget in opts.budgets.split(","):  # before training: every init first
        rank, rope = (int(x) for x in budget.split(":"))
        for method in opts.methods.split(","):
            ckpt = opts.out / f"{method.replace('+', '-')}-r{rank}-p{rope}"
            seconds = init(method, rank, rope, ckpt)
            rows.append({"budget": f"r={rank}, p={rope}", "method": method, "init_seconds": seconds,
                         **evaluate(str(ckpt), opts.out / f"{ckpt.name}.eval.json", opts)})  # fmt: skip
            ckpts.append(ckpt)
    if opts.distill_tokens not in ("0", ""):  # then the same distillation budget for each
        wanted = opts.distill_methods.split(",") if opts.distill_methods else None
        for row, ckpt in zip(rows, ckpts):
            if wanted is not None and row["method"] not in wanted:
                continue
            d = distill(ckpt, opts.distill_tokens)
            row["distilled"] = evaluate(str(d), opts.out / f"{d.name}.eval.json", opts)

    def increase(row: dict, stage: str | None) -> float:
        ppl = row[stage]["ppl"] if stage else row["ppl"]
        return ppl - original["ppl"]

    for row in rows:
        paper = next((r for r in rows if r["budget"] == row["budget"] and r["method"] == "paper"), None)
        if paper is not None:
            row["ppl_increase_vs_paper"] = increase(row, None) / increase(paper, None)
            if "distilled" in row and "distilled" in paper:
                row["distilled"]["ppl_increase_vs_paper"] = increase(row, "distilled") / increase(paper, "distilled")
    report = {"source": opts.source, "tasks": opts.tasks, "limit": opts.limit, "ppl_tokens": opts.ppl_tokens,
              "distill_tokens": opts.distill_tokens, "original": original, "rows": rows}  # fmt: skip
    print(json.dumps(report, indent=2))
    table = markdown(rows, original, opts)
    print(table, file=sys.stderr)
    if opts.markdown:
        opts.markdown.write_text(table)


OPTS: argparse.Namespace

if __name__ == "__main__":
    main()
