"""Zero-shot multiple choice, scored as lm-evaluation-harness scores it.

For each (context, continuation) request: the summed log-probability of the continuation tokens
given the context. Trailing spaces of the context move into the continuation; context and
continuation are encoded as ``enc(context)`` + ``enc(context + continuation)[len(enc(context)):]``
without special tokens. Per question:

    acc      = [argmax_i  loglik_i == gold]
    acc_norm = [argmax_i  loglik_i / len(choice_i) == gold]     (len in characters)

Requests that share a context run it once: the context and all its continuations are packed
into one row (a prefix tree, flattened; see `PackedRow`) whose attention mask lets every
continuation see the whole context and its own earlier tokens only. One forward pass scores every
choice, with no KV cache and no padding between choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .scoring import Progress, body, device_of, encode, max_length, noop, prefix_token_id, token_log_probs
from .tasks import Example


def encode_pair(tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair`` (and its empty-context rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [prefix], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


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


@torch.inference_mode()
def loglikelihoods(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: Progress = noop,
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
        for idx, value in score_rows(model, batch, prefix):
            results[idx] = value
        progress(sum(len(r.requests) for r in batch))
    return results


def prefix_tree_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask (True = attend) of packed rows from their segment ids (B, L).

    Token i sees token j <= i when j is context (segment 0) or in i's own continuation; padding
    (segment -1) is seen by nobody and sees only itself (no empty softmax row)."""
    L = segment.shape[1]
    q, k = segment[:, :, None], segment[:, None, :]  # (B, L, 1), (B, 1, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (k != -1) & ((k == 0) | (k == q))  # (B, L, L)
    allowed |= torch.eye(L, dtype=torch.bool)
    return allowed[:, None]


def score_rows(model, rows: list[PackedRow], pad: int) -> list[tuple[int, float]]:
    """(request index, summed log-prob) of every request in `rows`, from one forward over the
    right-padded packed rows with their prefix-tree attention mask."""
    device = device_of(model)
    B, L = len(rows), max(len(r.inputs) for r in rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(rows):
        n = len(r.inputs)
        ids[b, :n] = torch.tensor(r.inputs)
        pos[b, :n] = torch.tensor(r.positions)
        seg[b, :n] = torch.tensor(r.segment)
    mask = prefix_tree_mask(seg)  # (B, 1, L, L)
    if model.config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = body(model)(
        input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device), use_cache=False
    ).last_hidden_state  # (B, L, d)
    b_idx, t_idx, targets, owner = [], [], [], []
    for b, r in enumerate(rows):
        for idx, at, cont in r.requests:
            b_idx += [b] * len(at)
            t_idx += at
            targets += cont
            owner += [idx] * len(at)
    lp = token_log_probs(model, hidden[b_idx, t_idx], torch.tensor(targets, device=device)).double().cpu()
    sums: dict[int, float] = {}
    for o, v in zip(owner, lp.tolist(), strict=True):
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
    model, tokenizer, examples: list[Example], *, batch_size: int = 32, progress: Progress = noop
) -> dict[str, Any]:
    """acc and acc_norm (with standard errors) of multiple-choice examples."""
    requests = [r for ex in examples for r in ex.requests]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    acc, acc_norm, pos = [], [], 0
    for ex in examples:
        ll = lls[pos : pos + len(ex.requests)]
        pos += len(ex.requests)
        acc.append(float(_argmax(ll) == ex.gold))
        acc_norm.append(float(_argmax([x / n for x, n in zip(ll, ex.norm_lengths, strict=True)]) == ex.gold))
    out: dict[str, Any] = {"n": len(examples)}
    for name, xs in (("acc", acc), ("acc_norm", acc_norm)):
        mean, se = _mean_stderr(xs)
        out[name], out[f"{name}_stderr"] = round(mean, 6), round(se, 6)
    return out


def average(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean over tasks of each task's primary metric (acc_norm where the harness reports it, else acc)."""
    values = [t[t["primary"]] for t in tasks.values()]
    return {
        "value": round(sum(values) / len(values), 6),
        "tasks": len(values),
        "metric": "primary (acc_norm, else acc)",
    }
