#!/usr/bin/env python
"""The table of ``bench/init_recipe.sh`` runs: per METHOD-rRANK-CALIB, LAMBADA perplexity before and
after the 8k-token local distillation, the init time and the local step's validation perplexity.

    python bench/init_recipe_table.py runs/recipes [--markdown FILE] > bench/results/init_recipes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def ppl(path: Path) -> float | None:
    if not path.is_file() or not path.stat().st_size:
        return None
    return json.loads(path.read_text())["results"]["model"]["perplexity"]["ppl"]


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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--markdown", type=Path)
    opts = ap.parse_args()
    inits = [p for p in opts.out.iterdir() if (p / "xecomla.json").is_file() and not p.name.endswith("-local")]
    names = sorted(p.name for p in inits)
    rows = [row(opts.out, n) for n in names]
    rows.sort(key=lambda r: (-r["compression"], r["calibration"] or "", r["method"]))
    json.dump({"rows": rows}, sys.stdout, indent=1)
    print()
    lines = [
        "| budget | method | calibration | init s (busy) | ppl | ppl after 8k local |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:,.1f}"  # noqa: E731
        lines.append(
            f"| {r['compression']:.0f}x (r={r['kv_rank']}, p={r['rope_dim']}) | {r['method']} | {r['calibration']} "
            f"| {fmt(r['init_seconds'])} | {fmt(r['ppl'])} | {fmt(r['ppl_after_local'])} |"
        )
    table = "\n".join(lines) + "\n"
    print(table, file=sys.stderr)
    if opts.markdown:
        opts.markdown.write_text(table)


if __name__ == "__main__":
    main()
