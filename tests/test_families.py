"""The families people convert, served with the saving: a Llama-3.x-shaped source (llama3 RoPE past a
small original context, tied embeddings) and a Qwen2.x-shaped one (q/k/v biases).

init-svd's default makes both engine-exact (``init.engine_ready``): the MLA's RoPE dims turn as default
RoPE, the biases are folded. The exports then run in llama.cpp as in stock transformers at every
position, and the engine table says so; the math of the construction is checked on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, calib_ids, make_model, make_tokenizer, save_model
from test_export_gguf import llama_cpp_logits, needs_llama_cpp

from xecomla_cli.checkpoint import load_checkpoint, save_checkpoint
from xecomla_cli.engines import engine_support
from xecomla_cli.errors import XecomlaError
from xecomla_cli.export import export_checkpoint
from xecomla_cli.export.gguf_export import export_gguf
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.engine_ready import constant_direction, default_rope_span, fold_state_biases
from xecomla_cli.mla.rope import default_inv_freq, model_inv_freq, unscaled_pairs

# Llama-3.2-1B's RoPE (original context 8192) and a tiny one whose scaling starts at 64 positions
LLAMA32_1B_ROPE = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
FAMILIES = {
    "llama3": ("llama", {"rope_parameters": dict(LLAMA3_ROPE), "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
}
POSITIONS = 300  # past LLAMA3_ROPE's original context (64): the scaled frequencies matter there


def family_ckpt(tmp_path: Path, name: str, method: str = "transmla", **spec_kw) -> Path:
    """init-svd's defaults (biases folded, the library's default being to keep them) on a family's tiny model."""
    spec_kw.setdefault("attention_bias", "fold")
    family, overrides = FAMILIES[name]
    model = make_model(family, head_dim=32, **overrides)
    spec = build_spec(model.config, kv_rank=24, rope_dim=16, latent_norm=True, method=method, **spec_kw)
    spec = convert_model(model, spec, method=method, calib_ids=calib_ids(4, 64))
    with torch.no_grad():  # a latent norm as after training, not the init's
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.mul_(
                torch.empty_like(layer.self_attn.kv_a_layernorm.weight).uniform_(0.7, 1.4)
            )
    return save_checkpoint(
        tmp_path / f"ckpt-{name}", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source=name
    )


# ---- RoPE -------------------------------------------------------------------------------------------------
def test_llama3_unscaled_pairs_and_the_default_span():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=LLAMA32_1B_ROPE,
    )
    assert unscaled_pairs(config, 64) == 15  # wavelength below 8192 / 4 up to pair 14 (θ = 500000, h = 64)
    scaled, _ = model_inv_freq(config, 64)
    plain = default_inv_freq(500000.0, 64)
    assert torch.equal(scaled[:15], plain[:15]) and bool((scaled[18:] == plain[18:] / 32).all())
    assert default_rope_span(15, 64, 32) == 16 and default_rope_span(15, 64, 16) == 16  # nearest multiple of p/2
    assert default_rope_span(29, 128, 64) == 32 == default_rope_span(29, 128, 32)  # Llama-3-8B-like
    assert default_rope_span(32, 64, 32) is None  # every pair
    assert unscaled_pairs(LlamaConfig(head_dim=64, num_attention_heads=32), 64) == 32  # default RoPE: all


@pytest.mark.parametrize("method", ["transmla", "deepseek", "paper"])
def test_a_llama3_source_gets_default_rope_the_export_writes_as_default(tmp_path, method):
    ckpt = family_ckpt(tmp_path, "llama3", method=method)
    loaded = load_checkpoint(ckpt)
    assert loaded.spec.rope_frequencies == "default"
    assert loaded.spec.rope_span == (8 if method == "transmla" else None)  # p/2: only 1 pair is unscaled here
    result = export_checkpoint(ckpt, tmp_path / "hf")
    params = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]
    assert params["rope_type"] == "default" and set(params) == {"rope_type", "rope_theta"}
    for layer in loaded.model.model.layers:  # exactly the frequencies every engine computes from the config
        assert torch.allclose(layer.self_attn.rope_inv_freq, default_inv_freq(params["rope_theta"], 16), rtol=1e-6)
    assert result.verify["greedy_tokens_equal"] and result.plan.portable
    rows = {r["engine"]: r for r in result.engines}
    assert (
        all(rows[e]["latent"] for e in ("transformers", "SGLang (Triton)"))
        and "default RoPE" in rows["SGLang (Triton)"]["note"]
    )


def test_source_frequencies_are_exact_in_transformers_and_refused_or_flagged_for_the_engines(tmp_path):
    ckpt = family_ckpt(tmp_path, "llama3", method="deepseek", rope_frequencies="source")
    result = export_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    assert result.verify["greedy_tokens_equal"] and not result.plan.portable
    rows = {r["engine"]: r for r in result.engines}
    assert rows["transformers"]["latent"]
    for engine in ("llama.cpp", "vLLM", "SGLang (Triton)"):  # none may claim the latent for a wrong model
        assert rows[engine]["values_per_token"] is None and not rows[engine]["latent"], engine
    assert "YaRN" in rows["vLLM"]["note"] and "YaRN" in rows["SGLang (Triton)"]["note"]
    with pytest.raises(XecomlaError, match="--portable"):
        export_checkpoint(ckpt, tmp_path / "hf2", portable=True)


def test_gguf_refuses_what_the_config_decides_before_loading_weights(tmp_path, monkeypatch):
    ckpt = family_ckpt(tmp_path, "llama3", method="deepseek", rope_frequencies="source")
    import xecomla_cli.sources as sources

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(sources, "load_model", no_load)
    with pytest.raises(XecomlaError, match="llama3 frequency factors"):
        export_gguf(str(ckpt), tmp_path / "x.gguf")
    kept = family_ckpt(tmp_path, "qwen2", attention_bias="keep")
    with pytest.raises(XecomlaError, match="attention has biases"):
        export_gguf(str(kept), tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf"))


# ---- biases -----------------------------------------------------------------------------------------------
def test_the_no_rope_key_bias_is_softmax_invariant(tmp_path):
    """Dropping the up-projection's key bias (no-RoPE dims) changes no attention output."""
    from xecomla_cli.init.engine_ready import attention_error

    model = make_model("qwen2", head_dim=32)
    spec = build_spec(
        model.config, kv_rank=24, rope_dim=16, latent_norm=False, method="deepseek", attention_bias="keep"
    )
    convert_model(model, spec, method="deepseek", calib_ids=calib_ids())
    attn = model.model.layers[1].self_attn
    import copy

    dropped = copy.deepcopy(attn)
    with torch.no_grad():
        b = dropped.kv_b_proj.bias.view(spec.num_heads, spec.nope_dim + spec.head_dim)
        assert bool(b[:, : spec.nope_dim].ne(0).any())
        b[:, : spec.nope_dim] = 0
    x = torch.randn(2, 40, spec.hidden_size)
    assert attention_error(dropped, attn, [x]) < 1e-6


def test_folding_is_exact_where_the_input_has_a_constant_direction():
    """W x + b = (W + b uᵀ) x when uᵀx = 1 for every token; the fit finds u from the statistics."""
    d = 16
    x = torch.randn(500, d, dtype=torch.float64)
    x[:, 3] = 2.0  # a constant coordinate (the "massive activation")
    cov, mean = x.T @ x / len(x), x.mean(0)
    u = constant_direction(cov, mean, ridge=1e-9)
    assert float((x.float() @ u - 1).abs().max()) < 1e-4
    w, b = torch.randn(8, d), torch.randn(8)
    sd = {"q_proj.weight": w.clone(), "q_proj.bias": b.clone(), "kv_b_proj.bias": torch.zeros(2 * (4 + 4))}
    fold_state_biases(sd, u, nope_dim=4, head_dim=4)
    assert set(sd) == {"q_proj.weight"}
    torch.testing.assert_close(x.float() @ sd["q_proj.weight"].T, x.float() @ w.T + b, atol=1e-3, rtol=1e-4)


def test_qwen2_folds_its_biases_and_records_the_error_per_layer(tmp_path):
    ckpt = family_ckpt(tmp_path, "qwen2")
    loaded = load_checkpoint(ckpt)
    spec = loaded.spec
    assert spec.attention_bias == "folded" and spec.rope_frequencies is None
    errors = spec.bias_fold["attention_error"]
    assert sorted(errors) == ["0", "1", "2"] and all(0 <= e < 1 for e in errors.values())
    names = [n for n, _ in loaded.model.named_parameters() if "self_attn" in n and n.endswith("bias")]
    assert names == []
    assert export_checkpoint(ckpt, tmp_path / "hf").plan.portable


# ---- the engines ------------------------------------------------------------------------------------------
@needs_llama_cpp
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_llama_cpp_agrees_with_transformers_past_the_original_context(tmp_path, name):
    """init -> export (hf) and export --format gguf: llama.cpp's logits at every one of 300 positions
    within 1e-2 of max |logit| of stock transformers' on the HF export, the same argmax everywhere."""
    from transformers import AutoModelForCausalLM

    ckpt = family_ckpt(tmp_path, name)
    export_checkpoint(ckpt, tmp_path / "hf")
    gguf = export_gguf(str(ckpt), tmp_path / "m.gguf", outtype="f32")
    assert gguf.arch == "deepseek2" and gguf.verify["greedy_tokens_equal"]
    ids = torch.randint(3, 300, (POSITIONS,), generator=torch.Generator().manual_seed(7)).tolist()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = stock(torch.tensor([ids])).logits[0].numpy()
    ours = llama_cpp_logits(tmp_path / "m.gguf", ids, n_ctx=512)
    assert np.abs(ours - theirs).max() <= 1e-2 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_the_engine_table_tells_the_truth_for_the_families(tmp_path):
    from test_cli import run

    for family, overrides, note in (
        ("llama", {"rope_parameters": dict(LLAMA3_ROPE)}, "default RoPE"),
        ("qwen2", {}, "biases folded"),
    ):
        src = save_model(make_model(family, **overrides), tmp_path / family)
        report = json.loads(run("inspect", str(src), "--ranks", "8", "--json").stdout)
        rows = {r["engine"]: r for r in report["engines"]["by_rank"][0]["rows"]}
        for engine in ("transformers", "llama.cpp", "SGLang (Triton)"):
            assert rows[engine]["latent"] and note in rows[engine]["note"], (family, engine)
        assert not rows["vLLM"]["latent"] and "MORE than the original" in rows["vLLM"]["note"]
    spec = build_spec(
        make_model("llama", rope_parameters=dict(LLAMA3_ROPE)).config, kv_rank=8, rope_frequencies="source"
    )
    rows = {r.engine: r for r in engine_support(spec, rope_type="llama3")}
    assert [e for e, r in rows.items() if r.values_per_token is not None] == ["xecomla", "transformers"]
