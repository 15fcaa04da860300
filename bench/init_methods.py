#!/usr/bin/env python
"""Initialisation methods side by side on one model, at the same KV cache budgets: ours, the
paper's and the peers' (TransMLA, MHA2MLA) -- perplexity and zero-shot average before and after
the same distillation, and each init's wall-clock time.

    python bench/init_methods.py                                  # the docs/results/2026-12-02-* table
    python bench/init_methods.py --budgets 96 --methods paper,transmla --distill-tokens 0 --tasks ''
    python bench/init_methods.py --tasks '' --distill-args "--local --data teacher"   # local distillation

A budget is the cached values per token per layer, V = r + p (demo: 96 = 4x, 48 = 8x; or r:p).
Each method entry is an ``init-svd --method`` string; its split of V follows its layout:

* one shared RoPE key (paper, transmla, deepseek, best, ...): p = V/3 rounded to even, r = V - p
  (96 -> r = 64, p = 32; with ``r:p`` exactly those);
* per-group RoPE slices (mha2mla, ...+group-rope): p = G·p_g with p ~ V/4 (a multiple of 2G),
  r = V - p (96 -> r = 72, p = 24 on the demo's G = 3); ``METHOD@F`` sets that share F of V
  instead (e.g. ``best+group-rope@1/2``: 96 -> r = 48, p = 48).

Every step runs the `xecomla` CLI exactly as a user would (inspect, init-svd, eval --json,
distill), so the numbers are those of the commands. Results are cached under ``--out`` (a step
whose output exists is not run again; eval results are keyed by their settings), which makes a
long comparison resumable; ``--cached-only`` runs nothing and reports what is there (a cell not
measured yet shows —), a look at the table while the comparison runs. Prints one JSON object on
stdout (each row, the perplexity increase over the original relative to the paper init's, and the
headline: our best against the best peer at each budget and stage); ``--markdown FILE`` also
writes the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

DEFAULT_METHODS = "paper,mha2mla,transmla,deepseek,best,best+group-rope"
PEERS = ("mha2mla", "transmla")  # the peers' presets; "paper" is the baseline, everything else ours
SIX_TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa"
GROUP_SHARE = Fraction(1, 4)  # default RoPE share of the budget with per-group slices


def xecomla(*args: str) -> str:
    """Run the CLI (same interpreter), return stdout; stderr (progress, tables) passes through."""
    exe = Path(sys.executable).with_name("xecomla")
    cmd = [str(exe) if exe.exists() else "xecomla", *args]
    print("$ xecomla " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"command failed ({done.returncode}): xecomla {' '.join(args)}")
    return done.stdout


def kv_heads(opts: argparse.Namespace) -> int:
    """G of the source model (``xecomla inspect --json``, cached)."""
    cache = opts.out / "inspect.json"
    if not cache.exists():
        cache.write_text(xecomla("--quiet", "inspect", opts.source, "--json"))
    return json.loads(cache.read_text())["architecture"]["num_kv_heads"]


def split(entry: str, budget: str, G: int) -> tuple[str, int, int]:
    """(method, r, p) of a method entry at a budget 'V' or 'r:p' (see the module docstring)."""
    method, _, share = entry.partition("@")
    r, _, p = budget.partition(":")
    V = int(r) + int(p or 0)
    grouped = method == "mha2mla" or "group-rope" in method.split("+")
    if not grouped:
        rope = int(p) if p else round(V / 3 / 2) * 2
        return method, V - rope, rope
    step = 2 * G
    rope = max(int(V * Fraction(share or GROUP_SHARE)) // step * step, step)
    return method, V - rope, rope


def eval_key(opts: argparse.Namespace) -> str:
    """The eval settings, part of every eval cache file name."""
    tasks = "none" if not opts.tasks else "six" if opts.tasks == SIX_TASKS else opts.tasks.replace(",", "-")
    return f"{tasks}-l{opts.limit}-ppl{opts.ppl_tokens}"


def evaluate(model: str, name: str, opts: argparse.Namespace) -> dict | None:
    """eval --json of a model, cached: perplexity, zero-shot average (None without tasks), cache
    bytes; None when not cached and ``--cached-only``."""
    cache = opts.out / f"{name}.eval-{eval_key(opts)}.json"
    if not cache.exists() and opts.cached_only:
        return None
    if not cache.exists():
        args = ["eval", model, "--json", "--ppl-tokens", str(opts.ppl_tokens)]
        if opts.tasks:
            args += ["--tasks", opts.tasks, "--limit", str(opts.limit)]
        cache.write_text(json.dumps(json.loads(xecomla(*args)), indent=2) + "\n")
    res = json.loads(cache.read_text())["results"]["model"]
    tasks = res.get("tasks") or {}
    return {
        "ppl": res["perplexity"]["ppl"],
        "avg": res["average"]["value"] if tasks else None,
        "tasks": {k: v[v["primary"]] for k, v in tasks.items()},
        "kv_bytes_per_token": res["kv_cache"]["bytes_per_token"],
    }


def init(method: str, rank: int, rope: int, out: Path, opts: argparse.Namespace) -> float | None:
    """init-svd with a method; returns the command's wall-clock seconds (model load included),
    cached beside it; None when not cached and ``--cached-only``."""
    seconds = out.parent / f"{out.name}.seconds"
    if opts.cached_only and not seconds.exists():
        return None
    if not (out / "xecomla.json").exists():
        t0 = time.perf_counter()
        args = ["--quiet", "init-svd", opts.source, "--kv-rank", str(rank), "--rope-dim", str(rope)]
        xecomla(*args, "--method", method, "-o", str(out), "--force")
        seconds.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return float(seconds.read_text())


def distill_dir(ckpt: Path, opts: argparse.Namespace) -> Path:
    tag = "-local" if "--local" in opts.distill_args.split() else ""
    return ckpt.parent / f"{ckpt.name}-distill{tag}-{opts.distill_tokens}"


def distill(ckpt: Path, opts: argparse.Namespace) -> Path | None:
    extra = opts.distill_args.split()
    out = distill_dir(ckpt, opts)
    if opts.cached_only and not (out / "xecomla.json").exists():
        return None
    if not (out / "xecomla.json").exists():
        args = ["--quiet", "distill", str(ckpt), "--tokens", opts.distill_tokens, "--seq-len", str(opts.seq_len)]
        xecomla(*args, "--batch-size", str(opts.batch_size), *extra, "-o", str(out), "--force")
        shutil.rmtree(out.parent / f"{out.name}.run", ignore_errors=True)  # resumable state, not needed
    return out


UNMEASURED = {"ppl": None, "avg": None}  # a result not cached yet (--cached-only)


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(rows: list[dict], original: dict, opts: argparse.Namespace) -> str:
    """The docs table: one row per budget and method, the original first."""
    trained = opts.distill_tokens not in ("0", "")
    cols = ["budget", "method", "r", "p", "init s", "ppl", "avg"]
    after = f"{opts.distill_tokens} {'local' if '--local' in opts.distill_args else 'KD'}"
    cols += [f"ppl after {after}", f"avg after {after}"] if trained else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cells = ["—", "original", "—", "—", "—", fmt(original["ppl"], ".2f"), fmt(original["avg"], ".4f")]
    lines.append("| " + " | ".join(cells + ["", ""] * trained) + " |")
    for r in rows:
        cells = [r["budget"], r["entry"], str(r["r"]), str(r["p"]), f"{r['init_seconds']:.0f}"]
        cells += [fmt(r["ppl"], ",.1f"), fmt(r["avg"], ".4f")]
        if trained:
            d = r.get("distilled") or UNMEASURED
            cells += [fmt(d["ppl"], ",.1f"), fmt(d["avg"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(rows: list[dict], original: dict) -> dict:
    """Per budget and stage: each row's ppl increase relative to the paper init's, and our best
    preset (lowest ppl) against the best peer preset."""
    headline = {}
    for row in rows:
        for stage in ("init", "distilled"):
            res = row if stage == "init" else row.get("distilled")
            paper = next((r for r in rows if r["budget"] == row["budget"] and r["entry"] == "paper"), None)
            ref = None if paper is None else paper if stage == "init" else paper.get("distilled")
            if res is None or res["ppl"] is None:
                continue
            if ref is not None and ref["ppl"] is not None and original["ppl"] is not None:
                res["ppl_increase_vs_paper"] = (res["ppl"] - original["ppl"]) / (ref["ppl"] - original["ppl"])
            side = "peer" if row["entry"].split("@")[0] in PEERS else None if row["entry"] == "paper" else "ours"
            if side:
                key = f"{row['budget']} {stage}"
                best = headline.setdefault(key, {}).get(side)
                if best is None or res["ppl"] < best["ppl"]:
                    headline[key][side] = {"entry": row["entry"], "ppl": res["ppl"], "avg": res["avg"]}
    return headline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="demo")
    ap.add_argument("--budgets", default="96,48", help="cached values per token per layer: V or r:p, comma-separated")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="init-svd --method strings, optionally METHOD@F")
    ap.add_argument("--tasks", default=SIX_TASKS, help="zero-shot tasks ('' for perplexity only)")
    ap.add_argument("--limit", type=int, default=500, help="questions per task")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--distill-tokens", default="16k", help="distillation budget per method (0: none)")
    ap.add_argument("--distill-methods", help="distil only these entries (default: all)")
    ap.add_argument("--distill-budgets", help="distil only at these budgets, e.g. 96 (default: all)")
    ap.add_argument("--distill-args", default="", help="more distill options, e.g. '--local --data teacher'")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/init-methods"))
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--cached-only", action="store_true", help="run nothing: report what --out holds")
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)

    G = kv_heads(opts) if any(e == "mha2mla" or "group-rope" in e for e in opts.methods.split(",")) else 1
    original = evaluate(opts.source, "original", opts) or UNMEASURED
    rows, ckpts = [], []
    for budget in opts.budgets.split(","):  # before training: every init first
        for entry in opts.methods.split(","):
            method, rank, rope = split(entry, budget, G)
            ckpt = opts.out / f"{method.replace('+', '-')}-r{rank}-p{rope}"
            seconds = init(method, rank, rope, ckpt, opts)
            if seconds is None:  # --cached-only and not initialised yet
                continue
            row = {"budget": f"{rank + rope}", "entry": entry, "method": method, "r": rank, "p": rope}
            rows.append({**row, "init_seconds": seconds, **(evaluate(str(ckpt), ckpt.name, opts) or UNMEASURED)})
            ckpts.append(ckpt)
    if opts.distill_tokens not in ("0", ""):  # then the same distillation budget for each
        wanted = opts.distill_methods.split(",") if opts.distill_methods else None
        budgets = opts.distill_budgets.split(",") if opts.distill_budgets else None
        for row, ckpt in zip(rows, ckpts, strict=True):
            chosen = (wanted is None or row["entry"] in wanted) and (budgets is None or row["budget"] in budgets)
            if chosen or (distill_dir(ckpt, opts) / "xecomla.json").exists():  # done earlier: reported too
                d = distill(ckpt, opts)
                if d is not None:
                    row["distilled"] = evaluate(str(d), d.name, opts) or UNMEASURED
    headline = compare(rows, original)
    report = {
        "source": opts.source,
        "tasks": opts.tasks,
        "limit": opts.limit,
        "ppl_tokens": opts.ppl_tokens,
        "distill_tokens": opts.distill_tokens,
        "distill_args": opts.distill_args,
        "original": original,
        "rows": rows,
        "headline": headline,
    }
    print(json.dumps(report, indent=2))
    table = markdown(rows, original, opts)
    print(table, file=sys.stderr)
    if opts.markdown:
        opts.markdown.write_text(table)


if __name__ == "__main__":
    main()
