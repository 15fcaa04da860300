#!/usr/bin/env python
"""The table of ``bench/init_recipe.sh`` runs: per METHOD-rRANK-CALIB, LAMBADA perplexity before and
after the 8k-token local distillation, the init time and the local step's validation perplexity;
for ``RECIPE=demo`` runs, LAMBADA after make demo's local step and after its KD step, and the
six-task average after KD (with its standard error) where it was measured.

    python bench/init_recipe_table.py runs/recipes [--markdown FILE] > bench/results/init_recipes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("-local", "-demo-local", "-demo-kd")  # checkpoints made from an init, by suffix


def ppl(path: Path) -> float | None:
    if not path.is_file() or not path.stat().st_size:
        return None
    return json.loads(path.read_text())["results"]["model"]["perplexity"]["ppl"]


def six_task(path: Path) -> dict | None:
    """The six-task average after KD (`xecomla eval --json --tasks default`), its standard error and
    the questions per task, where measured."""
    if not path.is_file() or not path.stat().st_size:
        return None
    from after_kd import six_task as summary  # bench/after_kd.py, beside this script

    got = summary(json.loads(path.read_text()))
    return {
        "average": got["six_task_average"],
        "stderr": got["six_task_stderr"],
        "limit": min(t["n"] or 0 for t in got["tasks"].values()),
    }


def row(out: Path, name: str) -> dict:
    meta = json.loads((out / name / "xecomla.json").read_text())
    local = out / f"{name}-local" / "xecomla.json"
    lm = json.loads(local.read_text())["metrics"] if local.is_file() else {}
    mla = meta["mla"]
    return {
        "name": name,
        "method": mla["method"],
        "kv_rank": round(sum(r for r in mla["kv_ranks"] if r) / sum(1 for r in mla["kv_ranks"] if r)),  # mean
        "rope_dim": mla["rope_dim"],
        "compression": mla["cache_values_per_token"]["compression"],
        "calibration": mla.get("calibration", {}).get("data"),
        "fold": (mla.get("freqfold") or {}).get("fold"),
        "init_seconds": meta["metrics"].get("init_seconds"),
        "ppl": ppl(out / f"{name}.eval.json"),
        "ppl_after_local": ppl(out / f"{name}-local.eval.json"),
        "local_val_ppl": [lm.get("val_ppl_initial"), lm.get("val_ppl")] if lm else None,
        "local_layers_kept": lm.get("local_layers_kept"),
        "ppl_after_demo_local": ppl(out / f"{name}-demo-local.eval.json"),
        "ppl_after_demo_kd": ppl(out / f"{name}-demo-kd.eval.json"),
        "six_task_after_demo_kd": six_task(out / f"{name}-demo-kd.tasks.json"),
    }


def markdown(rows: list[dict]) -> str:
    fmt = lambda v: "—" if v is None else f"{v:,.1f}"  # noqa: E731
    budget = lambda r: f"{r['compression']:.0f}x (r={r['kv_rank']}, p={r['rope_dim']})"  # noqa: E731
    lines = []
    local = [r for r in rows if r["ppl_after_local"] is not None or r["ppl_after_demo_local"] is None]
    if local:
        lines += [
            "| budget | method | calibration | init s (busy) | ppl | ppl after 8k local |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {budget(r)} | {r['method']} | {r['calibration']} | {fmt(r['init_seconds'])} | {fmt(r['ppl'])} "
            f"| {fmt(r['ppl_after_local'])} |"
            for r in local
        ]
    demo = [r for r in rows if r["ppl_after_demo_local"] is not None]
    if demo:
        lines += [
            "" if lines else None,
            "| budget | method | calibration | ppl at init | after make demo's local step | after its KD step "
            "| six-task after KD |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for r in demo:
            t = r["six_task_after_demo_kd"]
            tasks = "—" if t is None else f"{t['average']:.3f} ± {t['stderr']:.3f} ({t['limit']} q)"
            lines.append(
                f"| {budget(r)} | {r['method']} | {r['calibration']} | {fmt(r['ppl'])} "
                f"| {fmt(r['ppl_after_demo_local'])} | {fmt(r['ppl_after_demo_kd'])} | {tasks} |"
            )
    return "\n".join(x for x in lines if x is not None) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--markdown", type=Path)
    opts = ap.parse_args()
    inits = [p for p in opts.out.iterdir() if (p / "xecomla.json").is_file() and not p.name.endswith(STAGES)]
    rows = [row(opts.out, n) for n in sorted(p.name for p in inits)]
    rows.sort(key=lambda r: (-r["compression"], r["calibration"] or "", r["method"]))
    json.dump({"rows": rows}, sys.stdout, indent=1)
    print()
    table = markdown(rows)
    print(table, file=sys.stderr)
    if opts.markdown:
        opts.markdown.write_text(table)


if __name__ == "__main__":
    main()
