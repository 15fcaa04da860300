"""A GGUF source is de-quantized once: later loads read the cached Hugging Face directory
(``dequantized``) and get the same weights, config and tokenizer as the GGUF load."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TEXT, make_model, save_model

from xecomla_cli import dequantized
from xecomla_cli.errors import XecomlaError
from xecomla_cli.export.gguf_export import export_gguf
from xecomla_cli.sources import load_model


@pytest.fixture
def tiny_gguf(tmp_path):
    src = save_model(make_model("llama"), tmp_path / "hf")
    out = tmp_path / "m.gguf"
    export_gguf(str(src), out, outtype="f32", verify=False)
    return out


def same_model(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.tokenizer(TEXT)["input_ids"] == b.tokenizer(TEXT)["input_ids"]
    assert a.tokenizer.chat_template == b.tokenizer.chat_template
    assert (a.tokenizer.eos_token, a.tokenizer.bos_token) == (b.tokenizer.eos_token, b.tokenizer.bos_token)
    ids = torch.tensor([a.tokenizer(TEXT)["input_ids"][:24]])
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_the_first_load_caches_and_later_loads_read_the_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XECOMLA_CACHE", str(tmp_path / "cache"))
    assert dequantized.cached(tiny_gguf) is None
    first = load_model(str(tiny_gguf))
    entry = dequantized.cached(tiny_gguf)
    assert entry is not None and (entry / "model.safetensors").is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    second = load_model(str(tiny_gguf))
    assert second.model.config._name_or_path == str(entry)  # read from the cache, not the GGUF file
    assert first.resolved == second.resolved and first.resolved.gguf_file == "m.gguf"  # still the GGUF source
    assert not hasattr(second.model.config, "quantization_config")
    same_model(first, second)
    bf16 = load_model(str(tiny_gguf), dtype="bfloat16")
    pairs = zip(bf16.model.parameters(), first.model.parameters(), strict=True)
    assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in pairs)


def test_a_changed_file_gets_a_new_entry(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XECOMLA_CACHE", str(tmp_path / "cache"))
    load_model(str(tiny_gguf))
    before = dequantized.cache_entry(tiny_gguf)
    st = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert dequantized.cache_entry(tiny_gguf) != before and dequantized.cached(tiny_gguf) is None


def test_a_cache_that_cannot_be_written_only_costs_time(tiny_gguf, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("XECOMLA_CACHE", str(blocked))
    plain = load_model(str(tiny_gguf))
    assert dequantized.cached(tiny_gguf) is None
    monkeypatch.setenv("XECOMLA_CACHE", str(tmp_path / "cache"))
    same_model(plain, load_model(str(tiny_gguf)))


def test_a_damaged_entry_is_named_in_one_line(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XECOMLA_CACHE", str(tmp_path / "cache"))
    load_model(str(tiny_gguf))
    entry = dequantized.cached(tiny_gguf)
    (entry / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(XecomlaError, match="de-quantized cache .* delete that directory") as err:
        load_model(str(tiny_gguf))
    assert str(entry) in str(err.value) and "\n" not in str(err.value)
