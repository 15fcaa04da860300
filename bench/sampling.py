"""Sampling speed of the demo teacher (and optionally an MLA student) at batch 32, fp32, on this CPU:
``xecomla_cli.text.sampling.sample`` against the first sampler (kept below as the baseline), same run.

    python bench/sampling.py [--batch 32] [--tokens 64] [--student runs/d-init] [--out bench/results/sampling.json]

Both samplers draw the same fixed amount of work (no stop token) after the chat template's user
header, the prompt of teacher-text sampling, from the same seed; `same_tokens` says whether
they drew the same tokens. The load average is printed beside the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


@torch.no_grad()
def baseline_sample(model, ids, mask, new_tokens, temperature):
    """The first sampler (text/teacher.py before bench/sampling.py): DynamicCache (torch.cat per step),
    T x V logits at the prefill, the attention mask always, the machine's thread count."""
    from transformers import DynamicCache

    from xecomla_cli.text.sampling import sample_next

    cache = DynamicCache(config=model.config)
    vocab = model.config.vocab_size
    out = torch.empty((ids.shape[0], new_tokens), dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids
    for t in range(new_tokens):
        logits = model(
            input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        ).logits[:, -1, :vocab]
        nxt = sample_next(logits, temperature)
        out[:, t] = nxt
        step_ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
    return out


def timed(fn, seed):
    torch.manual_seed(seed)
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(name, model, tokenizer, batch, tokens, seed):
    from xecomla_cli.text.chat import left_pad, user_header
    from xecomla_cli.text.sampling import ThreadChoice, sample

    header = tokenizer(user_header(tokenizer), add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([header] * batch, 0, "cpu")
    load0 = os.getloadavg()[0]
    base, t_base = timed(lambda: baseline_sample(model, ids, mask, tokens, 1.0), seed)
    choice = ThreadChoice(ids.device)
    new, t_new = timed(lambda: sample(model, ids, mask, tokens, [], 1.0, threads=choice), seed)
    return {
        "model": name,
        "batch": batch,
        "new_tokens": tokens,
        "prompt_tokens": len(header),
        "baseline_tokens_per_s": round(batch * tokens / t_base, 1),
        "tokens_per_s": round(batch * tokens / t_new, 1),
        "speedup": round(t_base / t_new, 2),
        "threads_chosen": choice.best(),
        "same_tokens": bool(torch.equal(base, new)),
        "load_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student", help="an MLA stage checkpoint, sampled the same way (latent cache)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from xecomla_cli.sources import load_model

    results = {"device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32", "runs": []}
    for name in ["demo"] + ([args.student] if args.student else []):
        lm = load_model(name, dtype="float32")
        results["runs"].append(measure(name, lm.model, lm.tokenizer, args.batch, args.tokens, args.seed))
        print(json.dumps(results["runs"][-1]), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
