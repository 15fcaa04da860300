"""`xecomla export --format gguf`: llama.cpp GGUFs checked in the real llama.cpp that `make setup` builds.

deepseek2 for MLA checkpoints (tiny Llama and Mistral with a latent norm), llama for original models
(Llama, and Qwen2 with its q/k/v biases); refusals are one line and write nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, calib_ids, make_model, make_tokenizer, save_model

from xecomla_cli.checkpoint import load_checkpoint, save_checkpoint
from xecomla_cli.errors import XecomlaError
from xecomla_cli.export.gguf_export import export_gguf
from xecomla_cli.export.gguf_tokenizer import pre_tokenizer_name
from xecomla_cli.export.llama_cpp_build import llama_cpp_available
from xecomla_cli.init import build_spec, convert_model

needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama.cpp's bindings are not built: run `make setup`"
)
PROMPT = [5, 17, 42, 99, 7, 123, 250, 3, 64, 11, 200, 31]


def mla_ckpt(
    tmp_path: Path,
    family="llama",
    *,
    latent_norm=True,
    layers=None,
    ranks=None,
    method="paper",
    spec_kw: dict | None = None,
    **overrides,
) -> Path:
    """A tiny MLA checkpoint (r=16, p=8) whose latent norm is not all ones (as after training)."""
    model = make_model(family, **overrides)
    spec = build_spec(
        model.config, kv_rank=16, latent_norm=latent_norm, layers=layers, method=method, **(spec_kw or {})
    )
    if ranks is not None:
        spec.kv_ranks = list(ranks)
    calib = calib_ids() if latent_norm or method != "paper" or spec.biases_folded else None
    spec = convert_model(model, spec, method=method, calib_ids=calib)
    if latent_norm:
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "kv_a_layernorm") and layer.self_attn.kv_a_layernorm is not None:
                    layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 2.0)
    return save_checkpoint(
        tmp_path / f"ckpt-{family}", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="t"
    )


def nothing_written(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@torch.no_grad()
def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """All-position logits from the llama_cpp bindings in this process (independent of the verifier)."""
    from xecomla_cli.export.llama_cpp_build import import_llama_cpp

    llm = import_llama_cpp().Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0
    )  # an f32 KV cache (the default f16 one rounds the latent)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_mla_round_trip_f32_matches_in_llama_cpp(tmp_path, family):
    ckpt = mla_ckpt(tmp_path, family)
    out = tmp_path / "m.gguf"
    result = export_gguf(str(ckpt), out, outtype="f32")
    v = result.verify
    assert result.arch == "deepseek2" and out.is_file() and nothing_written(tmp_path, tmp_path / "other.gguf")
    assert v["tokens_equal"] and v["greedy_tokens_equal"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"]
    ours = load_checkpoint(ckpt).model(torch.tensor([PROMPT])).logits[0].detach().numpy()
    np.testing.assert_allclose(llama_cpp_logits(out, PROMPT), ours, rtol=0, atol=1e-4 * np.abs(ours).max())
    # llama.cpp caches the latent and the RoPE key only: 3 layers x (16 + 8) values per cell (f32 in the check)
    assert v["kv_mib"] == pytest.approx(3 * 24 * v["kv_cells"] * 4 / 2**20, abs=0.005)  # MiB to 2 decimals


@needs_llama_cpp
@pytest.mark.parametrize("method", ["deepseek+wide", "freqfold-4+bkv+drop"])
def test_wide_no_rope_dims_round_trip_in_llama_cpp(tmp_path, method):
    """n = h no-RoPE dims (n + p != h): the query scale is folded, llama.cpp computes our logits."""
    ckpt = mla_ckpt(tmp_path, method=method)
    result = export_gguf(str(ckpt), tmp_path / "w.gguf", outtype="f32")
    v = result.verify
    assert v["greedy_tokens_equal"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"]


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_mla_weight_types(tmp_path, outtype):
    ckpt = mla_ckpt(tmp_path, tie_word_embeddings=True)
    result = export_gguf(str(ckpt), tmp_path / "m.gguf", outtype=outtype)
    v = result.verify
    # llama.cpp also rounds activations to the weight type: the difference stays below the weights' own rounding effect
    assert v["tokens_equal"] and v["max_abs_logit_diff"] <= 0.5 * v["allowed"]
    assert v["max_abs_logit_diff"] <= v["weight_rounding_effect"] * 1.5
    stored = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert stored in result.tensor_types and "F32" in result.tensor_types  # matrices, and norms in f32


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_original_model_as_llama_arch(tmp_path, family):
    """The baseline for benchmarks: an original model (Qwen2 with its q/k/v biases) as llama.cpp's llama arch."""
    src = save_model(make_model(family), tmp_path / family)
    out = tmp_path / "o.gguf"
    result = export_gguf(str(src), out, outtype="f32")
    v = result.verify
    assert result.arch == "llama" and v["greedy_tokens_equal"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"]
    assert result.values_per_token_per_layer == 2 * 2 * 16  # K and V of 2 KV heads, head dim 16
    assert v["kv_mib"] == pytest.approx(3 * 64 * v["kv_cells"] * 4 / 2**20, abs=0.005)


@needs_llama_cpp
def test_original_llama3_rope_uses_rope_freqs(tmp_path):
    src = save_model(make_model("llama", rope_parameters=LLAMA3_ROPE), tmp_path / "l3")
    result = export_gguf(str(src), tmp_path / "o.gguf", outtype="f32")
    assert result.verify["max_abs_logit_diff"] < 1e-4 * result.verify["max_abs_logit"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: mla_ckpt(p, layers=[0, 1]), "keep their original attention"),
        (lambda p: mla_ckpt(p, ranks=[16, 8, 16]), "different latent ranks"),
        (lambda p: mla_ckpt(p, latent_norm=False), "no latent norm"),
        (lambda p: mla_ckpt(p, "qwen2", spec_kw={"attention_bias": "keep"}), "attention has biases"),
        (
            lambda p: mla_ckpt(p, spec_kw={"rope_frequencies": "source"}, rope_parameters=LLAMA3_ROPE),
            "llama3 frequency factors",
        ),
    ],
    ids=["hybrid", "per-layer-ranks", "no-latent-norm", "qwen2-biases", "llama3-rope"],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, make, match):
    ckpt = make(tmp_path)
    out = tmp_path / "x.gguf"
    with pytest.raises(XecomlaError, match=match) as err:
        export_gguf(str(ckpt), out, verify=False)
    assert "\n" not in str(err.value)
    assert nothing_written(tmp_path, out)


@needs_llama_cpp
def test_per_layer_ranks_export_with_pad_ranks(tmp_path):
    ckpt = mla_ckpt(tmp_path, ranks=[16, 8, 16])
    result = export_gguf(str(ckpt), tmp_path / "x.gguf", outtype="f32", pad_ranks=True)
    v = result.verify
    assert v["greedy_tokens_equal"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"]


@needs_llama_cpp
def test_a_file_llama_cpp_refuses_is_never_written(tmp_path, monkeypatch):
    import xecomla_cli.export.gguf_export as ge

    real = ge.deepseek2_params
    monkeypatch.setattr(ge, "deepseek2_params", lambda *a: {k: v for k, v in real(*a).items() if k != "q_lora_rank"})
    ckpt = mla_ckpt(tmp_path)
    out = tmp_path / "x.gguf"
    with pytest.raises(XecomlaError, match="llama.cpp refused the GGUF") as err:
        export_gguf(str(ckpt), out)
    assert "\n" not in str(err.value) and nothing_written(tmp_path, out)


@needs_llama_cpp
def test_a_tokenizer_mismatch_is_caught(tmp_path, monkeypatch):
    """BPE merges written in the wrong order (ranks reversed) must fail the token check."""
    import xecomla_cli.export.gguf_tokenizer as gt

    real = gt._merges
    monkeypatch.setattr(gt, "_merges", lambda model: real(model)[::-1])
    out = tmp_path / "x.gguf"
    with pytest.raises(XecomlaError, match=r"tokenises sample text \d differently"):
        export_gguf(str(mla_ckpt(tmp_path)), out)
    assert nothing_written(tmp_path, out)


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    with pytest.raises(XecomlaError, match="pre-tokenizes with"):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True})


@needs_llama_cpp
def test_cli_writes_the_gguf_and_refuses_in_one_line(tmp_path):
    ckpt = mla_ckpt(tmp_path)
    out = tmp_path / "cli.gguf"
    cmd = [sys.executable, "-m", "xecomla_cli", "export", str(ckpt), "--format", "gguf", "--outtype", "q8_0"]
    done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and out.is_file()
    again = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr and again.stdout == ""
