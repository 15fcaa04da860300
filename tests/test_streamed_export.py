"""The streamed stages (#37): export (hf, gguf) reads a checkpoint one decoder layer at a time and writes the same
tensors, bit for bit, as the in-memory path; every refusal the config decides comes before any weight is read;
inspect reads one layer's K/V at a time and reports what the in-memory inspect reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LLAMA3_ROPE, make_model, make_tokenizer, save_model
from safetensors.torch import load_file
from test_export import make_ckpt
from test_export_gguf import mla_ckpt

from xecomla_cli.checkpoint import load_checkpoint, save_checkpoint
from xecomla_cli.checkpoint_on_disk import CheckpointOnDisk, open_checkpoint
from xecomla_cli.errors import XecomlaError
from xecomla_cli.export import export_checkpoint, plan_export
from xecomla_cli.export import write as export_write
from xecomla_cli.export.gguf_export import export_gguf
from xecomla_cli.export.weights import deepseek_state_dict
from xecomla_cli.inspection import inspect, inspect_source
from xecomla_cli.sources import load_model
from xecomla_cli.weights_on_disk import WeightsOnDisk


def written_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(directory / f))
    return state


def assert_bit_exact(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


STREAMED_CASES = {
    # name: (make_ckpt kwargs, export kwargs)
    "identity-untied": ({}, {}),
    "norm-tied-bf16": ({"latent_norm": True, "tie_word_embeddings": True}, {"dtype": "bfloat16"}),
    "qrank-identity": ({"q_rank": 24}, {}),
    "qrank-norm-padded": ({"q_rank": 24, "latent_norm": True, "ranks": [16, 8, 16]}, {"pad_ranks": True}),
}


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_streamed_hf_export_writes_the_in_memory_tensors(tmp_path, case, monkeypatch):
    made, kwargs = STREAMED_CASES[case]
    ckpt = make_ckpt(tmp_path, "ckpt", **made)
    loads = []
    monkeypatch.setattr(export_write, "load_checkpoint", lambda *a, **k: loads.append(a) or load_checkpoint(*a, **k))
    result = export_checkpoint(ckpt, tmp_path / "out", **kwargs)
    assert len(loads) == 1  # only the verification (a small model) loads it whole
    assert result.verify["greedy_tokens_equal"] and result.verify["relative"] < 1e-4
    loaded = load_checkpoint(ckpt)
    dtype = kwargs.get("dtype", "float32")
    ref = deepseek_state_dict(loaded, plan_export(loaded, dtype=dtype, pad_ranks=kwargs.get("pad_ranks", False)))
    assert_bit_exact(written_tensors(tmp_path / "out"), ref)
    assert result.plan == plan_export(loaded, dtype=dtype, pad_ranks=kwargs.get("pad_ranks", False))


def test_streamed_export_shards_and_never_loads_the_model(tmp_path, monkeypatch):
    ckpt = make_ckpt(tmp_path, "ckpt", latent_norm=True)
    built = []
    real_layer = CheckpointOnDisk.layer
    monkeypatch.setattr(CheckpointOnDisk, "layer", lambda self, i, *a: built.append(i) or real_layer(self, i, *a))
    monkeypatch.setattr(export_write, "load_checkpoint", None)  # a whole-model load would fail
    monkeypatch.setattr(export_write, "MAX_SHARD_SIZE", "40KB")
    export_checkpoint(ckpt, tmp_path / "out", verify=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    for f in files:  # a shard passes the limit only when one tensor does
        members = [n for n, g in index["weight_map"].items() if g == f]
        assert len(members) == 1 or (tmp_path / "out" / f).stat().st_size <= 40_000 + 4096
    assert built == [0, 0, 1, 2]  # layer 0 for the shapes, then each layer once
    loaded = load_checkpoint(ckpt)
    assert_bit_exact(written_tensors(tmp_path / "out"), deepseek_state_dict(loaded, plan_export(loaded)))
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 123]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_model_above_the_verification_size_is_written_with_a_note(tmp_path, monkeypatch):
    ckpt = make_ckpt(tmp_path, "ckpt", latent_norm=True)
    monkeypatch.setattr(export_write, "VERIFY_MAX_PARAMETERS", 1000)
    monkeypatch.setattr(export_write, "load_checkpoint", None)
    result = export_checkpoint(ckpt, tmp_path / "out")
    assert result.verify is None and any(n.startswith("not verified") for n in result.plan.notes)
    assert "not verified" in (tmp_path / "out" / "README.md").read_text()


def no_weight_is_read(monkeypatch) -> None:
    def refuse(self, name):
        raise AssertionError(f"read {name} before the refusal")

    monkeypatch.setattr(WeightsOnDisk, "get", refuse)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda p: make_ckpt(p, "c", layers=[0, 1]), {}, "keep their original attention"),
        (lambda p: make_ckpt(p, "c", ranks=[16, 8, 16]), {}, "different latent ranks"),
        (lambda p: make_ckpt(p, "c"), {"portable": True}, "no latent norm"),
        (lambda p: make_ckpt(p, "c"), {"latent_width": 20}, "below this checkpoint's"),
        (lambda p: make_ckpt(p, "c", "qwen2", attention_bias="keep"), {}, "the attention has biases"),
        (lambda p: make_ckpt(p, "c", mlp_bias=True), {}, "mlp_bias"),
    ],
)
def test_hf_refusals_come_before_any_weight_is_read(tmp_path, monkeypatch, make, kwargs, match):
    ckpt = make(tmp_path)
    no_weight_is_read(monkeypatch)
    with pytest.raises(XecomlaError, match=match):
        export_checkpoint(ckpt, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: mla_ckpt(p, latent_norm=False), "no latent norm"),
        (lambda p: mla_ckpt(p, ranks=[16, 8, 16]), "different latent ranks"),
        (lambda p: mla_ckpt(p, spec_kw={"rope_frequencies": "source"}, rope_parameters=LLAMA3_ROPE), "llama3"),
    ],
)
def test_gguf_refusals_come_before_any_weight_is_read(tmp_path, monkeypatch, make, match):
    ckpt = make(tmp_path)
    no_weight_is_read(monkeypatch)
    with pytest.raises(XecomlaError, match=match):
        export_gguf(str(ckpt), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(t.shape), np.array(t.data).tobytes()) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_streamed_gguf_writes_the_in_memory_tensors(tmp_path, outtype):
    ckpt = mla_ckpt(tmp_path, tie_word_embeddings=outtype == "bf16")
    streamed = export_gguf(str(ckpt), tmp_path / "s.gguf", outtype=outtype, verify=False)
    in_memory = export_gguf(str(ckpt), tmp_path / "m.gguf", outtype=outtype, verify=False, loaded=load_checkpoint(ckpt))
    a, b = gguf_tensors(streamed.path), gguf_tensors(in_memory.path)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert streamed.tensor_types == in_memory.tensor_types and streamed.notes == in_memory.notes


def test_checkpoint_on_disk_builds_the_loaded_layers(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt", q_rank=24, latent_norm=True, tie_word_embeddings=True)
    on_disk, loaded = open_checkpoint(ckpt), load_checkpoint(ckpt).model
    assert on_disk.names() == list(loaded.state_dict())
    for i in range(on_disk.num_layers):
        for name, t in on_disk.layer(i).state_dict().items():
            ref = loaded.model.layers[i].state_dict()[name]
            assert t.dtype == ref.dtype and torch.equal(t, ref), name
    assert torch.equal(on_disk.tensor("lm_head.weight"), loaded.lm_head.weight)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mha"])
def test_inspect_on_disk_equals_the_in_memory_report(tmp_path, family):
    src = save_model(make_model(family), tmp_path / family)
    ref = inspect(load_model(str(src)), ranks=[8, 16, 24], context=1000, batch=2)
    got = inspect_source(str(src), ranks=[8, 16, 24], context=1000, batch=2)
    assert json.dumps(got) == json.dumps(ref)


def test_inspect_reads_a_checkpoint_of_an_original_model_and_refuses_an_mla_one(tmp_path):
    lm = load_model(str(save_model(make_model("llama"), tmp_path / "src")))
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=lm.model, tokenizer=make_tokenizer(), stage="inspect", spec=None, source="src"
    )
    assert json.dumps(inspect_source(str(ckpt), ranks=[8])) == json.dumps(inspect(load_model(str(ckpt)), ranks=[8]))
    with pytest.raises(XecomlaError, match="is an MLA checkpoint"):
        inspect_source(str(make_ckpt(tmp_path, "mla")))


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_encoding_by_rows_equals_encoding_at_once(monkeypatch, outtype):
    from gguf import quants

    from xecomla_cli.export import gguf_writer

    data = np.random.default_rng(0).standard_normal((100, 64)).astype(np.float32)
    whole, qtype = gguf_writer.encode("blk.0.attn_q.weight", data, outtype)
    monkeypatch.setattr(gguf_writer, "ENCODE_ROWS", 7)
    by_rows, _ = gguf_writer.encode("blk.0.attn_q.weight", data, outtype)
    assert by_rows.dtype == whole.dtype and np.array_equal(by_rows.view(np.uint8), whole.view(np.uint8))
    assert np.array_equal(whole.view(np.uint8), quants.quantize(data, qtype).view(np.uint8))
