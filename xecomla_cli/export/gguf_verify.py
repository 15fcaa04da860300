"""Verification of a written GGUF in the real llama.cpp before it is renamed into place.

1. Tokens: llama.cpp tokenises sample texts (digits, punctuation, non-ASCII, runs of spaces and
   newlines; plus a chat-template rendering with its special tokens) into exactly transformers' ids.
2. Logits (llama.cpp with an f32 KV cache): on several prompts (ids from transformers) every position's
   logits agree with xecomla's model whose weights are rounded to the GGUF's types, within ``allowed``.
3. Greedy: a continuation decoded greedily by llama.cpp is the one transformers' ``generate`` gives,
   unless they part at a near tie (our top-2 gap at that step below ``allowed``), which is reported.

The tolerance. llama.cpp rounds activations to the weights' type before each product (f16, bf16,
q8_0), which the reference does not; that error is of the size of the weight rounding's own effect.
So ``allowed`` = max(VERIFY_RTOL[outtype] · max|logit|, 2 · |logits(fp32 weights) − logits(rounded)|).
A mapping error (a wrong transpose, RoPE layout or norm) moves logits by O(max|logit|).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import XecomlaError
from .gguf_writer import OutType, rounded
from .llama_cpp_build import SETUP_HINT, llama_cpp_bin

VERIFY_RTOL = {"f32": 1e-3, "f16": 1e-2, "bf16": 2e-2, "q8_0": 2e-2}
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day?",
    "In 2024, 1234567 people paid $3.50 each -- that's 4,320,184.5 dollars!\n\n  Indented   text\tand tabs.",
    "Multi-head latent attention (MLA) caches one vector per token: naïve café, Ünïcödé, 東京, emoji 🦙.",
]
PROMPTS = SAMPLE_TEXTS[:2] + ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))"]
GREEDY_PROMPT = "Once upon a time"
NEW_TOKENS = 16


def _chat_text(tokenizer) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "It is 42."}]
    return [tokenizer.apply_chat_template(messages, tokenize=False)]


def run_llama_cpp(path: Path, request: dict, timeout: float = 600) -> dict[str, np.ndarray]:
    """Run ``gguf_llama_run.py`` on the file; one line naming llama.cpp's complaint if it refuses it."""
    lib = llama_cpp_bin()
    request = {**request, "model": str(path), "lib": str(lib) if (lib / "libllama.so").is_file() else None}
    with tempfile.TemporaryDirectory(prefix="xecomla-gguf-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.npz"
        req.write_text(json.dumps(request))
        script = Path(__file__).with_name("gguf_llama_run.py")
        env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
        proc = subprocess.run(
            [sys.executable, str(script), str(req), str(res)], capture_output=True, text=True, timeout=timeout, env=env
        )
        if proc.returncode != 0:
            if "No module named 'llama_cpp'" in proc.stderr:
                raise XecomlaError(f"llama.cpp's Python bindings are not installed: {SETUP_HINT}")
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise XecomlaError(
                f"llama.cpp refused the GGUF (exit {proc.returncode}: {' | '.join(lines[-2:])[:300]}): "
                "nothing was written; report this with the checkpoint's xecomla.json"
            )
        with np.load(res) as data:
            return {k: data[k] for k in data.files}


def _round_weights(model, outtype: OutType) -> dict[str, torch.Tensor]:
    """Round every matrix of ``model`` to the GGUF's stored values in place; returns the originals."""
    saved = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.dim() >= 2 and not name.endswith("rope_inv_freq"):
            saved[name] = t.clone()
            t.copy_(torch.from_numpy(rounded("x.weight", t.float().cpu().numpy(), outtype)).to(t))
    return saved


@torch.no_grad()
def verify_gguf(path: Path, loaded, outtype: OutType, threads: int = 2) -> dict[str, Any]:
    """Compare the GGUF in llama.cpp with xecomla's model; raise one line on any disagreement."""
    tok = loaded.tokenizer
    model = loaded.model
    texts = SAMPLE_TEXTS
    special = _chat_text(tok)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    greedy_ids = tok(GREEDY_PROMPT)["input_ids"]
    request = {
        "texts": texts,
        "special_texts": special,
        "prompts": prompts,
        "greedy": greedy_ids,
        "new_tokens": NEW_TOKENS,
        "threads": threads,
        "kv_type": 0,  # an f32 cache: llama.cpp's default f16 cache rounds the latent (~1e-3), a serving choice
    }
    theirs = run_llama_cpp(path, request)

    for i, text in enumerate(texts + special):
        ours = tok(text)["input_ids"]
        got = theirs[f"tokens_{i}" if i < len(texts) else f"special_{i - len(texts)}"].tolist()
        if got != ours:
            at = next((j for j, (a, b) in enumerate(zip(ours, got, strict=False)) if a != b), min(len(ours), len(got)))
            raise XecomlaError(
                f"llama.cpp tokenises sample text {i} differently from transformers (first difference at token "
                f"{at}: {ours[at : at + 3]} vs {got[at : at + 3]}): nothing was written; export --format hf instead"
            )

    def logits(ids):
        return model(torch.tensor([ids])).logits[0].float()

    exact = [logits(ids) for ids in prompts]
    saved = _round_weights(model, outtype)
    try:
        ref = [logits(ids) for ids in prompts]
        gen = model.generate(
            torch.tensor([greedy_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id or 0
        )[0, len(greedy_ids) :].tolist()
        full = logits(greedy_ids + gen)
    finally:
        state = model.state_dict()
        for name, t in saved.items():
            state[name].copy_(t)
    scale = max(r.abs().max().item() for r in ref)
    noise = max((a - b).abs().max().item() for a, b in zip(exact, ref, strict=True))
    diff = max((r - torch.from_numpy(theirs[f"logits_{i}"])).abs().max().item() for i, r in enumerate(ref))
    allowed = max(VERIFY_RTOL[OutType(outtype).value] * scale, 2 * noise)
    report: dict[str, Any] = {
        "tokens_equal": True,
        "texts": len(texts) + len(special),
        "prompts": len(prompts),
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "weight_rounding_effect": noise,
        "allowed": allowed,
        "kv_mib": float(theirs["kv_mib"][0]),
        "kv_cells": int(theirs["kv_cells"][0]),
    }
    if diff > allowed:
        raise XecomlaError(
            f"llama.cpp's logits differ from xecomla's by {diff:.3g} (max |logit| {scale:.3g}, allowed {allowed:.3g}):"
            " nothing was written; report this with the checkpoint's xecomla.json"
        )
    got = theirs["greedy"].tolist()
    report["greedy_tokens"] = len(gen)
    report["greedy_tokens_equal"] = got == gen
    if got != gen:
        at = next((j for j, (a, b) in enumerate(zip(gen, got, strict=False)) if a != b), min(len(gen), len(got)))
        step = full[len(greedy_ids) - 1 + at]
        top2 = step.topk(2).values
        gap = (top2[0] - top2[1]).item()
        if gap > allowed:
            raise XecomlaError(
                f"llama.cpp's greedy continuation departs from transformers' at token {at} (our top-2 gap {gap:.3g} "
                f"> allowed {allowed:.3g}): nothing was written; report this with the checkpoint's xecomla.json"
            )
        report["greedy_tie_at"] = at
        report["greedy_tie_gap"] = gap
    return report
