"""The fast decode path: the in-place latent cache, the absorbed attention through the dispatcher, no host sync.

"Today's path" below is what the model did before the fast path: a concatenating DynamicLayer
and the exact fp32 reference attention (XECOMLA_DECODE_KERNEL=reference).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.kernels import ENV_VAR
from xecomla_cli.mla import kv_cache as latent_cache
from xecomla_cli.mla.attention import MLAAttention
from xecomla_cli.mla.decode import decode_mask, output_absorption_pays
from xecomla_cli.mla.kv_cache import GrowingLayer, use_growing_layer
from xecomla_cli.mla.rebuild import decoder_layers


def converted(family="llama", layers=None, **overrides):
    model = make_model(family, **overrides)
    spec = build_spec(model.config, kv_rank=12, rope_dim=6, layers=layers)
    spec = convert_model(model, spec)
    return model, spec


class ConcatLayer(DynamicLayer):
    """A DynamicLayer under another name: the model leaves it alone (today's torch.cat cache)."""


def todays_cache(model) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [ConcatLayer() for _ in range(model.config.num_hidden_layers)]
    return cache


def generate(model, ids, cache=None, **kw):
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True) | kw
    return model.generate(ids, past_key_values=cache, **kw)


# ---- the cache --------------------------------------------------------------------------------------
def test_growing_layer_holds_what_a_dynamic_layer_holds(monkeypatch):
    monkeypatch.setattr(latent_cache, "CHUNK", 4)  # cross several growths
    grow, cat = GrowingLayer(), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for T in (5, 1, 1, 3, 1, 1, 1, 1, 7):
        k, v = torch.randn(3, 1, T, 12, generator=g), torch.randn(3, 1, T, 6, generator=g)
        got, want = grow.update(k, v), cat.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert grow.get_seq_length() == cat.get_seq_length() == 21
    assert grow._keys.shape[-2] <= 21 + 2 * 4  # room for at most CHUNK more (rounded)
    for op, arg in (("crop", -3), ("batch_select_indices", torch.tensor([2, 0])), ("batch_repeat_interleave", 2)):
        getattr(grow, op)(arg)
        getattr(cat, op)(arg)
        assert torch.equal(grow.keys, cat.keys) and torch.equal(grow.values, cat.values), op
    k, v = torch.randn(4, 1, 1, 12), torch.randn(4, 1, 1, 6)
    assert all(torch.equal(a, b) for a, b in zip(grow.update(k, v), cat.update(k, v), strict=True))


def test_writes_in_place_between_growths():
    layer = GrowingLayer()
    layer.update(torch.randn(2, 1, 10, 8), torch.randn(2, 1, 10, 4))
    buffer = layer._keys.data_ptr()
    for _ in range(20):
        keys, _ = layer.update(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 4))
        assert keys.data_ptr() == buffer  # no copy of the cache per step


@pytest.mark.parametrize("with_config", [True, False])
def test_mla_layers_get_a_growing_layer_and_others_keep_theirs(with_config):
    model, spec = converted(layers=[0, 2])
    cache = DynamicCache(config=model.config) if with_config else DynamicCache()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, DynamicLayer, GrowingLayer]
    for i in (0, 2):  # exactly r + p values per token, measured on the tensors
        layer = cache.layers[i]
        assert layer.keys.shape == (2, 1, 9, 12) and layer.values.shape == (2, 1, 9, 6)
        assert (layer.keys[0].numel() + layer.values[0].numel()) // 9 == spec.values_per_token(i) == 18
    assert cache.layers[1].keys.shape == (2, 2, 9, 16)
    filled = DynamicCache()  # a layer that already holds tokens is left alone
    filled.update(torch.randn(1, 1, 3, 12), torch.randn(1, 1, 3, 6), 0)
    use_growing_layer(filled, 0)
    assert type(filled.layers[0]) is DynamicLayer


# ---- generation: the same tokens as today's path and as no cache ----------------------------------------
@pytest.mark.parametrize("family,layers", [("llama", None), ("qwen2", None), ("mha", None), ("llama", [0, 2])])
def test_generation_equals_todays_path_and_no_cache(family, layers, monkeypatch):
    model, _ = converted(family, layers=layers)
    ids = torch.randint(0, 300, (2, 7))
    fast = generate(model, ids)
    monkeypatch.setenv(ENV_VAR, "reference")
    today = generate(model, ids, todays_cache(model))
    monkeypatch.delenv(ENV_VAR)
    no_cache = generate(model, ids, use_cache=False)
    assert torch.equal(fast.sequences, today.sequences) and torch.equal(fast.sequences, no_cache.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(today.logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(no_cache.logits), rtol=1e-4, atol=1e-4)


def test_sampling_equals_todays_path(monkeypatch):
    model, _ = converted()
    ids = torch.randint(0, 300, (3, 5))
    torch.manual_seed(7)
    fast = generate(model, ids, do_sample=True, top_k=50, max_new_tokens=10).sequences
    monkeypatch.setenv(ENV_VAR, "reference")
    torch.manual_seed(7)
    today = generate(model, ids, todays_cache(model), do_sample=True, top_k=50, max_new_tokens=10).sequences
    assert torch.equal(fast, today)


def test_beam_search_equals_todays_path(monkeypatch):
    """Beam search reorders the cache every step (GrowingLayer.reorder_cache)."""
    model, _ = converted()
    ids = torch.randint(0, 300, (2, 5))
    fast = generate(model, ids, num_beams=3, output_logits=False).sequences
    monkeypatch.setenv(ENV_VAR, "reference")
    today = generate(model, ids, todays_cache(model), num_beams=3, output_logits=False).sequences
    assert torch.equal(fast, today)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # boolean and additive masks
def test_left_padded_batch_equals_todays_path_and_unpadded(attn, monkeypatch):
    model, _ = converted()
    model.config._attn_implementation = attn
    a, b = torch.randint(3, 300, (1, 7)), torch.randint(3, 300, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0] + [1] * 4])
    fast = generate(model, ids, attention_mask=mask)
    single = generate(model, b)
    monkeypatch.setenv(ENV_VAR, "reference")
    today = generate(model, ids, todays_cache(model), attention_mask=mask)
    assert torch.equal(fast.sequences, today.sequences)
    assert torch.equal(fast.sequences[1, 7:], single.sequences[0, 4:])
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(today.logits), rtol=1e-5, atol=1e-5)


def test_static_cache_generation_equals_dynamic():
    """generate(cache_implementation='static'): the preallocated StaticLayer, its fill level and mask."""
    model, _ = converted(layers=[0, 1])
    ids = torch.randint(0, 300, (2, 6))
    static = generate(model, ids, cache_implementation="static")
    dynamic = generate(model, ids)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-5, atol=1e-5)


def test_decode_mask_reads_the_last_row():
    bool_mask = torch.tensor([[[[True, False, True, True, False]]], [[[False, True, True, True, True]]]])
    torch.testing.assert_close(decode_mask(bool_mask, 4), bool_mask[:, 0, 0, :4])
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(decode_mask(additive, 4), bool_mask[:, 0, 0, :4])
    assert decode_mask(None, 4) is None


# ---- W_uv folded into o_proj ---------------------------------------------------------------------------------
def test_output_absorption_rule():
    assert output_absorption_pays(576, 64, 64)  # the demo at 4x: d·H·r < H·h·r + d·H·h
    assert not output_absorption_pays(2048, 64, 128)  # Llama-3.2-1B at r = 128
    assert output_absorption_pays(64, 16, 12) and not output_absorption_pays(64, 16, 32)


def decode_outputs(attn, x, kwargs, absorb: bool):
    attn.absorb_output = absorb
    out, _ = attn(x, **kwargs)
    kwargs["past_key_values"].crop(-1)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: the V bias moves into the output bias
def test_absorbed_output_equals_up_projection_then_o_proj(family):
    model, _ = converted(family)
    attn, kwargs = decode_step_inputs(model, "growing")
    attn.o_proj.bias = torch.nn.Parameter(torch.randn(64) * 0.1)  # an output bias too
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        want = decode_outputs(attn, x, kwargs, absorb=False)
        torch.testing.assert_close(decode_outputs(attn, x, kwargs, absorb=True), want, rtol=1e-5, atol=1e-5)
        attn.o_proj.weight.mul_(1.5)  # an in-place update (an optimizer step): recomputed, not stale
        attn.kv_b_proj.weight.add_(0.01)
        want = decode_outputs(attn, x, kwargs, absorb=False)
        torch.testing.assert_close(decode_outputs(attn, x, kwargs, absorb=True), want, rtol=1e-5, atol=1e-5)


# ---- no host sync in the decode step ----------------------------------------------------------------------
def decode_step_inputs(model, cache_kind: str):
    """A prefilled cache and the inputs of one MLA layer's decode step (with a padding mask)."""
    attn: MLAAttention = decoder_layers(model)[0].self_attn
    B, L = 2, 5
    cache = StaticCache(config=model.config, max_cache_len=8) if cache_kind == "static" else DynamicCache()
    with torch.no_grad():
        attn(torch.randn(B, L, 64), attention_mask=None, past_key_values=cache, position_ids=torch.arange(L)[None])
    cap = 8 if cache_kind == "static" else L + 1
    mask = torch.ones(B, 1, 1, cap, dtype=torch.bool)
    mask[1, ..., :2] = False
    return attn, dict(attention_mask=mask, past_key_values=cache, position_ids=torch.full((B, 1), L))


@pytest.mark.parametrize("cache_kind", ["static", "growing"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_step_traces_as_one_graph(cache_kind, backend, monkeypatch):
    """torch.compile(fullgraph=True) fails on any host sync (tensor -> bool/int) or Python data dependence."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv(ENV_VAR, backend)
    torch._dynamo.reset()
    model, _ = converted()
    attn, kwargs = decode_step_inputs(model, cache_kind)
    x = torch.randn(2, 1, 64)
    compiled = torch.compile(attn, backend="eager", fullgraph=True)
    with torch.no_grad():
        out, _ = compiled(x, **kwargs)
    assert out.shape == (2, 1, 64) and torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_sync_in_the_cuda_decode_step():
    model, _ = converted()
    model.cuda()
    ids = torch.randint(0, 300, (2, 6), device="cuda")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        attn = decoder_layers(model)[0].self_attn
        x = torch.randn(2, 1, 64, device="cuda")
        positions = torch.full((2, 1), 6, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            attn(x, attention_mask=None, past_key_values=cache, position_ids=positions)
        finally:
            torch.cuda.set_sync_debug_mode("default")
