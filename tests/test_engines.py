"""engines.engine_support: which engines keep the latent cache, for known widths (pure, no model)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import calib_ids, make_model, make_tokenizer

from xecomla_cli.checkpoint import save_checkpoint
from xecomla_cli.engines import engine_support
from xecomla_cli.export import export_checkpoint
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.mla.spec import MLASpec

DEMO = {"num_layers": 30, "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}  # SmolLM2-135M
LLAMA3_8B = {"num_layers": 32, "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128}


def by_engine(spec: MLASpec, **kwargs) -> dict:
    return {row.engine: row for row in engine_support(spec, **kwargs)}


def spec_of(shape: dict, ranks: list, p: int, latent_norm: bool = True) -> MLASpec:
    return MLASpec(**shape, rope_dim=p, kv_ranks=ranks, latent_norm=latent_norm)


def test_width_96_keeps_the_latent_everywhere_but_vllm():
    rows = by_engine(spec_of(DEMO, [64] * 30, 32))  # r + p = 96 against the original 2·3·64 = 384
    for name in ("xecomla", "transformers", "llama.cpp", "SGLang (Triton)"):
        assert rows[name].latent and rows[name].values_per_token == 96 * 30 and rows[name].compression == 4.0
    vllm = rows["vLLM"]
    assert not vllm.latent and not vllm.saves
    assert vllm.values_per_token == 2 * 9 * 64 * 30  # VLLM_MLA_DISABLE=1: per-head K and V of all 9 heads
    assert "VLLM_MLA_DISABLE=1" in vllm.note and "3.0x MORE than the original's 384" in vllm.note
    assert "--latent-width 320 keeps MLA in vLLM on GPU (1.20x)" in vllm.note  # 576 would not save here


def test_width_576_is_native_to_vllm_on_cpu_and_gpu():
    rows = by_engine(spec_of(LLAMA3_8B, [512] * 32, 64))
    assert all(r.latent and r.values_per_token == 576 * 32 for r in rows.values())
    assert rows["vLLM"].compression == pytest.approx(2048 / 576)
    assert "GPU and CPU" in rows["vLLM"].note and not rows["vLLM"].only
    other_split = by_engine(spec_of(LLAMA3_8B, [544] * 32, 32))["vLLM"]  # 576 too, but not 512 + 64
    assert other_split.latent and other_split.only == "GPU" and "CPU decodes only 512 + 64" in other_split.note


def test_width_320_is_vllm_gpu_only():
    vllm = by_engine(spec_of(LLAMA3_8B, [256] * 32, 64))["vLLM"]
    assert vllm.latent and vllm.values_per_token == 320 * 32
    assert "GPU only" in vllm.note


def test_no_latent_norm_keeps_the_saving_only_in_transformers_and_xecomla():
    rows = by_engine(spec_of(DEMO, [64] * 30, 32, latent_norm=False))
    assert rows["xecomla"].values_per_token == 96 * 30
    assert rows["transformers"].latent and rows["transformers"].values_per_token == 97 * 30  # + constant channel
    for name in ("llama.cpp", "vLLM", "SGLang (Triton)"):
        assert rows[name].values_per_token is None and "--latent-norm" in rows[name].note


def test_hybrid_runs_only_in_xecomla():
    ranks = [64] * 20 + [None] * 10
    rows = by_engine(spec_of(DEMO, ranks, 32))
    assert rows["xecomla"].values_per_token == 96 * 20 + 384 * 10
    others = [r for name, r in rows.items() if name != "xecomla"]
    assert all(r.values_per_token is None and "hybrid" in r.note for r in others)


def test_per_layer_ranks_are_padded_outside_xecomla():
    rows = by_engine(spec_of(DEMO, [32] * 15 + [64] * 15, 32))
    assert rows["xecomla"].values_per_token == (64 * 15 + 96 * 15)
    for name in ("transformers", "llama.cpp"):
        assert rows[name].values_per_token == 96 * 30 and "--pad-ranks" in rows[name].note


def test_export_padding_and_blockers():
    spec = spec_of(DEMO, [64] * 30, 32)
    padded = by_engine(spec, kv_lora_rank=544)  # export --latent-width 576
    assert padded["vLLM"].latent and padded["vLLM"].values_per_token == 576 * 30 and not padded["vLLM"].saves
    assert padded["llama.cpp"].values_per_token == 96 * 30  # the GGUF is not padded
    blocked = by_engine(spec, blocker="the attention has q/k/v biases")
    assert blocked["xecomla"].latent and all(
        r.values_per_token is None for name, r in blocked.items() if name != "xecomla"
    )
    assert by_engine(spec, rope_type="llama3")["llama.cpp"].values_per_token is None
    assert by_engine(spec, rope_type="yarn")["llama.cpp"].values_per_token is None


def test_inspect_prints_the_engine_table(tiny_model_dir):
    from test_cli import run

    proc = run("inspect", str(tiny_model_dir("llama")), "--ranks", "8,16", "--json")
    engines = json.loads(proc.stdout)["engines"]
    assert [item["rank"] for item in engines["by_rank"]] == [8, 16]
    rows = {r["engine"]: r for r in engines["by_rank"][0]["rows"]}
    assert rows["llama.cpp"]["latent"] and rows["vLLM"]["latent"] is False
    assert "Where the saving holds" in proc.stderr and "expanded" in proc.stderr
    qwen = json.loads(run("inspect", str(tiny_model_dir("qwen2")), "--ranks", "8", "--json").stdout)
    rows = qwen["engines"]["by_rank"][0]["rows"]  # init-svd folds Qwen2's biases: every engine loads the export
    assert [r["values_per_token"] is None for r in rows] == [False] * 5
    assert all("biases folded" in r["note"] for r in rows if r["engine"] != "xecomla")


def test_a_1b_model_is_told_which_vllm_width_saves():
    llama_1b = {"num_layers": 16, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8, "head_dim": 64}
    vllm = by_engine(spec_of(llama_1b, [128] * 16, 32))["vLLM"]  # 160 wide: refused by vLLM's MLA
    assert not vllm.latent and "4.0x MORE than the original's 1024" in vllm.note
    assert "--latent-width 576 keeps MLA in vLLM, GPU and CPU (1.78x)" in vllm.note


def test_stock_transformers_caches_the_latent_as_the_table_says(tmp_path):
    """The transformers row is true: DeepseekV3's cache holds kv_lora_rank + p values per token per layer."""
    from transformers import AutoModelForCausalLM

    model = make_model("llama", num_hidden_layers=2)
    spec = build_spec(model.config, kv_rank=16, latent_norm=True)
    spec = convert_model(model, spec, calib_ids=calib_ids())
    ckpt = save_checkpoint(
        tmp_path / "ck", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="tiny"
    )
    result = export_checkpoint(ckpt, tmp_path / "hf", verify=False)
    row = {r["engine"]: r for r in result.to_dict()["engines"]}["transformers"]
    stock = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = stock(torch.tensor([[5, 6, 7, 8, 9]]), use_cache=True).past_key_values
    per_layer = [lay.keys[0, :, 0].numel() + lay.values[0, :, 0].numel() for lay in cache.layers]
    assert row["latent"] and row["values_per_token"] == sum(per_layer) == 2 * (16 + spec.rope_dim)
