"""llama.cpp decode speed and KV cache of an MLA conversion against its original, both GGUF at the same weight type.

Exports the original (llama arch) and the conversion (deepseek2) with `xecomla export --format gguf`
(verified in llama.cpp; cached under --work), then runs the project's `llama-bench` (built by `make setup`)
on both in one run: token generation (tg, --tg tokens) after --depths tokens of context, for each
combination of --threads, --fa (flash attention 0/1) and --ctk (KV cache type, K and V alike). The KV cache size is
what llama.cpp reports when it allocates a context of depth + tg cells (`llama_kv_cache: size = ... MiB`).
Prints one JSON object (also saved under bench/results/ with date, machine and load) and a Markdown table.

    python bench/llama_bench.py --mla runs/g-init                        # depths 0,2K,8K,32K; f16; best settings
    python bench/llama_bench.py --mla runs/g-init --profile-depth 8192 --threads 1,2 --fa 0,1 --ctk f16,q8_0
    python bench/llama_bench.py --mla runs/g-init --outtype q8_0 --depths 0,8192
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xecomla_cli.export.gguf_export import export_gguf  # noqa: E402
from xecomla_cli.export.gguf_verify import run_llama_cpp  # noqa: E402
from xecomla_cli.export.llama_cpp_build import llama_cpp_tool  # noqa: E402

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x != ""]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def gguf_pair(args) -> dict[str, Path]:
    """The two GGUFs (exported once, verified in llama.cpp, reused while they exist)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, source in (("original", args.original), ("mla", args.mla)):
        path = work / f"{kind}-{Path(source).name}-{args.outtype}.gguf"
        if not path.exists():
            print(f"exporting {source} -> {path}", file=sys.stderr)
            result = export_gguf(source, path, outtype=args.outtype, pad_ranks=True)
            print("\n".join(result.summary_lines()), file=sys.stderr)
        paths[kind] = path
    return paths


def kv_mib(model: Path, cells: int, ctk: str, fa: int) -> float:
    """The KV cache llama.cpp allocates for a context of ``cells`` cells (from its log, via the verifier's child)."""
    request = {
        "texts": [],
        "special_texts": [],
        "prompts": [[0]],
        "greedy": [0],
        "new_tokens": 0,
        "threads": 1,
        "kv_type": GGML_TYPES[ctk],
        "n_ctx": cells,
        "flash_attn": fa,
    }
    return float(run_llama_cpp(model, request)["kv_mib"][0])


def llama_bench(paths: dict[str, Path], depths: list[int], args) -> tuple[list[dict], list[dict]]:
    """One llama-bench run per model and cache type (K and V of the same type: deepseek2's absorbed MLA
    reads V as a view of the K cache, and llama.cpp refuses a context whose -ctk and -ctv differ for it).
    Results stream as JSON lines, so a setting that fails leaves the others measured; it is recorded."""
    measured, failed = [], []
    for kind, path in paths.items():
        for ctk in args.ctk.split(","):
            cmd = [str(llama_cpp_tool("llama-bench")), "-m", str(path), "-p", "0", "-n", str(args.tg)]
            cmd += ["-d", ",".join(map(str, depths)), "-t", args.threads, "-fa", args.fa, "-ctk", ctk, "-ctv", ctk]
            cmd += ["-r", str(args.reps), "-o", "jsonl", "--progress"]
            print(" ".join(cmd), file=sys.stderr)
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)  # progress: stderr
            got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            measured += rows(got, kind)
            if done.returncode != 0:
                failed.append({"model": kind, "ctk": ctk, "returncode": done.returncode, "measured_before": len(got)})
                print(f"llama-bench failed ({done.returncode}) for {kind} with cache type {ctk}", file=sys.stderr)
    return measured, failed


def rows(results: list[dict], kind: str) -> list[dict]:
    return [
        {
            "model": kind,
            "depth": r["n_depth"],
            "threads": r["n_threads"],
            "fa": int(bool(r["flash_attn"])),
            "ctk": r["type_k"],
            "ctv": r["type_v"],
            "tok_s": r["avg_ts"],
            "tok_s_stddev": r["stddev_ts"],
        }
        for r in results
    ]


def table(measured: list[dict], kv: dict) -> list[dict]:
    """Per depth: the original's and the conversion's best tok/s (over the settings run), their ratio and KV MiB."""
    lines = []
    for depth in sorted({int(k.split("@")[1]) for k in kv}):
        best = {}
        for kind in ("original", "mla"):
            cands = [m for m in measured if m["model"] == kind and m["depth"] == depth]
            best[kind] = max(cands, key=lambda m: m["tok_s"]) if cands else None
        o, m = best["original"], best["mla"]
        ko, km = kv[f"original@{depth}"], kv[f"mla@{depth}"]
        timed = o is not None and m is not None
        lines.append(
            {
                "depth": depth,
                "original_tok_s": o["tok_s"] if timed else None,
                "mla_tok_s": m["tok_s"] if timed else None,
                "ratio": m["tok_s"] / o["tok_s"] if timed else None,
                "original_settings": f"t{o['threads']} fa{o['fa']} {o['ctk']}" if timed else "KV size only",
                "mla_settings": f"t{m['threads']} fa{m['fa']} {m['ctk']}" if timed else "KV size only",
                "original_kv_mib": ko,
                "mla_kv_mib": km,
                "kv_ratio": ko / km,
            }
        )
    return lines


def markdown(lines: list[dict]) -> str:
    head = (
        "| depth | original tok/s | MLA tok/s | ratio | original KV MiB | MLA KV MiB | KV ratio "
        "| settings (orig / MLA) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    return head + "".join(
        f"| {x['depth']} | {num(x['original_tok_s'], '.2f')} | {num(x['mla_tok_s'], '.2f')} | "
        f"{num(x['ratio'], '.2f')}x | "
        f"{x['original_kv_mib']:.2f} | {x['mla_kv_mib']:.2f} | {x['kv_ratio']:.2f}x | "
        f"{x['original_settings']} / {x['mla_settings']} |\n"
        for x in lines
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mla", required=True, help="MLA checkpoint (e.g. runs/g-init from init-svd --latent-norm)")
    ap.add_argument("--original", default="demo", help="the original model (default: demo)")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--depths", default="0,2048,8192,32768")
    ap.add_argument("--tg", type=int, default=32, help="generated tokens per measurement")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--fa", default="1", help="flash attention: 0, 1 or 0,1")
    ap.add_argument("--ctk", default="f16", help="KV cache type(s), K and V alike: f16, q8_0 or f16,q8_0")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--kv-depths", default="", help="depths whose KV size only is reported (no timing)")
    ap.add_argument("--profile-depth", type=int, default=None, help="only this depth (a settings sweep)")
    ap.add_argument("--work", default="runs/gguf-bench", help="where the two GGUFs are kept")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/llama_bench_<date>.json)")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()

    depths = [args.profile_depth] if args.profile_depth is not None else ints(args.depths)
    paths = gguf_pair(args)
    load_before = load()
    measured, failed = llama_bench(paths, depths, args)
    load_after = load()
    kv = {}
    for kind, path in paths.items():
        for depth in depths + ints(args.kv_depths):
            kv[f"{kind}@{depth}"] = kv_mib(path, depth + args.tg, args.ctk.split(",")[0], int(args.fa.split(",")[0]))
    lines = table(measured, kv)
    result = {
        "bench": "llama_bench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
        },
        "command": " ".join(sys.argv),
        "outtype": args.outtype,
        "tg": args.tg,
        "reps": args.reps,
        "kv_cache_type_for_mib": args.ctk.split(",")[0],
        "gguf": {k: str(p) for k, p in paths.items()},
        "measured": measured,
        "failed": failed,
        "kv_mib": kv,
        "table": lines,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"llama_bench_{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(lines), file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
