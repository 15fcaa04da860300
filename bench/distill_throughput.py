#!/usr/bin/env python
"""Distillation throughput: tokens/s, peak memory and MFU of one training step of a student (the
MLA conversion) distilled from its teacher (the original), against a naive loop in the same run.

    python bench/distill_throughput.py --shape llama-3.2-1b --kv-rank 128 --batch 4 --seq-len 2048

Weights are random (speed does not depend on them). Modes (``--modes``, comma-separated):

  naive               transformers forward of both models, pure-bf16 weights, full-logit KL
                      (fp32 log-softmax of (B, T, V) logits), AdamW on the bf16 weights
  ours                xecomla's training step (distill.trainer.Trainer): bf16 autocast over fp32
                      master weights, fused AdamW, chunked KL that never holds the full logits
  ...+ckpt / +ckptN   activation checkpointing of all / the first N decoder layers
  ...+compile         torch.compile of the decoder layers and of the loss math
  ...+liger           the loss through Liger-Kernel's fused linear JSD (if installed)

Prints one JSON object: per mode tokens/s, step time, peak GPU memory and MFU (model FLOPs, no
recomputation counted), and each mode's speed and memory relative to the naive loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_configs  # noqa: E402

SHAPES = {
    # name: config fields (bench/real_configs.py); Llama's llama3 RoPE scaling does not change the speed
    "llama-3.2-1b": real_configs.fields("llama-3.2-1b", rope_parameters=real_configs.DEFAULT_ROPE_500K),
    "smollm2-135m": real_configs.fields("smollm2-135m"),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    ),
}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "MI300": 1307e12}


def build_pair(shape: str, kv_rank: int, device: torch.device, student_dtype, teacher_dtype, seed: int = 0):
    """A random teacher of the shape and an MLA student (rank r, p = h/2) of the same shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from xecomla_cli.init import build_spec
    from xecomla_cli.mla.rebuild import apply_spec
    from xecomla_cli.mla.rope import model_inv_freq

    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, dtype=teacher_dtype)
        student = AutoModelForCausalLM.from_config(config, dtype=student_dtype)
    spec = build_spec(config, kv_rank=kv_rank)
    apply_spec(student, spec)
    inv_freq, _ = model_inv_freq(config, spec.rope_dim)
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
        for m in student.modules():
            if hasattr(m, "rope_inv_freq"):
                m.rope_inv_freq.copy_(inv_freq)
    return student, teacher.eval()


def matmul_params(model) -> int:
    """Parameters used in matrix products per token (all Linear weights incl. the LM head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(model, seq_len: int) -> float:
    """Causal attention scores and values, forward: H·(d_qk + d_v)·T per token per layer."""
    cfg = model.config
    h = cfg.head_dim
    return cfg.num_hidden_layers * cfg.num_attention_heads * (h + h) * seq_len


def flops_per_token(student, teacher, seq_len: int) -> float:
    """Model FLOPs of one training token: student forward + backward, teacher forward."""
    s = 6 * matmul_params(student) + 3 * attention_flops_per_token(student, seq_len)
    t = 2 * matmul_params(teacher) + attention_flops_per_token(teacher, seq_len)
    return float(s + t)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if all(part in name for part in key.split()):
            return value
    return None


def naive_step_fn(student, teacher, lr: float):
    """transformers forward of both, full logits, KL on fp32 log-softmax, AdamW on bf16 weights."""
    from xecomla_cli.distill.kd_loss import kd_loss_reference

    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()

    def step(ids):
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        loss = kd_loss_reference(s_logits, t_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ours_step_fn(student, teacher, opts: dict, lr: float, steps: int):
    from xecomla_cli.distill.config import ResolvedConfig
    from xecomla_cli.distill.dist import Dist
    from xecomla_cli.distill.kd import KDObjective
    from xecomla_cli.distill.trainer import Trainer

    cfg = ResolvedConfig(
        steps=steps,
        total_steps=steps + 10,
        lr=lr,
        precision=opts["precision"],
        compile=opts["compile"],
        checkpoint_layers=opts["ckpt"],
        kd_kernel=opts["kernel"],
    )
    dist = Dist(device=next(student.parameters()).device)
    blocks = {}  # the batch source: the blocks of the step being timed
    objective = KDObjective(student, teacher, cfg, dist, lambda step: blocks["ids"])
    trainer = Trainer(objective, cfg, dist, fused=dist.device.type == "cuda")

    def step(ids):
        blocks["ids"] = ids
        return trainer.train_step()["loss"]

    return step


def parse_mode(mode: str) -> dict:
    parts = mode.split("+")
    if parts[0] not in ("naive", "ours"):
        raise SystemExit(f"unknown mode '{mode}': naive or ours[+ckpt[N]][+compile][+liger][+fp32]")
    opts = {"base": parts[0], "compile": False, "ckpt": None, "kernel": "torch", "precision": "bf16"}
    for p in parts[1:]:
        if p == "compile":
            opts["compile"] = True
        elif p.startswith("ckpt"):
            opts["ckpt"] = int(p[4:]) if p[4:] else 10**6
        elif p == "liger":
            opts["kernel"] = "liger"
        elif p == "fp32":
            opts["precision"] = "fp32"
        else:
            raise SystemExit(f"unknown mode part '{p}' in '{mode}'")
    return opts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args, device: torch.device) -> dict:
    opts = parse_mode(mode)
    bf16 = torch.bfloat16
    if opts["base"] == "naive":
        student, teacher = build_pair(args.shape, args.kv_rank, device, bf16, bf16)
        step = naive_step_fn(student, teacher, args.lr)
    else:
        t_dtype = bf16 if opts["precision"] == "bf16" else torch.float32
        student, teacher = build_pair(args.shape, args.kv_rank, device, torch.float32, t_dtype)
        step = ours_step_fn(student, teacher, opts, args.lr, args.steps + args.warmup)
    flops = flops_per_token(student, teacher, args.seq_len)
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen) for _ in range(args.warmup + args.steps)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.perf_counter()
    for ids in batches[: args.warmup]:
        loss = step(ids.to(device))
    sync(device)
    warm_s = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for ids in batches[args.warmup :]:
        loss = step(ids.to(device))
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq_len
    out = {
        "mode": mode,
        "tokens_per_s": round(tokens / dt, 1),
        "step_ms": round(dt * 1000, 2),
        "warmup_s": round(warm_s, 1),
        "loss": round(float(loss), 4),
    }
    if device.type == "cuda":
        out["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    peak = peak_flops(device)
    if peak:
        out["mfu"] = round(flops * tokens / dt / peak, 4)
    out["flops_per_token"] = flops
    del student, teacher, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--kv-rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--modes", default="naive,ours,ours+ckpt,ours+compile+ckpt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 steps: checks that every mode runs")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.batch, args.seq_len, args.steps, args.warmup, args.kv_rank = "tiny", 2, 64, 2, 1, 16
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else (args.device if args.device != "auto" else "cpu")
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "benchmark": "distill_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "kv_rank": args.kv_rank,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": args.batch * args.seq_len,
        "peak_bf16_flops": peak_flops(device),
        "results": [],
    }
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        try:
            r = run_mode(mode, args, device)
        except Exception as exc:  # an OOM or a missing package in one mode should not lose the others
            r = {"mode": mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["results"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    base = next((r for r in result["results"] if r["mode"] == "naive" and "error" not in r), None)
    if base:
        for r in result["results"]:
            if "error" not in r:
                r["speed_vs_naive"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                if "peak_gb" in r:
                    r["memory_vs_naive"] = round(r["peak_gb"] / base["peak_gb"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
