#!/usr/bin/env python
"""The latent RMSNorm at init and after the same distillation: no norm (``--no-latent-norm``, exported
with the bias emulation that only transformers reads), the plain norm (γ = 1: what ``--latent-norm``
did before the norm channel) and the norm channel (``init.latent_norm``, the default).

    python bench/latent_norm.py                                    # deepseek and transmla at 4x, 8k local step
    python bench/latent_norm.py --methods deepseek --distill-tokens 0 --no-errors

Per method: the init's held-out perplexity (``eval --seq-len 512``, 8,192 LAMBADA tokens) for each
latent, the per-layer relative error of the normed latent path against the un-normed one
(sqrt(Σ‖U(ĉ − c)‖² / Σ‖U c‖²) over the same down/up projections, ``init.latent_norm.normed_latent_error``)
on the calibration inputs (Shakespeare, as init-svd) and on held-out inputs (LAMBADA passages, BOS +
63 tokens, as eval sees them), and after the same distillation (``--distill-args``, default the
8k-token local step of the methods table) the perplexity of no norm against the norm channel.

Every step runs the ``xecomla`` CLI as a user would, except the plain-norm checkpoint, which is the
no-norm checkpoint with a unit latent norm added (exactly what ``--latent-norm`` wrote before).
Results are cached under ``--out``. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from init_methods import xecomla  # bench/: run the CLI, stdout back, a failed command stops the run


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def init(method: str, out: Path, opts, *extra: str) -> Path:
    if not (out / "xecomla.json").exists():
        args = ["--quiet", "init-svd", opts.source, "--kv-rank", str(opts.kv_rank), "--method", method]
        xecomla(*args, *extra, "-o", str(out), "--force")
    return out


def plain_norm(no_norm: Path, out: Path) -> Path:
    """The no-norm checkpoint with a unit latent norm on all r channels (the former ``--latent-norm``)."""
    if (out / "xecomla.json").exists():
        return out
    from xecomla_cli.checkpoint import load_checkpoint, save_checkpoint
    from xecomla_cli.mla.attention import LatentRMSNorm
    from xecomla_cli.mla.rebuild import decoder_layers

    loaded = load_checkpoint(no_norm)
    spec = loaded.spec
    spec.latent_norm = True
    for i in spec.converted_layers:
        attn = decoder_layers(loaded.model)[i].self_attn
        attn.kv_a_layernorm = LatentRMSNorm(attn.kv_rank)
    save_checkpoint(
        out,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        stage="init-svd",
        spec=spec,
        source=loaded.source,
        parent=str(no_norm),
        metrics={},
        force=True,
    )
    return out


def evaluate(ckpt: Path, opts) -> float:
    cache = ckpt.parent / f"{ckpt.name}.eval-s{opts.seq_len}-t{opts.ppl_tokens}.json"
    if not cache.exists():
        args = ["--quiet", "eval", str(ckpt), "--json", "--no-kv", "--seq-len", str(opts.seq_len)]
        cache.write_text(xecomla(*args, "--ppl-tokens", str(opts.ppl_tokens)))
    return json.loads(cache.read_text())["results"]["model"]["perplexity"]["ppl"]


def distill(ckpt: Path, opts) -> Path:
    out = ckpt.parent / f"{ckpt.name}-distill-{opts.distill_tokens}"
    if not (out / "xecomla.json").exists():
        xecomla("--quiet", "distill", str(ckpt), "--tokens", opts.distill_tokens, *opts.distill_args.split(),
                "-o", str(out), "--force")  # fmt: skip
        shutil.rmtree(out.parent / f"{out.name}.run", ignore_errors=True)
    return out


def layer_inputs(opts) -> dict[str, list]:
    """Per layer, the original model's attention inputs on calibration and held-out tokens."""
    import torch

    from xecomla_cli.evaluate.scoring import encode, prefix_token_id
    from xecomla_cli.evaluate.tasks import lambada_passages
    from xecomla_cli.layerwise import LayerRunner
    from xecomla_cli.mla.rebuild import decoder_layers
    from xecomla_cli.sources import load_model
    from xecomla_cli.text.calibration import DEFAULT_CALIB_TOKENS, calibration_ids

    orig = load_model(opts.source, dtype="float32", device="cpu")
    tok = orig.tokenizer
    seqs = [[prefix_token_id(tok)] + encode(tok, d)[:63] for d in lambada_passages()]
    held = torch.tensor([s for s in seqs if len(s) == 64][:64])
    out = {}
    for name, ids in (("calibration", calibration_ids(tok, None, DEFAULT_CALIB_TOKENS)), ("held_out", held)):
        runner = LayerRunner(orig.model, ids)
        xs = []
        for i, layer in enumerate(decoder_layers(orig.model)):
            xs.append(torch.cat([layer.input_layernorm(c.h) for c in runner.chunks]).half())  # (B, T, d)
            if i + 1 < len(runner.layers):
                runner.advance(i)
        out[name] = xs
    return out


def layer_errors(ckpt: Path, inputs: dict[str, list]) -> dict[str, list[float]]:
    """Per layer: the normed latent's relative error on each input set, and on held-out first tokens."""
    from xecomla_cli.checkpoint import load_checkpoint
    from xecomla_cli.init.latent_norm import normed_latent_error
    from xecomla_cli.mla.rebuild import decoder_layers

    layers = decoder_layers(load_checkpoint(ckpt).model)
    res = {name: [round(normed_latent_error(layers[i].self_attn, x.float()), 5) for i, x in enumerate(xs)]
           for name, xs in inputs.items()}  # fmt: skip
    res["held_out_first_token"] = [
        round(normed_latent_error(layers[i].self_attn, x[:, 0].float()), 5) for i, x in enumerate(inputs["held_out"])
    ]
    return res


def summary(errors: list[float]) -> dict[str, float]:
    return {"mean": round(sum(errors) / len(errors), 5), "max": max(errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="demo")
    ap.add_argument("--methods", default="deepseek,transmla")
    ap.add_argument("--kv-rank", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512, help="eval --seq-len")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--distill-tokens", default="8k", help="0: no distillation")
    ap.add_argument("--distill-args", default="--local --data teacher --local-inputs student --seq-len 512 "
                    "--batch-size 4")  # fmt: skip
    ap.add_argument("--distill-methods", help="distil only these methods (default: every one)")
    ap.add_argument("--no-errors", action="store_true", help="skip the per-layer errors")
    ap.add_argument("--out", type=Path, default=Path("runs/latent-norm"))
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "load_start": load(),
              "source": opts.source, "kv_rank": opts.kv_rank, "eval": f"--seq-len {opts.seq_len}, "
              f"{opts.ppl_tokens} LAMBADA tokens", "distill": f"--tokens {opts.distill_tokens} {opts.distill_args}",
              "methods": {}}  # fmt: skip
    ckpts = {}
    for method in opts.methods.split(","):  # inits and their perplexity first, then training
        t0 = time.perf_counter()
        none = init(method, opts.out / f"{method}-none", opts, "--no-latent-norm")
        chan = init(method, opts.out / f"{method}-channel", opts)
        plain = plain_norm(none, opts.out / f"{method}-plain")
        ckpts[method] = {"no_norm": none, "plain_norm": plain, "norm_channel": chan}
        row = {k: {"init_ppl": evaluate(c, opts)} for k, c in ckpts[method].items()}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["methods"][method] = row
        print(json.dumps({method: row}), file=sys.stderr, flush=True)
    if not opts.no_errors:
        inputs = None
        for method, row in report["methods"].items():
            for k in ("plain_norm", "norm_channel"):
                cache = ckpts[method][k].parent / f"{ckpts[method][k].name}.layer-errors.json"
                if not cache.exists():
                    inputs = inputs or layer_inputs(opts)
                    cache.write_text(json.dumps(layer_errors(ckpts[method][k], inputs)) + "\n")
                errs = json.loads(cache.read_text())
                row[k]["layer_error"] = errs
                row[k]["layer_error_summary"] = {name: summary(e) for name, e in errs.items()}
    if opts.distill_tokens not in ("0", ""):
        chosen = opts.distill_methods.split(",") if opts.distill_methods else list(report["methods"])
        for method, row in report["methods"].items():
            if method not in chosen:
                continue
            for k in ("no_norm", "norm_channel"):
                t0 = time.perf_counter()
                row[k]["distilled_ppl"] = evaluate(distill(ckpts[method][k], opts), opts)
                row[k]["distill_seconds"] = round(time.perf_counter() - t0, 1)
            a, b = row["norm_channel"]["distilled_ppl"], row["no_norm"]["distilled_ppl"]
            row["distilled_ratio_channel_over_no_norm"] = round(a / b, 4)
            print(json.dumps({method: row["distilled_ratio_channel_over_no_norm"]}), file=sys.stderr, flush=True)
    report["load_end"] = load()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
