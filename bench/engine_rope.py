#!/usr/bin/env python
"""What the engine-exact constructions cost, per layer (issue #35; ``init.engine_ready``).

    python bench/engine_rope.py llama-3.2-1b            # Llama-3.2-1B's attention shape and llama3 RoPE, random weights
    python bench/engine_rope.py qwen2.5-0.5b            # Qwen2.5-0.5B's shape (biases), random weights
    python bench/engine_rope.py demo --ckpt A --ckpt B  # trained checkpoints of the demo against the demo
    python bench/engine_rope.py demo-qwen2              # the demo's weights with Qwen2-style biases: keep vs fold

For a shape, the model is built with that model's real per-layer sizes and RoPE (hidden, heads, KV
heads, head dim, rope_theta, llama3 factors, biases), random weights (std 0.02 as the config
initialises; biases, which it sets to zero, N(0, 0.1²)), ``--layers``
layers and a small vocabulary (the embeddings do not change the attention's arithmetic). Each
variant converts a copy with TransMLA's method at its smallest fold (``freqfold-c+bkv``, c = 2K/p) and
the latent norm, calibrated on random ids;
the relative error of every layer's attention output against the original layer is then measured on
held-out ids of ``--eval-len`` positions (the original model's inputs to every layer: teacher
inputs), at full rank (the RoPE/bias construction alone) and at ``--kv-ranks``.

Variants (llama3 sources): ``source`` (the source's scaled frequencies: exact in transformers only),
``default`` (default RoPE, TransMLA's fold over the unscaled pairs: init-svd's default), and
``default-all`` (default RoPE on every pair, the scaled ones at their unscaled frequencies). Biased
sources: ``keep`` (exact biases) against ``fold`` (the default). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_configs  # noqa: E402

from xecomla_cli.init import build_spec, convert_model  # noqa: E402
from xecomla_cli.layerwise import LayerRunner, attention_on  # noqa: E402
from xecomla_cli.mla.rebuild import decoder_layers  # noqa: E402

SHAPES = ("llama-3.2-1b", "qwen2.5-0.5b")  # real shapes (bench/real_configs.py) this bench converts


def random_model(shape: str, layers: int, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = real_configs.config(shape, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # from_config initialises biases to zero; Qwen2's are not
    return model


@torch.no_grad()
def layer_errors(original, converted, ids: torch.Tensor) -> list[float]:
    """Per layer, sqrt(Σ‖o_mla − o‖² / Σ‖o‖²) on the original model's inputs to that layer."""
    runner = LayerRunner(original, ids, micro_batch=1)
    errors = []
    for i, (layer, mla) in enumerate(zip(decoder_layers(original), decoder_layers(converted), strict=True)):
        num = den = 0.0
        for c in runner.chunks:
            x = layer.input_layernorm(c.h)
            o = attention_on(layer.self_attn, x, c).double()
            num += float((attention_on(mla.self_attn, x, c).double() - o).pow(2).sum())
            den += float(o.pow(2).sum())
        errors.append(round((num / den) ** 0.5, 5))
        runner.advance(i)
    return errors


def variants(config, rope_dim: int) -> dict[str, dict]:
    scaled = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default"
    biased = getattr(config, "model_type", "") == "qwen2"
    out = {}
    if scaled:
        out["source"] = {"rope_frequencies": "source"}
        out["default"] = {}
        out["default-all"] = {"rope_span": config.head_dim // 2}
    if biased:
        out["keep"] = {"attention_bias": "keep"}
        out["fold"] = {}
    return out


def convert(original, kv_rank: int, rope_dim: int, calib: torch.Tensor, **choices):
    """TransMLA (BKV) at the smallest fold N = c = 2K/p: random weights give the fold search nothing to go by
    (every pair matters alike), and one fold for every variant compares their RoPE alone."""
    model = copy.deepcopy(original)
    spec = build_spec(model.config, kv_rank=kv_rank, rope_dim=rope_dim, latent_norm=True, method="transmla", **choices)
    method = f"freqfold-{2 * (spec.rope_span or spec.head_dim // 2) // rope_dim}+bkv"
    spec = build_spec(model.config, kv_rank=kv_rank, rope_dim=rope_dim, latent_norm=True, method=method, **choices)
    spec = convert_model(model, spec, method=method, calib_ids=calib)
    return model, spec


def run_shape(args) -> dict:
    shape = real_configs.fields(args.model)
    original = random_model(args.model, args.layers, args.vocab)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.calib_blocks, 512), generator=gen)
    held = torch.randint(0, args.vocab, (2, args.eval_len), generator=gen)
    full = min(shape["hidden_size"], 2 * shape["num_key_value_heads"] * shape["head_dim"])
    rows = []
    for p in args.rope_dims:
        for name, choices in variants(original.config, p).items():
            for rank in (full, *args.kv_ranks):
                start = time.perf_counter()
                if p == shape["head_dim"] and "rope_span" in choices:
                    continue  # the span of every pair is what p = h gives by default
                model, spec = convert(original, rank, p, calib, **choices)
                errors = layer_errors(original, model, held)
                rows.append(
                    {
                        "variant": name,
                        "rope_dim": p,
                        "kv_rank": rank,
                        "rope_span": spec.rope_span,
                        "fold": (spec.freqfold or {}).get("fold"),
                        "layer_errors": errors,
                        "mean_error": round(sum(errors) / len(errors), 5),
                        "bias_fold": spec.bias_fold,
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": args.model, "shape": {k: v for k, v in shape.items()}, "layers": args.layers, "rows": rows}


def demo_with_biases(seed: int = 0):
    """The demo's trained weights in a Qwen2 body (the same blocks plus q/k/v biases), the biases drawn
    N(0, 0.1²) for q and v and N(0, 0.5²) for k (Qwen2's key biases are its large ones): a biased
    source whose attention inputs are a trained model's, as the bias fold needs."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from xecomla_cli.sources import load_model

    demo = load_model("demo")
    cfg = demo.model.config.to_dict()
    keep = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                                "max_position_embeddings", "rope_parameters")}  # fmt: skip
    model = AutoModelForCausalLM.from_config(Qwen2Config(**keep), dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(demo.model.state_dict(), strict=False)
    assert not unexpected and all(m.endswith("bias") for m in missing), (missing, unexpected)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for name, std in (("q_proj", 0.1), ("k_proj", 0.5), ("v_proj", 0.1)):
                bias = getattr(layer.self_attn, name).bias
                bias.copy_(torch.randn(bias.shape, generator=gen) * std)
    return model, demo.tokenizer


def run_demo_biases(args) -> dict:
    from xecomla_cli.text.calibration import calibration_ids

    original, tokenizer = demo_with_biases()
    blocks = calibration_ids(tokenizer, args.held_out, 10 * 256, seq_len=256)
    calib, held = blocks[:8], blocks[8:10]
    rows = []
    for name, choices in (("keep", {"attention_bias": "keep"}), ("fold", {})):
        model = copy.deepcopy(original)
        spec = build_spec(model.config, kv_rank=64, latent_norm=True, method="transmla", **choices)
        spec = convert_model(model, spec, method="transmla", calib_ids=calib)
        errors = layer_errors(original, model, held)
        rows.append({"variant": name, "kv_rank": 64, "layer_errors": errors,
                     "mean_error": round(sum(errors) / len(errors), 5), "bias_fold": spec.bias_fold})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": "demo-qwen2 (the demo's weights, q/k/v biases N(0, 0.1/0.5/0.1))", "rows": rows}


def run_checkpoints(args) -> dict:
    from xecomla_cli.sources import load_model
    from xecomla_cli.text.calibration import calibration_ids

    original = load_model("demo")
    held = calibration_ids(original.tokenizer, args.held_out, 2 * args.eval_len, seq_len=args.eval_len)
    rows = []
    for ckpt in args.ckpt:
        converted = load_model(ckpt)
        errors = layer_errors(original.model, converted.model, held)
        rows.append({"checkpoint": ckpt, "rope_span": converted.spec.rope_span, "layer_errors": errors,
                     "mean_error": round(sum(errors) / len(errors), 5)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"model": "demo", "held_out": args.held_out, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=[*SHAPES, "demo", "demo-qwen2"])
    ap.add_argument("--rope-dims", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument(
        "--kv-ranks",
        type=int,
        nargs="*",
        default=[],
        help="ranks besides the full rank (random weights "
        "have no low-rank structure: a cut there measures the rank, not the construction)",
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--calib-blocks", type=int, default=2)
    ap.add_argument("--eval-len", type=int, default=1024)
    ap.add_argument("--ckpt", action="append", default=[], help="demo: checkpoints to measure against the demo")
    ap.add_argument("--held-out", default="shakespeare", help="demo: held-out text (calibration_ids' sources)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    runs = {"demo": run_checkpoints, "demo-qwen2": run_demo_biases}
    result = runs.get(args.model, run_shape)(args)
    result.update(
        command=" ".join(["python", *sys.argv]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.time() - started, 1),
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
