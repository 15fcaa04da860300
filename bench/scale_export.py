"""Wall time, CPU time and peak RSS of `xecomla inspect` and `xecomla export` (hf, gguf) on large random models
(``bench/scale_checkpoint.py``), for one source tree, under ``/usr/bin/time -v``; one JSON line per run.

    python bench/scale_export.py --tree /path/to/worktree --label after --model /work/scale-export/l16 \\
        --runs inspect export gguf >> results.jsonl

Each run writes into a fresh temporary directory beside the model (removed after). The exit status and the
command's last stderr line (a refusal, say) are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "inspect": lambda m, out: ["inspect", str(m / "hf"), "--json"],
    "export": lambda m, out: ["export", str(m / "ckpt"), "-o", str(out / "hf")],
    "export-no-verify": lambda m, out: ["export", str(m / "ckpt"), "-o", str(out / "hf"), "--no-verify"],
    "gguf": lambda m, out: [
        "export",
        str(m / "ckpt"),
        "--format",
        "gguf",
        "--outtype",
        "bf16",
        "-o",
        str(out / "m.gguf"),
    ],
    "gguf-no-verify": lambda m, out: [
        *["export", str(m / "ckpt"), "--format", "gguf", "--outtype", "bf16", "-o", str(out / "m.gguf")],
        "--no-verify",
    ],
}


def measure(tree: Path, model: Path, run: str, python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-export-", dir=model) as tmp:
        cmd = ["/usr/bin/time", "-v", python, "-m", "xecomla_cli", *RUNS[run](model, Path(tmp))]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    err = proc.stderr

    def field(name: str) -> str:
        found = re.search(rf"{re.escape(name)}: (.+)", err)
        return found.group(1).strip() if found else ""

    h, m_, s = ([0, 0, *field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")])[-3:]
    skip = ("\t", "Command exited", "Command being timed")
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(skip)]
    return {
        "run": run,
        "model": str(model),
        "exit": int(field("Exit status") or proc.returncode),
        "wall_s": round(int(h) * 3600 + int(m_) * 60 + float(s), 1),
        "cpu_s": round(float(field("User time (seconds)") or 0) + float(field("System time (seconds)") or 0), 1),
        "peak_rss_gb": round(int(field("Maximum resident set size (kbytes)") or 0) / 1024**2, 2),
        "output_bytes": size,
        "last_line": lines[-1][:300] if lines else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, required=True, help="the source tree whose xecomla_cli runs")
    ap.add_argument("--label", required=True)
    ap.add_argument("--model", type=Path, action="append", required=True, help="a scale_checkpoint.py directory")
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["inspect", "export", "gguf"])
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    if not shutil.which("/usr/bin/time"):
        raise SystemExit("needs GNU time at /usr/bin/time")
    for model in args.model:
        for run in args.runs:
            row = {"label": args.label, **measure(args.tree, model.resolve(), run, args.python)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
