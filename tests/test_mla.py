"""The MLA module, its latent cache and the paper's SVD initialisation: the math."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from transformers import DynamicCache

from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.layer_weights import AttentionWeights, repeat_heads
from xecomla_cli.mla.attention import MLAAttention
from xecomla_cli.mla.kv_spectrum import layer_singular_values
from xecomla_cli.mla.rebuild import decoder_layers
from xecomla_cli.mla.spec import MLASpec


def convert(model, **kw) -> MLASpec:
    """The exact MLA of the source (Qwen2's biases kept, not folded for the engines: init.engine_ready)."""
    kw.setdefault("attention_bias", "keep")
    spec = build_spec(model.config, **kw)
    spec = convert_model(model, spec)
    return spec


def kv_rows(attn, H, G):
    """The original K and V weights repeated to all query heads: (H, h, d) each."""
    w = AttentionWeights.of(attn)
    return repeat_heads(w.wk, G, H), repeat_heads(w.wv, G, H)


# ---- SVD factors -----------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [8, 24])
def test_factors_reproduce_truncation_of_stacked_kv(rank):
    model = make_model("llama")
    attn = decoder_layers(model)[1].self_attn
    H, G, h, p = 4, 2, 16, 8
    n = h - p
    wk, wv = kv_rows(attn, H, G)
    m = torch.cat([wk.reshape(-1, 64), wv.reshape(-1, 64)]).double()
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]  # best rank-r approximation of [K; V]
    t_k = truncated[: H * h].view(H, h, 64)[:, :n]  # K-nope rows (paper: first n dims of each head)
    t_v = truncated[H * h :].view(H, h, 64)

    convert(model, kv_rank=rank, rope_dim=p)
    mla = decoder_layers(model)[1].self_attn
    w_dkv = mla.kv_a_proj_with_mqa.weight[:rank].double()
    up = mla.kv_b_proj.weight.double().view(H, n + h, rank)
    approx = up @ w_dkv  # (H, n + h, d)
    torch.testing.assert_close(approx[:, :n], t_k, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(approx[:, n:], t_v, rtol=1e-4, atol=2e-5)


def test_nope_v_rows_reproduce_truncation_of_kept_rows():
    model = make_model("llama")
    attn = decoder_layers(model)[0].self_attn
    H, G, h, p, r = 4, 2, 16, 8, 12
    n = h - p
    wk, wv = kv_rows(attn, H, G)
    m = torch.cat([wk[:, :n].reshape(-1, 64), wv.reshape(-1, 64)]).double()
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    truncated = (u[:, :r] * s[:r]) @ vt[:r]
    convert(model, kv_rank=r, rope_dim=p, kv_rows="nope-v")
    mla = decoder_layers(model)[0].self_attn
    approx = mla.kv_b_proj.weight.double().view(H, n + h, r) @ mla.kv_a_proj_with_mqa.weight[:r].double()
    torch.testing.assert_close(approx[:, :n].reshape(-1, 64), truncated[: H * n], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(approx[:, n:].reshape(-1, 64), truncated[H * n :], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "mha", "qwen2"])
def test_full_rank_reproduces_original_knope_and_v(family):
    model = make_model(family)
    H, G, h, p = 4, model.config.num_key_value_heads, 16, 8
    n = h - p
    full = min(2 * G * h, 64)  # the rank of the stacked [K; V] (d = 64)
    originals = [kv_rows(layer.self_attn, H, G) for layer in decoder_layers(model)]
    convert(model, kv_rank=full, rope_dim=p)
    for (wk, wv), layer in zip(originals, decoder_layers(model), strict=True):
        mla = layer.self_attn
        approx = mla.kv_b_proj.weight.view(H, n + h, full) @ mla.kv_a_proj_with_mqa.weight[:full]
        torch.testing.assert_close(approx[:, :n], wk[:, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(approx[:, n:], wv, rtol=1e-4, atol=1e-5)


def test_paper_rope_key_is_mean_of_kv_heads_and_queries_keep_order():
    model = make_model("llama")
    attn = decoder_layers(model)[2].self_attn
    wq, wk = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    convert(model, kv_rank=16, rope_dim=8)
    mla = decoder_layers(model)[2].self_attn
    expected = wk.view(2, 16, 64)[:, 8:].mean(0)
    torch.testing.assert_close(mla.kv_a_proj_with_mqa.weight[16:], expected)
    torch.testing.assert_close(mla.q_proj.weight, wq)


def test_low_rank_queries_are_truncated_svd():
    model = make_model("llama")
    wq = decoder_layers(model)[0].self_attn.q_proj.weight.detach().double()
    convert(model, kv_rank=16, q_rank=20)
    mla = decoder_layers(model)[0].self_attn
    u, s, vt = torch.linalg.svd(wq, full_matrices=False)
    expected = (u[:, :20] * s[:20]) @ vt[:20]
    got = mla.q_b_proj.weight.double() @ mla.q_a_proj.weight.double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


# ---- attention and the latent cache ----------------------------------------------------------
def test_absorbed_decode_equals_expanded_attention():
    """forward's decode step (one token over the latent cache, never expanded; with and without the
    output absorption) equals forward's expanded attention over the whole sequence at its last token."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = make_model("llama")
    convert(model, kv_rank=12, rope_dim=8)
    mla: MLAAttention = decoder_layers(model)[0].self_attn.eval()
    B, L = 2, 7
    x = torch.randn(B, L, 64)
    pos = torch.arange(L).expand(B, L)
    with torch.no_grad():
        full, _ = mla(x, attention_mask=None, position_ids=pos)  # no cache: the expanded path, causal
        for absorb in (False, True):
            mla.absorb_output = absorb
            cache = DynamicCache()
            mla(x[:, :-1], attention_mask=None, past_key_values=cache, position_ids=pos[:, :-1])  # prefill
            step, _ = mla(x[:, -1:], attention_mask=None, past_key_values=cache, position_ids=pos[:, -1:])
            assert cache.layers[0].keys.shape[-2:] == (L, 12)  # the decode step read the latent cache
            torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mha"])
def test_cache_holds_r_plus_p_values_and_cached_generation_matches(family):
    model = make_model(family)
    spec = convert(model, kv_rank=12, rope_dim=6)
    ids = torch.randint(0, 300, (2, 9))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        assert keys.shape == (2, 1, 9, 12) and values.shape == (2, 1, 9, 6)
        assert (keys[0].numel() + values[0].numel()) // 9 == spec.values_per_token(i) == 18
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    no_cache = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(gen, no_cache)
    # step-by-step logits with the cache equal a full forward without it
    with torch.no_grad():
        full = model(gen).logits
        cache = DynamicCache(config=model.config)
        step = model(gen[:, :9], past_key_values=cache, use_cache=True).logits
        logits = [step[:, -1]]
        for t in range(9, gen.shape[1] - 1):
            logits.append(model(gen[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 8:-1], rtol=1e-4, atol=1e-4)
    assert out.logits.shape == (2, 9, 300)


def test_sampling_generation_runs_through_latent_cache():
    model = make_model("llama")
    convert(model, kv_rank=8)
    torch.manual_seed(1)
    out = model.generate(torch.randint(0, 300, (1, 5)), max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (1, 11)


def test_left_padded_batch_matches_unpadded():
    model = make_model("llama")
    convert(model, kv_rank=12)
    a = torch.randint(3, 300, (1, 6))
    b = torch.randint(3, 300, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    single = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[1, 6:], single[0, 4:])


def test_hybrid_leaves_unconverted_layers_identical():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items() if ".layers.1." in k or ".layers.2." not in k}
    spec = convert(model, kv_rank=8, layers=[0, 2])
    assert spec.kv_ranks == [8, None, 8]
    layers = decoder_layers(model)
    assert isinstance(layers[0].self_attn, MLAAttention) and isinstance(layers[2].self_attn, MLAAttention)
    assert not isinstance(layers[1].self_attn, MLAAttention)
    after = model.state_dict()
    for k, v in before.items():
        if ".layers.1." in k or "embed" in k or "lm_head" in k or k == "model.norm.weight":
            assert torch.equal(after[k], v), k
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 5)), past_key_values=cache, use_cache=True)
    assert cache.layers[1].keys.shape == (1, 2, 5, 16)  # original GQA cache: G heads x h
    assert cache.layers[0].keys.shape == (1, 1, 5, 8)


def test_energy_ranks_follow_the_rule():
    model = make_model("llama")
    sv = layer_singular_values(model)
    spec = build_spec(model.config, energy=0.9, singular_values=sv)
    for i, s in sv.items():
        e = (s.double() ** 2).cumsum(0) / (s.double() ** 2).sum()
        smallest = int((e < 0.9 - 1e-7).sum()) + 1
        assert spec.kv_ranks[i] == min(-(-smallest // 8) * 8, s.numel())
        assert spec.kv_ranks[i] % 8 == 0 or spec.kv_ranks[i] == s.numel()


def test_qwen2_biases_are_carried():
    model = make_model("qwen2")
    attn = decoder_layers(model)[0].self_attn
    bq, bk, bv = attn.q_proj.bias.clone(), attn.k_proj.bias.clone(), attn.v_proj.bias.clone()
    convert(model, kv_rank=32, rope_dim=8)  # full rank
    mla = decoder_layers(model)[0].self_attn
    torch.testing.assert_close(mla.q_proj.bias, bq)
    b = mla.kv_b_proj.bias.view(4, 8 + 16)
    torch.testing.assert_close(b[:, 8:], bv.view(2, 16).repeat_interleave(2, 0))
    torch.testing.assert_close(b[:, :8], bk.view(2, 16).repeat_interleave(2, 0)[:, :8])
    torch.testing.assert_close(mla.kv_a_proj_with_mqa.bias[32:], bk.view(2, 16)[:, 8:].mean(0))


def test_llama_3_2_1b_shape_gives_6_4x():
    """Same code path as meta-llama/Llama-3.2-1B-Instruct (attention shape exact; 2 layers, small vocab)."""
    model = make_model(
        "llama",
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=256,
        num_hidden_layers=2,
        vocab_size=512,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    spec = convert(model, kv_rank=128)
    assert spec.rope_dim == 32 and spec.values_per_token(0) == 160
    assert spec.original_values_per_token_per_layer == 1024
    assert spec.compression == pytest.approx(6.4)
    from xecomla_cli.mla.rope import default_inv_freq

    # llama3's scaling is not carried: default RoPE at dim 32 with θ, what every engine computes (init.engine_ready)
    assert spec.rope_frequencies == "default"
    assert torch.equal(decoder_layers(model)[0].self_attn.rope_inv_freq, default_inv_freq(500000.0, 32))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 512, (1, 4)), past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape[-1] + cache.layers[0].values.shape[-1] == 160


def test_rope_frequencies_stay_fp32_in_bf16_model():
    model = make_model("llama")
    convert(model, kv_rank=8)
    inv = decoder_layers(model)[0].self_attn.rope_inv_freq.clone()
    model.to(torch.bfloat16)
    assert decoder_layers(model)[0].self_attn.rope_inv_freq.dtype == torch.float32
    assert torch.equal(decoder_layers(model)[0].self_attn.rope_inv_freq, inv)


def test_generation_through_triton_kernel_matches_reference(monkeypatch):
    """The decode step through the Triton kernel (interpreted on CPU) gives the same tokens."""
    model = make_model("llama")
    convert(model, kv_rank=12, rope_dim=6)
    ids = torch.randint(0, 300, (2, 6))
    monkeypatch.setenv("XECOMLA_DECODE_KERNEL", "reference")
    ref = model.generate(
        ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    monkeypatch.setenv("XECOMLA_DECODE_KERNEL", "triton")
    tri = model.generate(
        ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(ref.sequences, tri.sequences)
    torch.testing.assert_close(torch.stack(tri.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
