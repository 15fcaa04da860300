"""End-to-end decode speed of an MLA model against its original, measured in one run; prints one JSON object.

For each (context, batch) a random prompt is prefilled once per model; then greedy decode steps
run through ``model(...)`` with the cache (the loop ``xecomla eval --speed`` times), in these
variants, each from the same prefilled state:

    original          the original as transformers runs it: DynamicCache, which torch.cat's every step
    original_growing  the original with the in-place cache of the MLA layers (GrowingLayer) on every layer
    mla               the MLA model as it decodes by default: GrowingLayer latent cache + mla_decode_auto
    mla_reference     the MLA model through the exact fp32 reference over a concatenating DynamicLayer;
                      its greedy tokens must equal mla's (tokens_match)
    *_static          (--static-at BxL) StaticCache + torch.compile of the decode step (CUDA graphs on a GPU)

Each variant reports ms per step (the best of --repeats; the median beside it), tokens/s, the bytes a step must read
(weights, plus the cache at the mean decode length) and its roofline: those bytes at the read
bandwidth measured here (the faster of a sum and a matrix-vector product over a large tensor).
Ratios are same-run: mla against each of the others. The variants' repeats are interleaved, so
that a change of load on a shared machine hits them alike.

    python bench/decode_e2e.py --mla runs/ds64                          # CPU sweep: contexts 512,2048,8192 x batch 1,4
    python bench/decode_e2e.py --mla runs/ds64 --contexts 2048 --batches 4 --profile   # + op table per variant
    python bench/decode_e2e.py --shape llama-3.2-1b --contexts 4096,16384 --batches 1,8,32 --dtype bfloat16
    python bench/decode_e2e.py --tiny                                   # tiny random models: seconds on CPU (a test)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from xecomla_cli.mla.kv_cache import GrowingLayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_configs  # noqa: E402

SHAPES = {  # name: (the original's config, the MLA rank r; p = h / 2)
    "llama-3.2-1b": (real_configs.fields("llama-3.2-1b", rope_parameters=real_configs.DEFAULT_ROPE_500K), 128),
    "smollm2-135m": (real_configs.fields("smollm2-135m"), 64),
    "tiny": (
        real_configs.fields(
            "smollm2-135m",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=1024,
        ),
        16,
    ),
}
VARIANTS = ("original", "original_growing", "mla", "mla_reference")
TINY = dict(shape="tiny", mla=None, contexts="32", batches="2", new_tokens=4, repeats=1, static_at="2x32")
# MLA tokens/s over the original's at BxL (issue 14): CPU, the demo at 4x; GPU, Llama-3.2-1B shape at r = 128
CPU_TARGETS = {"1x512": 1.0, "4x512": 1.0, "4x2048": 1.3, "4x8192": 2.0}
GPU_TARGETS = {"8x16384": 2.0}


# ---- models ---------------------------------------------------------------------------------------
def random_pair(shape: str, device, dtype):
    """A random original of the shape and an MLA model (rank r, p = h/2) of the same shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from xecomla_cli.init import build_spec
    from xecomla_cli.mla.rebuild import apply_spec
    from xecomla_cli.mla.rope import model_inv_freq

    shape_config, kv_rank = SHAPES[shape]
    config = LlamaConfig(**shape_config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        original = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    mla = copy.deepcopy(original)
    spec = build_spec(config, kv_rank=kv_rank)
    apply_spec(mla, spec)
    inv_freq, _ = model_inv_freq(config, spec.rope_dim)
    for m in mla.modules():
        if hasattr(m, "rope_inv_freq"):
            m.rope_inv_freq.copy_(inv_freq)
    return original, mla.eval(), f"random weights, {shape} shape, r={spec.kv_ranks[0]}, p={spec.rope_dim}"


def checkpoint_pair(ckpt: str, original_source: str | None, device, dtype: str):
    """An MLA stage checkpoint and the original it came from (or `original_source`)."""
    from xecomla_cli.checkpoint import load_checkpoint
    from xecomla_cli.sources import load_model

    mla = load_checkpoint(ckpt, dtype=dtype, device=str(device))
    original = load_model(original_source or mla.source, dtype=dtype, device=str(device))
    return original.model, mla.model, f"{ckpt} against {original_source or mla.source}"


# ---- measuring --------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device) -> float:
    """Bytes per second read by the faster of a sum and a matrix-vector product over 256 MB (GPU: 2 GB), best of 6."""
    rows = (2**17 if device.type == "cuda" else 2**14, 4096)
    w = torch.ones(rows, device=device)
    x = torch.ones(rows[1], device=device)
    best = float("inf")
    for fn in (w.sum, lambda: torch.mv(w, x)):
        for _ in range(6):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return w.numel() * w.element_size() / best


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, the input embedding only if it is the LM head."""
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    skip = set() if tied else {id(model.get_input_embeddings().weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes the cache tensors hold per token and sequence (keys and values of every layer)."""
    total, length = 0, 0
    for layer in cache.layers:
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        length = max(length, layer.keys.shape[-2])
    return total / (batch * length)


@torch.inference_mode()
def step(model, cache, tokens):
    logits = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1:].argmax(-1)


@torch.inference_mode()
def time_steps(run: dict, steps: int, device) -> tuple[float, torch.Tensor]:
    """ms per step of `steps` greedy steps from the run's prefilled state, which is restored after."""
    if run["backend"]:
        os.environ["XECOMLA_DECODE_KERNEL"] = run["backend"]
    try:
        nxt, tokens = run["first"], []
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = step(run["model"], run["cache"], nxt)
            tokens.append(nxt)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3 / steps
    finally:
        os.environ.pop("XECOMLA_DECODE_KERNEL", None)
    run["cache"].crop(-steps)
    return ms, torch.cat(tokens, 1).cpu()


def profile_ops(run: dict, steps: int, device, top: int = 12) -> list[dict]:
    """torch.profiler over `steps` decode steps: the ops taking most self time, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        time_steps(run, steps, device)
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        dict(op=e.key, ms_per_step=round(getattr(e, key) / 1e3 / steps, 3), share=round(getattr(e, key) / total, 3))
        for e in rows
    ]


def copy_of(cache, make) -> DynamicCache:
    """A cache holding the same tokens, each layer made by make(keys, values)."""
    other = DynamicCache()
    other.layers = [make(layer.keys, layer.values) for layer in cache.layers]
    return other


def dynamic_layer(keys, values) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(keys.clone(), values.clone())
    return layer


# ---- one (context, batch) point ---------------------------------------------------------------------------
def report(ms: float, batch: int, weights: int, cache_bytes: float, bandwidth: float) -> dict:
    step_bytes = weights + cache_bytes
    roofline_ms = step_bytes / bandwidth * 1e3
    return dict(
        ms_per_step=round(ms, 3),
        tokens_per_s=round(batch * 1e3 / ms, 2),
        bytes_per_step=int(step_bytes),
        roofline_ms=round(roofline_ms, 3),
        of_roofline=round(roofline_ms / ms, 3),
    )


@torch.inference_mode()
def prefill(model, ids, cache, device) -> tuple[torch.Tensor, float]:
    """The first generated token after the prompt, and the seconds the prefill took."""
    sync(device)
    t0 = time.perf_counter()
    first = step(model, cache, ids)
    sync(device)
    return first, time.perf_counter() - t0


def prepare_runs(original, mla, ids, args, row: dict, device) -> dict:
    """Prefill each model once; every variant gets its own copy of the prefilled cache."""
    batch, context = ids.shape
    runs = {}
    for name, model in (("original", original), ("mla", mla)):
        cache = DynamicCache(config=model.config)  # MLA layers take a GrowingLayer by themselves
        first, seconds = prefill(model, ids, cache, device)
        per_token = cache_bytes_per_token(cache, batch)
        row[f"{name}_prefill_s"], row[f"{name}_cache_bytes_per_token"] = round(seconds, 3), round(per_token, 1)
        base = dict(model=model, first=first, weights=weight_bytes(model), per_token=per_token)
        runs[name] = dict(base, cache=cache, backend=None)
        if name == "original":  # the same model on the in-place cache
            runs["original_growing"] = dict(base, cache=copy_of(cache, GrowingLayer.holding), backend=None)
        else:  # the exact fp32 reference on a torch.cat cache: the tokens to match
            runs["mla_reference"] = dict(base, cache=copy_of(cache, dynamic_layer), backend="reference")
    return {v: runs[v] for v in args.variants}


def measure_point(original, mla, context: int, batch: int, args, bandwidth: float, device) -> dict:
    """Every variant at one (context, batch), repeats interleaved (so that load changes hit all alike), ratios."""
    ids = prompt(original.config.vocab_size, context, batch, device)
    row = dict(context=context, batch=batch, new_tokens=args.new_tokens)
    runs = prepare_runs(original, mla, ids, args, row, device)
    for run in runs.values():
        time_steps(run, 1, device)  # warm-up: allocator, kernels
    times = {v: [] for v in runs}
    for _ in range(args.repeats):
        for variant, run in runs.items():
            ms, run["tokens"] = time_steps(run, args.new_tokens, device)
            times[variant].append(ms)
    cache_len = context + args.new_tokens / 2  # the mean length a timed step reads
    for variant, run in runs.items():  # the best repeat: what the step costs when nothing else runs
        row[variant] = report(
            min(times[variant]), batch, run["weights"], run["per_token"] * batch * cache_len, bandwidth
        )
        row[variant]["ms_per_step_median"] = round(statistics.median(times[variant]), 3)
        if args.profile:
            row[f"{variant}_profile"] = profile_ops(run, args.new_tokens, device)
    if "mla" in runs and "mla_reference" in runs:
        row["tokens_match"] = bool(torch.equal(runs["mla"]["tokens"], runs["mla_reference"]["tokens"]))
    del runs
    gc.collect()
    return add_ratios(row)


def prompt(vocab_size: int, context: int, batch: int, device) -> torch.Tensor:
    """The random prompt of a (context, batch) point: the same in every run."""
    g = torch.Generator().manual_seed(context * 1000 + batch)
    return torch.randint(0, vocab_size, (batch, context), generator=g).to(device)


def add_static(row: dict, original, mla, args, bandwidth: float, device) -> dict:
    """Time both models at this point with StaticCache + torch.compile too (after every eager point:
    a slow compilation must not cost them)."""
    ids = prompt(original.config.vocab_size, row["context"], row["batch"], device)
    for name, model in (("original", original), ("mla", mla)):
        try:
            per_token = row[f"{name}_cache_bytes_per_token"]
            row[f"{name}_static"] = measure_static(model, ids, per_token, args, bandwidth, device)
        except Exception as exc:  # a compile failure must not lose the eager numbers
            row[f"{name}_static"] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        gc.collect()
    return add_ratios(row)


def measure_static(model, ids, per_token: float, args, bandwidth: float, device) -> dict:
    """StaticCache, an eager prefill, then the decode step through torch.compile (CUDA graphs on a GPU)."""
    batch, context = ids.shape
    steps = args.new_tokens * args.repeats + 3
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    on_gpu = device.type == "cuda"
    mode, backend = ("reduce-overhead", "inductor") if on_gpu else (None, "eager")  # eager: tracing only
    compiled = torch.compile(model, mode=mode, backend=backend, fullgraph=True)
    nxt, _ = prefill(model, ids, cache, device)
    t0 = time.perf_counter()
    for _ in range(3):  # compile, record the graph, replay
        nxt = step(compiled, cache, nxt)
    sync(device)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            nxt = step(compiled, cache, nxt)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3 / args.new_tokens)
    cache_bytes = per_token * batch * (context + steps / 2)
    out = report(min(times), batch, weight_bytes(model), cache_bytes, bandwidth)
    out["ms_per_step_median"] = round(statistics.median(times), 3)
    return dict(out, compile_s=round(compile_s, 1), compiled=f"{backend}, {mode}" if mode else backend)


def add_ratios(row: dict) -> dict:
    """MLA tokens/s over each baseline's, and what the rooflines allow."""
    mla = row.get("mla", {}).get("tokens_per_s")
    for base in ("original", "original_growing", "mla_reference"):
        if mla and base in row:
            row[f"speedup_vs_{base}"] = round(mla / row[base]["tokens_per_s"], 3)
    if "original" in row and "mla" in row:
        row["roofline_speedup"] = round(row["original"]["roofline_ms"] / row["mla"]["roofline_ms"], 3)
    if "tokens_per_s" in row.get("mla_static", {}) and "tokens_per_s" in row.get("original_static", {}):
        row["static_speedup"] = round(row["mla_static"]["tokens_per_s"] / row["original_static"]["tokens_per_s"], 3)
    return row


# ---- main ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mla", help="an MLA stage checkpoint (default: random weights of --shape)")
    ap.add_argument("--original", help="its original model (default: the checkpoint's source)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=16, help="timed decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best and median reported)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--static-at", default="", help="BxL points (e.g. 8x16384) also timed with StaticCache + compile")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="add torch.profiler's top ops per variant")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, context 32, batch 2 (a smoke test)")
    args = ap.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY, static_at=args.static_at or TINY["static_at"])
    args.variants = [v for v in args.variants.split(",") if v]
    args.static_at = [p for p in args.static_at.split(",") if p]
    return args


def check_targets(points: list[dict], targets: dict) -> dict:
    """For each BxL with a target that was measured: the target, the speedup, and whether it was met."""
    out = {}
    for row in points:
        key = f"{row['batch']}x{row['context']}"
        if key in targets and "speedup_vs_original" in row:
            speedup = row["speedup_vs_original"]
            out[key] = dict(target=targets[key], speedup=speedup, met=speedup >= targets[key])
    return out


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    load_before = os.getloadavg()
    if args.mla:
        original, mla, models = checkpoint_pair(args.mla, args.original, device, args.dtype)
    else:
        original, mla, models = random_pair(args.shape, device, getattr(torch, args.dtype))
    bandwidth = read_bandwidth(device)
    result = dict(benchmark="decode_e2e", device=device_name(device), date=time.strftime("%Y-%m-%d %H:%M"))
    result.update(torch=torch.__version__, models=models, dtype=args.dtype, new_tokens=args.new_tokens)
    result.update(read_bandwidth_gb_s=round(bandwidth / 1e9, 2), load_average_before=[round(x, 2) for x in load_before])
    result["points"] = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            row = measure_point(original, mla, context, batch, args, bandwidth, device)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_profile")}), file=sys.stderr, flush=True)
            result["points"].append(row)
    for row in result["points"]:
        if f"{row['batch']}x{row['context']}" in args.static_at:
            add_static(row, original, mla, args, bandwidth, device)
            print(json.dumps({k: v for k, v in row.items() if k.endswith("_static")}), file=sys.stderr, flush=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = check_targets(result["points"], GPU_TARGETS if device.type == "cuda" else CPU_TARGETS)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
