"""The llama.cpp side of the GGUF verification, run as a child process so that a file llama.cpp
refuses (or a ggml assertion that aborts) cannot take the export down with it:

    python .../export/gguf_llama_run.py REQUEST.json RESULT.npz   (by path: no package import)

REQUEST: {"model": path, "lib": the llama.cpp libraries (or null), "texts": [str] (tokenised plain),
"special_texts": [str] (special tokens parsed), "prompts": [[ids]] (all-position logits), "greedy": [ids],
"new_tokens": n, "threads": n, "kv_type": ggml type of the KV cache (0: f32), optional "n_ctx", "flash_attn"}.
RESULT: tokens_<i>, special_<i>, logits_<i>, greedy, kv_mib and kv_cells (the cache llama.cpp allocated: MiB to
two decimals, and its cells, a multiple of 256).
Only numpy and the llama_cpp bindings are imported here (no torch): the child starts in about a second.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import numpy as np


def _capture_stderr():
    """Redirect fd 2 (llama.cpp logs there) to a temp file; returns (file, saved fd)."""
    log = tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    return log, saved


def _restore_stderr(log, saved) -> str:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    log.seek(0)
    return log.read().decode(errors="replace")


def main(request_path: str, result_path: str) -> int:
    req = json.loads(open(request_path).read())
    if req.get("lib"):
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", req["lib"])
    import llama_cpp

    n_ctx = req.get("n_ctx") or max([len(p) for p in req["prompts"]] + [len(req["greedy"]) + req["new_tokens"], 64]) + 8
    log, saved = _capture_stderr()
    try:
        llm = llama_cpp.Llama(
            model_path=req["model"],
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=req["threads"],
            type_k=req.get("kv_type"),
            type_v=req.get("kv_type"),
            flash_attn=bool(req.get("flash_attn", False)),
            verbose=True,
            seed=0,
        )
    except Exception as exc:  # the bindings raise ValueError("Failed to load model ...")
        text = _restore_stderr(log, saved)
        errors = [line for line in text.splitlines() if re.search(r"error|exception|failed|assert", line, re.I)]
        print(json.dumps({"error": f"{exc}", "log": errors[-3:]}), file=sys.stderr)
        return 3
    text = _restore_stderr(log, saved)
    kv = re.findall(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells", text)
    mib, cells = (float(kv[-1][0]), int(kv[-1][1])) if kv else (-1.0, -1)
    out = {"kv_mib": np.array([mib]), "kv_cells": np.array([cells])}
    for i, s in enumerate(req["texts"]):
        out[f"tokens_{i}"] = np.array(llm.tokenize(s.encode(), add_bos=True, special=False), dtype=np.int64)
    for i, s in enumerate(req["special_texts"]):
        out[f"special_{i}"] = np.array(llm.tokenize(s.encode(), add_bos=True, special=True), dtype=np.int64)
    for i, ids in enumerate(req["prompts"]):
        llm.reset()
        llm.eval(ids)
        out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.reset()
    llm.eval(req["greedy"])
    generated = []
    for _ in range(req["new_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    out["greedy"] = np.array(generated, dtype=np.int64)
    np.savez(result_path, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
