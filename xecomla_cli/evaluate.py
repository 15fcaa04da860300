"""Evaluation of an original or MLA model: perplexity, zero-shot multiple choice, KV memory, speed.

* Perplexity: each document is prefixed with the tokenizer's BOS (else EOS) token, as
  lm-evaluation-harness's rolling log-likelihood does, so that every token of it is predicted;
  windows of ``seq_len`` inputs advance by ``stride`` (default ``seq_len``: disjoint windows) and a
  window scores only targets that no earlier window scored. ppl = exp(total NLL / tokens scored).
* Multiple choice, as lm-evaluation-harness scores it: for each (context, continuation) request the
  summed log-probability of the continuation tokens given the context; trailing spaces of the
  context move into the continuation; context and continuation are encoded as
  ``enc(context)`` + ``enc(context + continuation)[len(enc(context)):]`` without special tokens.
  ``acc`` = argmax of the log-likelihoods, ``acc_norm`` = argmax of log-likelihood / len(choice)
  (characters). Requests that share a context run it once: a batch of contexts fills a KV cache,
  which is then gathered per choice and extended by the continuations (one forward each).
* KV memory: bytes per token held by the cache tensors after a short greedy generation.
* Speed: prefill time and greedy decode tokens/s at a given batch and context, random prompt
  tokens, through whatever decode path the model uses; attention time from module hooks.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import XecomlaError
from .loaded import dtype_name, model_dtype_name
from .eval_tasks import Example, TaskInfo

Progress = Callable[[int], None]  # called with the amount of work just done


def _noop(_: int) -> None:
    pass


# ---- model pieces -----------------------------------------------------------------------------
def _body(model):
    """The decoder stack (hidden states out, no LM head)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _device(model) -> torch.device:
    return next(model.parameters()).device


def prefix_token_id(tokenizer) -> int:
    """The token put before a document or an empty context: BOS, else EOS (as the harness)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise XecomlaError("the tokenizer has no BOS, EOS or pad token to start a document with")


def max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """log p(target | hidden state) for rows of hidden (N, d): the LM head only where needed."""
    head = model.get_output_embeddings()
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk]).float()  # (n, V)
        out[s : s + chunk] = logits.log_softmax(-1).gather(-1, targets[s : s + chunk, None]).squeeze(-1)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# ---- perplexity -------------------------------------------------------------------------------
@dataclass
class Window:
    inputs: list[int]  # seq[b : end]
    targets: list[int]  # seq[b + 1 : end + 1], the next token of each input
    score_from: int  # targets before this index were scored by an earlier window


def rolling_windows(ids: list[int], prefix: int, seq_len: int, stride: int) -> list[Window]:
    """Windows over [prefix] + ids so that every token of ids is scored exactly once."""
    if not 1 <= stride <= seq_len:
        raise XecomlaError(f"--stride must be between 1 and --seq-len ({seq_len})")
    seq = [prefix] + list(ids)
    n = len(ids)  # targets are seq[1..n]
    windows: list[Window] = []
    begin, scored = 0, 0  # `scored`: targets seq[1..scored] are done
    while scored < n:
        end = min(begin + seq_len, n)
        windows.append(Window(seq[begin:end], seq[begin + 1 : end + 1], scored - begin))
        scored = end
        begin += stride
    return windows


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    documents: list[str],
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    batch_tokens: int = 8192,
    max_tokens: int | None = None,
    progress: Progress = _noop,
) -> dict[str, Any]:
    """exp(mean NLL) over the tokens of `documents` (each scored from its own start).

    Windows are batched up to `batch_tokens` padded tokens per forward pass."""
    seq_len = min(seq_len, max_length(model))
    stride = stride or seq_len
    prefix = prefix_token_id(tokenizer)
    windows: list[Window] = []
    used_docs, budget = 0, max_tokens
    for doc in documents:
        ids = _encode(tokenizer, doc)
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if ids:
            windows += rolling_windows(ids, prefix, seq_len, stride)
            used_docs += 1
        if budget == 0:
            break
    total = sum(len(w.targets) - w.score_from for w in windows)
    if total == 0:
        raise XecomlaError("the perplexity text has no tokens: pass a non-empty --ppl-data file")
    device = _device(model)
    nll, count = 0.0, 0
    windows.sort(key=lambda w: -len(w.inputs))
    s = 0
    while s < len(windows):
        T = len(windows[s].inputs)  # the longest of this batch (sorted)
        batch = windows[s : s + max(1, batch_tokens // T)]
        s += len(batch)
        # Right padding needs no attention mask: causal attention never looks ahead at the pads.
        ids = torch.full((len(batch), T), prefix, dtype=torch.long)
        rows, cols, targets = [], [], []
        for i, w in enumerate(batch):
            ids[i, : len(w.inputs)] = torch.tensor(w.inputs)
            for j in range(w.score_from, len(w.targets)):
                rows.append(i)
                cols.append(j)
                targets.append(w.targets[j])
        hidden = _body(model)(input_ids=ids.to(device), use_cache=False).last_hidden_state
        lp = token_log_probs(model, hidden[rows, cols], torch.tensor(targets, device=device))
        nll -= float(lp.double().sum())
        count += len(targets)
        progress(len(targets))
    mean = nll / count
    return {"tokens": count, "documents": used_docs, "seq_len": seq_len, "stride": stride,
            "nll": round(mean, 6), "ppl": round(math.exp(mean), 4)}  # fmt: skip


# ---- multiple choice --------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair`` (and its empty-context rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [prefix], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@torch.inference_mode()
def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: Progress = _noop,
) -> list[float]:
    """Summed log-probability of each continuation given its context (one float per request)."""
    prefix = prefix_token_id(tokenizer)
    limit = max_length(model)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for idx, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation, prefix)
        cont = cont[-limit:]
        ctx = ctx[-max(1, limit - len(cont)) :]  # the harness keeps the last max_length tokens
        groups.setdefault(tuple(ctx), []).append((idx, cont))
    rows = [PackedRow.build(list(ctx), members) for ctx, members in groups.items()]
    # Longest first (as the harness): memory trouble shows at once, and padding stays small.
    rows.sort(key=lambda r: -len(r.inputs))
    results = [0.0] * len(requests)
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        for idx, value in _score_rows(model, batch, prefix):
            results[idx] = value
        progress(sum(len(r.requests) for r in batch))
    return results


@dataclass
class PackedRow:
    """One context and all its continuations in one sequence (a prefix tree, flattened):

        inputs     ctx | cont_1[:-1] | cont_2[:-1] | ...
        positions  0 .. Lc-1 | Lc .. | Lc .. | ...       (each continuation right after the context)
        attention  causal within ctx; cont_k sees all of ctx and its own earlier tokens only

    Continuation k's tokens are predicted at [last ctx position] + [its own positions]. Sharing the
    context this way needs no padding between choices and no KV cache.
    """

    inputs: list[int]
    positions: list[int]
    segment: list[int]  # 0 = context, k = continuation k
    requests: list[tuple[int, list[int], list[int]]]  # (request index, scoring positions, targets)

    @classmethod
    def build(cls, ctx: list[int], members: list[tuple[int, list[int]]]) -> PackedRow:
        inputs, positions, segment = list(ctx), list(range(len(ctx))), [0] * len(ctx)
        requests = []
        for k, (idx, cont) in enumerate(members, 1):
            at = [len(ctx) - 1] + list(range(len(inputs), len(inputs) + len(cont) - 1))
            inputs += cont[:-1]
            positions += range(len(ctx), len(ctx) + len(cont) - 1)
            segment += [k] * (len(cont) - 1)
            requests.append((idx, at[: len(cont)], cont))
        return cls(inputs, positions, segment, requests)


def _score_rows(model, rows: list[PackedRow], pad: int) -> list[tuple[int, float]]:
    """One forward over right-padded packed rows with their prefix-tree attention mask."""
    device = _device(model)
    B, L = len(rows), max(len(r.inputs) for r in rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(rows):
        n = len(r.inputs)
        ids[b, :n] = torch.tensor(r.inputs)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segment)
    q, k = seg[:, :, None], seg[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    mask = allowed[:, None]  # (B, 1, L, L), True = attend
    if model.config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = _body(model)(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                          use_cache=False).last_hidden_state  # fmt: skip
    b_idx, t_idx, targets, owner = [], [], [], []
    for b, r in enumerate(rows):
        for idx, at, cont in r.requests:
            b_idx += [b] * len(at)
            t_idx += at
            targets += cont
            owner += [idx] * len(at)
    lp = token_log_probs(model, hidden[b_idx, t_idx], torch.tensor(targets, device=device)).double().cpu()
    sums: dict[int, float] = {}
    for o, v in zip(owner, lp.tolist()):
        sums[o] = sums.get(o, 0.0) + v
    return [(idx, sums.get(idx, 0.0)) for r in rows for idx, _, _ in r.requests]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first maximum, like numpy


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)  # the harness's sample stderr
    return mean, math.sqrt(var / n)


def score_examples(
    model, tokenizer, examples: list[Example], *, batch_size: int = 32, progress: Progress = _noop
) -> dict[str, Any]:
    """acc and acc_norm (with standard errors) of multiple-choice examples."""
    requests = [r for ex in examples for r in ex.requests]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    acc, acc_norm, pos = [], [], 0
    for ex in examples:
        ll = lls[pos : pos + len(ex.requests)]
        pos += len(ex.requests)
        acc.append(float(_argmax(ll) == ex.gold))
        acc_norm.append(float(_argmax([x / n for x, n in zip(ll, ex.norm_lengths)]) == ex.gold))
    out: dict[str, Any] = {"n": len(examples)}
    for name, xs in (("acc", acc), ("acc_norm", acc_norm)):
        mean, se = _mean_stderr(xs)
        out[name], out[f"{name}_stderr"] = round(mean, 6), round(se, 6)
    return out


# ---- KV memory --------------------------------------------------------------------------------
def cache_footprint(cache) -> dict[str, Any]:
    """Bytes and values held by a transformers cache, per layer, from its tensors."""
    per_layer_bytes, per_layer_values, lengths, batch = [], [], [], None
    for layer in cache.layers:
        tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor) and t.numel()]  # fmt: skip
        per_layer_bytes.append(sum(t.numel() * t.element_size() for t in tensors))
        per_layer_values.append(sum(t.numel() for t in tensors))
        if tensors:
            lengths.append(tensors[0].shape[-2])
            batch = tensors[0].shape[0]
    return {"bytes": sum(per_layer_bytes), "values": sum(per_layer_values), "per_layer_values": per_layer_values,
            "tokens": max(lengths, default=0), "batch": batch or 0}  # fmt: skip


def expected_values_per_token(model, spec=None) -> int:
    """What the architecture says one token should cost (a check on the measurement)."""
    if spec is not None:
        return spec.values_per_token_total
    from .mla.spec import attention_shape

    s = attention_shape(model.config)
    return s["num_layers"] * 2 * s["num_kv_heads"] * s["head_dim"]


@torch.inference_mode()
def measure_kv_cache(
    model, *, prompt_tokens: int = 32, new_tokens: int = 8, batch: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Generate greedily from a random prompt, then measure what the cache tensors hold."""
    device = _device(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=g).to(device)
    cache = _new_cache(model)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(new_tokens):
        nxt = logits[:, -1:].argmax(-1)
        logits = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    fp = cache_footprint(cache)
    tokens = fp["tokens"]
    if tokens != prompt_tokens + new_tokens or fp["batch"] != batch:
        raise XecomlaError(f"the KV cache holds {tokens} tokens x {fp['batch']}, expected "
                           f"{prompt_tokens + new_tokens} x {batch}: cannot measure bytes per token")  # fmt: skip
    dtype = next(t for layer in cache.layers for t in (layer.keys,) if isinstance(t, torch.Tensor)).dtype
    return {
        "bytes_per_token": fp["bytes"] / (batch * tokens),
        "values_per_token": fp["values"] / (batch * tokens),
        "values_per_token_per_layer": [v // (batch * tokens) for v in fp["per_layer_values"]],
        "dtype": dtype_name(dtype),
        "tokens_measured": tokens,
        "batch_measured": batch,
    }


def kv_report(measured: dict[str, Any], *, expected_values: int, original_bytes_per_token: float,
              original_from: str, context: int, batch: int) -> dict[str, Any]:  # fmt: skip
    """Measured cache size, the ratio to the original model's, and GB at a context and batch."""
    bpt = measured["bytes_per_token"]
    return {
        "bytes_per_token": int(bpt) if float(bpt).is_integer() else round(bpt, 2),
        "values_per_token": int(measured["values_per_token"]),
        "expected_values_per_token": expected_values,
        "dtype": measured["dtype"],
        "original_bytes_per_token": int(original_bytes_per_token),
        "original_from": original_from,  # "measured" (teacher/original run) or "spec" (2·G·h per layer)
        "compression": round(original_bytes_per_token / bpt, 4),
        "context": context,
        "batch": batch,
        "gb": round(bpt * context * batch / 1e9, 4),
        "values_per_token_per_layer": measured["values_per_token_per_layer"],
    }


# ---- speed ------------------------------------------------------------------------------------
def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in _body(model).layers]


def decode_path(model) -> str:
    """Which attention a decode step runs: original, or MLA absorbed through the kernel/reference."""
    from .mla.attention import MLAAttention

    if not any(isinstance(m, MLAAttention) for m in attention_modules(model)):
        return f"original ({model.config._attn_implementation})"
    try:
        from .kernels import decode_backend

        backend = decode_backend(_device(model))
    except Exception:  # the kernel package may be absent or mid-change: report what runs by default
        backend = "triton" if _device(model).type == "cuda" else "reference"
    return f"mla absorbed ({'Triton kernel' if backend == 'triton' else 'PyTorch'})"


@torch.inference_mode()
def measure_speed(
    model, *, batch: int = 1, context: int = 1024, new_tokens: int = 32, attention_steps: int = 8, seed: int = 0
) -> dict[str, Any]:
    """Prefill time, then greedy decode tokens/s; attention ms per decode step from module hooks.

    A short warm-up (kernels compiled, memory allocated) runs first and is not timed. Attention
    time is measured in extra decode steps (hooks synchronise the GPU around every attention call,
    which would slow the timed steps).
    """
    device = _device(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)

    def step(cache, tokens):
        return model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    warm = _new_cache(model)
    nxt = step(warm, ids[:, : min(16, context)])
    for _ in range(2):
        nxt = step(warm, nxt)
    del warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _sync(device)
    t0 = time.perf_counter()
    cache = _new_cache(model)
    nxt = step(cache, ids)
    _sync(device)
    prefill = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = step(cache, nxt)
    _sync(device)
    decode = time.perf_counter() - t0

    spent: list[float] = []
    starts: dict[int, float] = {}

    def pre(module, args, kwargs):
        _sync(device)
        starts[id(module)] = time.perf_counter()

    def post(module, args, kwargs, output):
        _sync(device)
        spent.append(time.perf_counter() - starts.pop(id(module)))

    hooks = []
    for m in attention_modules(model):
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        t0 = time.perf_counter()
        for _ in range(attention_steps):
            nxt = step(cache, nxt)
        _sync(device)
        hooked = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    out = {
        "device": str(device),
        "dtype": model_dtype_name(model),
        "decode_path": decode_path(model),
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill, 4),
        "prefill_tokens_per_s": round(batch * context / prefill, 1),
        "decode_s": round(decode, 4),
        "decode_tokens_per_s": round(batch * new_tokens / decode, 2),
        "ms_per_step": round(1000 * decode / new_tokens, 3),
        "attention_ms_per_step": round(1000 * sum(spent) / attention_steps, 3),
        "attention_share": round(sum(spent) / hooked, 4),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return out


# ---- one model, all requested metrics -----------------------------------------------------------
@dataclass
class EvalOptions:
    tasks: list[TaskInfo] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 32
    ppl: bool = True
    ppl_name: str = "lambada"
    ppl_documents: list[str] = field(default_factory=list)
    ppl_tokens: int | None = None
    seq_len: int = 1024
    stride: int | None = None
    kv: bool = True
    context: int = 8192
    batch: int = 1
    speed: bool = False
    new_tokens: int = 32
    speed_context: int | None = None  # None: `context`


def evaluate_model(loaded, opts: EvalOptions, examples: dict[str, list[Example]], *, label: str = "model",
                   progress_factory=None, original_kv: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Every metric `opts` asks for, for one loaded model (`progress_factory(desc, total) -> advance`)."""
    model, tok = loaded.model, loaded.tokenizer
    bar = progress_factory or (lambda desc, total: _noop)
    metrics: dict[str, Any] = {}
    if opts.ppl:
        total = _count_tokens(tok, opts.ppl_documents, opts.ppl_tokens)
        res = perplexity(model, tok, opts.ppl_documents, seq_len=opts.seq_len, stride=opts.stride,
                         batch_tokens=256 * opts.batch_size, max_tokens=opts.ppl_tokens,
                         progress=bar(f"{label}: perplexity", total))  # fmt: skip
        metrics["perplexity"] = {"data": opts.ppl_name, **res}
    if opts.tasks:
        metrics["tasks"] = {}
        for task in opts.tasks:
            exs = examples[task.name]
            n_requests = sum(len(e.requests) for e in exs)
            res = score_examples(model, tok, exs, batch_size=opts.batch_size, progress=bar(f"{label}: {task.name}", n_requests))
            keep = {k: v for k, v in res.items() if k == "n" or k.split("_stderr")[0] in task.metrics}
            metrics["tasks"][task.name] = {**keep, "primary": task.primary, "split": task.split}
        metrics["average"] = average(metrics["tasks"])
    if opts.kv:
        measured = measure_kv_cache(model)
        spec = loaded.spec
        if spec is None:  # an original model is its own reference
            orig, source = measured["bytes_per_token"], "measured"
        elif original_kv is not None:  # the original (or a same-shape teacher) measured in this run
            orig, source = original_kv["bytes_per_token"], "measured"
        else:  # 2·G·h values per token per layer, at the measured bytes per value
            orig = spec.original_values_per_token_total * measured["bytes_per_token"] / measured["values_per_token"]
            source = "spec"
        metrics["kv_cache"] = kv_report(measured, expected_values=expected_values_per_token(model, loaded.spec),
                                        original_bytes_per_token=orig, original_from=source,
                                        context=opts.context, batch=opts.batch)  # fmt: skip
    if opts.speed:
        metrics["speed"] = measure_speed(model, batch=opts.batch, context=opts.speed_context or opts.context,
                                         new_tokens=opts.new_tokens)  # fmt: skip
    return metrics


def average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over tasks of each task's primary metric (acc_norm where the harness reports it, else acc)."""
    values = [t[t["primary"]] for t in tasks.values()]
    return {"value": round(sum(values) / len(values), 6), "tasks": len(values), "metric": "primary (acc_norm, else acc)"}


def _count_tokens(tokenizer, documents: list[str], max_tokens: int | None) -> int:
    total = 0
    for doc in documents:
        total += len(_encode(tokenizer, doc))
        if max_tokens is not None and total >= max_tokens:
            return max_tokens
    return total


# ---- the whole comparison ---------------------------------------------------------------------
def comparison_rows(result: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(metric, teacher value, model value) rows, in display order (delta = model - teacher)."""
    m = result["results"]["model"]
    t = (result["results"].get("teacher") or {})
    rows: list[tuple[str, float | None, float | None]] = []

    def get(d, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    if "perplexity" in m:
        rows.append((f"perplexity ({m['perplexity']['data']}, {m['perplexity']['tokens']:,} tok)",
                     get(t, "perplexity", "ppl"), m["perplexity"]["ppl"]))  # fmt: skip
    for name, r in m.get("tasks", {}).items():
        for metric in (r["primary"], *(x for x in ("acc", "acc_norm") if x in r and x != r["primary"])):
            rows.append((f"{name} {metric} (n={r['n']})", get(t, "tasks", name, metric), r[metric]))
    if "average" in m:
        rows.append((f"average ({m['average']['tasks']} tasks)", get(t, "average", "value"), m["average"]["value"]))
    if "kv_cache" in m:
        kv = m["kv_cache"]
        rows.append(("KV cache bytes/token", get(t, "kv_cache", "bytes_per_token") or
                     (kv["original_bytes_per_token"] if kv["original_from"] == "spec" else None), kv["bytes_per_token"]))  # fmt: skip
        rows.append((f"KV cache GB @ {kv['context']:,} ctx x {kv['batch']}",
                     get(t, "kv_cache", "gb") or (round(kv["original_bytes_per_token"] * kv["context"] * kv["batch"] / 1e9, 4)
                                                  if kv["original_from"] == "spec" else None), kv["gb"]))  # fmt: skip
        rows.append(("KV compression vs original", get(t, "kv_cache", "compression") or 1.0, kv["compression"]))
    if "speed" in m:
        s = m["speed"]
        where = f"b={s['batch']}, ctx={s['context']:,}"
        rows.append((f"decode tokens/s ({where})", get(t, "speed", "decode_tokens_per_s"), s["decode_tokens_per_s"]))
        rows.append((f"attention ms/step ({where})", get(t, "speed", "attention_ms_per_step"), s["attention_ms_per_step"]))
        rows.append((f"prefill s ({where})", get(t, "speed", "prefill_s"), s["prefill_s"]))
    return rows


def metrics_for_checkpoint(result: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The ``eval`` entry of xecomla.json metrics: earlier results merged with the new ones."""
    merged = dict(existing or {})
    new = result["results"]["model"]
    for key, value in new.items():
        if key == "tasks":
            merged["tasks"] = {**merged.get("tasks", {}), **value}
        else:
            merged[key] = value
    if "tasks" in merged:
        merged["average"] = average(merged["tasks"])
    if result["results"].get("teacher"):
        old = merged.get("teacher", {}) if merged.get("teacher", {}).get("source") == result["teacher"] else {}
        teacher = {**old, "source": result["teacher"]}
        for key, value in result["results"]["teacher"].items():
            teacher[key] = {**old.get("tasks", {}), **value} if key == "tasks" else value
        if "tasks" in teacher:
            teacher["average"] = average(teacher["tasks"])
        merged["teacher"] = teacher
    merged["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return merged


def run_eval(
    model_source: str,
    opts: EvalOptions,
    *,
    teacher: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    load: Callable | None = None,
    progress_factory=None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Evaluate `model_source` (and `teacher`, or for --speed of an MLA model its original) and
    return the result dict printed by ``--json``. One model is in memory at a time."""
    import gc

    from .mla.convert import spec_shape_matches
    from .sources import load_model, resolve

    load = load or (lambda src: load_model(src, dtype=dtype, device=device))
    resolved = resolve(model_source)  # fail early on a bad path, before any long run
    if teacher is not None:
        resolve(teacher)
    start = time.perf_counter()
    examples = {t.name: t.load(opts.limit) for t in opts.tasks}
    for name, exs in examples.items():
        if not exs:
            raise XecomlaError(f"task '{name}' has no examples")

    student = load(model_source)
    reference, role = teacher, "teacher" if teacher else None
    if reference is None and opts.speed and student.is_mla:
        reference, role = student.source, "original (speed and KV baseline)"
    ref_metrics = ref_kv = None
    if reference is not None:
        ref_opts = opts if role == "teacher" else EvalOptions(ppl=False, kv=opts.kv, context=opts.context,
                                                               batch=opts.batch, speed=True, new_tokens=opts.new_tokens,
                                                               speed_context=opts.speed_context)  # fmt: skip
        # The reference goes first so that the model's cache is compared with a measured one;
        # the model is set aside (moved to CPU) meanwhile, so one model is on the device at a time.
        on = _device(student.model)
        if on.type != "cpu":
            student.model.to("cpu")
        ref = load(reference)
        log(f"[bold]{role}[/]: {reference}")
        ref_metrics = evaluate_model(ref, ref_opts, examples, label=role.split(" ")[0], progress_factory=progress_factory)
        if student.is_mla and not ref.is_mla and spec_shape_matches(ref.config, student.spec):
            ref_kv = ref_metrics.get("kv_cache")  # the original's cache, measured: the compression reference
        del ref
        gc.collect()
        if on.type == "cuda":
            torch.cuda.empty_cache()
        student.model.to(on)
    log(f"[bold]model[/]: {model_source}")
    metrics = evaluate_model(student, opts, examples, label="model", progress_factory=progress_factory,
                             original_kv=ref_kv)  # fmt: skip
    return {
        "model": str(resolved.directory) if resolved.is_checkpoint else model_source,
        "checkpoint": str(resolved.directory) if resolved.is_checkpoint else None,
        "stage": student.meta.get("stage") if resolved.is_checkpoint else None,
        "source": student.source,
        "mla": student.is_mla,
        "teacher": reference,
        "teacher_role": role,
        "settings": settings(opts, dtype=dtype, device=device),
        "results": {"model": metrics, "teacher": ref_metrics},
        "seconds": round(time.perf_counter() - start, 1),
    }


def settings(opts: EvalOptions, **extra) -> dict[str, Any]:
    s: dict[str, Any] = {**extra, "batch_size": opts.batch_size}
    if opts.tasks:
        s.update(tasks=[t.name for t in opts.tasks], limit=opts.limit, num_fewshot=0)
    if opts.ppl:
        s.update(ppl_data=opts.ppl_name, ppl_tokens=opts.ppl_tokens, seq_len=opts.seq_len, stride=opts.stride or opts.seq_len)
    if opts.kv:
        s.update(context=opts.context, batch=opts.batch)
    if opts.speed:
        s.update(speed_context=opts.speed_context or opts.context, batch=opts.batch, new_tokens=opts.new_tokens)
    return s
