"""Sources, stage checkpoints and inspect: loading, validation, atomic writes, energy numbers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_model, save_model

from xecomla_cli import checkpoint
from xecomla_cli.errors import XecomlaError
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.inspection import inspect
from xecomla_cli.loaded import parse_device, parse_dtype
from xecomla_cli.sources import load_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mha"])
def test_families_load(tiny_model_dir, family):
    lm = load_model(str(tiny_model_dir(family)))
    assert lm.family == ("llama" if family == "mha" else family)
    assert lm.model.config.num_key_value_heads == (4 if family == "mha" else 2)


def test_dtype_option(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(XecomlaError, match="unsupported architecture GPT2LMHeadModel.*llama, qwen2, mistral"):
        load_model(str(tmp_path))


def test_bad_sources_give_one_clear_line(tmp_path):
    with pytest.raises(XecomlaError, match="no such model"):
        load_model("./does-not-exist")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(XecomlaError, match="not a .gguf"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(XecomlaError, match="neither config.json"):
        load_model(str(tmp_path))
    with pytest.raises(XecomlaError, match="unknown dtype"):
        parse_dtype("int3")
    if not torch.cuda.is_available():
        with pytest.raises(XecomlaError, match="no CUDA GPU"):
            parse_device("cuda")


def test_hub_id_without_network_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(XecomlaError, match="cannot reach the Hugging Face Hub.*local directory"):
        load_model("meta-llama/Llama-3.2-1B-Instruct")


def test_hub_id_from_local_cache(monkeypatch, tmp_path):
    """A Hub id resolves through huggingface_hub's cache, without network."""
    import huggingface_hub

    model_dir = save_model(make_model("llama"), tmp_path / "snap")
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append(local_files_only)
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    lm = load_model("someone/tiny-llama")
    assert lm.family == "llama" and calls == [True]


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.fixture()
def converted(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")))
    spec = build_spec(lm.model.config, kv_rank=16)
    spec = convert_model(lm.model, spec)
    return lm, spec


def test_checkpoint_round_trip_is_bit_exact(converted, tmp_path):
    lm, spec = converted
    out = checkpoint.save_checkpoint(
        tmp_path / "ck",
        model=lm.model,
        tokenizer=lm.tokenizer,
        stage="init-svd",
        spec=spec,
        source="tiny",
        metrics={"x": 1},
    )
    back = load_model(str(out))
    assert back.is_mla and back.spec == spec and back.meta["stage"] == "init-svd"
    a, b = lm.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 300, (1, 8))
    assert torch.equal(lm.model(ids).logits, back.model(ids).logits)
    meta = json.loads((out / "xecomla.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["source"] == "tiny"
    assert meta["mla"]["cache_values_per_token"]["per_layer"] == [24, 24, 24]
    assert meta["metrics"] == {"x": 1} and "command" in meta
    assert not list(tmp_path.glob(".ck*")), "temporary directories left behind"


def test_bf16_checkpoint_round_trip(converted, tmp_path):
    lm, spec = converted
    lm.model.to(torch.bfloat16)
    out = checkpoint.save_checkpoint(
        tmp_path / "ck", model=lm.model, tokenizer=lm.tokenizer, stage="init-svd", spec=spec, source="tiny"
    )
    back = checkpoint.load_checkpoint(out, dtype="auto")
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k


def test_sharded_checkpoint_loads(converted, tmp_path, monkeypatch):
    lm, spec = converted
    monkeypatch.setattr(checkpoint, "MAX_SHARD_SIZE", "100KB")
    out = checkpoint.save_checkpoint(
        tmp_path / "ck", model=lm.model, tokenizer=lm.tokenizer, stage="init-svd", spec=spec, source="tiny"
    )
    assert (out / checkpoint.INDEX_FILE).is_file() and len(list(out.glob("*.safetensors"))) > 1
    back = load_model(str(out))
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])


def test_refuses_overwrite_without_force(converted, tmp_path):
    lm, spec = converted
    kw = dict(model=lm.model, tokenizer=lm.tokenizer, stage="init-svd", spec=spec, source="tiny")
    out = checkpoint.save_checkpoint(tmp_path / "ck", **kw)
    with pytest.raises(XecomlaError, match="already exists.*--force"):
        checkpoint.save_checkpoint(out, **kw)
    checkpoint.save_checkpoint(out, force=True, **{**kw, "metrics": {"second": True}})
    assert checkpoint.read_meta(out)["metrics"] == {"second": True}


def test_failed_write_leaves_nothing(converted, tmp_path):
    lm, spec = converted

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(
            tmp_path / "ck",
            model=lm.model,
            tokenizer=lm.tokenizer,
            stage="init-svd",
            spec=spec,
            source="tiny",
            write_extra=boom,
        )
    assert list(tmp_path.iterdir()) == []


def test_validation_errors(converted, tmp_path):
    lm, spec = converted
    out = checkpoint.save_checkpoint(
        tmp_path / "ck", model=lm.model, tokenizer=lm.tokenizer, stage="init-svd", spec=spec, source="tiny"
    )
    with pytest.raises(XecomlaError, match="does not exist"):
        checkpoint.read_meta(tmp_path / "nope")
    bad = tmp_path / "v2"
    shutil.copytree(out, bad)
    meta = json.loads((bad / "xecomla.json").read_text())
    meta["format_version"] = 99
    (bad / "xecomla.json").write_text(json.dumps(meta))
    with pytest.raises(XecomlaError, match="format version 99"):
        load_model(str(bad))
    (bad / "xecomla.json").write_text("{not json")
    with pytest.raises(XecomlaError, match="not valid JSON"):
        load_model(str(bad))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(XecomlaError, match="corrupt"):
        load_model(str(corrupt))
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(XecomlaError, match="no model.safetensors"):
        load_model(str(corrupt))


def test_record_metrics_merges(converted, tmp_path):
    lm, spec = converted
    out = checkpoint.save_checkpoint(
        tmp_path / "ck",
        model=lm.model,
        tokenizer=lm.tokenizer,
        stage="init-svd",
        spec=spec,
        source="tiny",
        metrics={"a": 1},
    )
    checkpoint.record_metrics(out, {"b": 2})
    assert checkpoint.read_meta(out)["metrics"] == {"a": 1, "b": 2}


# ---- inspect --------------------------------------------------------------------------------------
def test_inspect_energy_matches_independent_svd(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("llama")))
    report = inspect(lm, ranks=[8, 16, 32], context=1000, batch=2)
    assert report["architecture"]["attention"] == "GQA"
    assert report["kv_cache"]["values_per_token_per_layer"] == 2 * 2 * 16
    assert report["kv_cache"]["gb"] == pytest.approx(64 * 3 * 4 * 1000 * 2 / 1e9)
    for row in report["budget"]:
        r = row["rank"]
        assert row["cache_values_per_token_per_layer"] == r + 8
        assert row["compression"] == pytest.approx(64 / (r + 8))
        for i, layer in enumerate(lm.model.model.layers):
            m = torch.cat([layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]).detach().double()
            s = torch.linalg.svdvals(m) ** 2
            assert row["energy_per_layer"][i] == pytest.approx(float(s[:r].sum() / s.sum()), abs=1e-5)
    for ranks in report["rank_for_energy"].values():
        assert all(r % 8 == 0 for r in ranks)
