"""The peers' methods as presets (TransMLA: RoRoPE + FreqFold + BKV-PCA; MHA2MLA: per-KV-head
partial RoPE + joint SVD) and per-group RoPE slices: the math on tiny models, then the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_init_methods import calib, kl, rope_scores, run_cli, structured_model, to_real
from transformers import DynamicCache

from xecomla_cli.errors import XecomlaError
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.freqfold import fold_candidates, fold_slots, freqfold_keys
from xecomla_cli.init.latent import balanced_factors, kv_balance, whitened_factors
from xecomla_cli.init.layer_weights import AttentionWeights
from xecomla_cli.init.methods import MethodConfig, parse_method
from xecomla_cli.init.rope_pairs import pair_scores, select_pairs, uniform_pairs
from xecomla_cli.init.shared_key import complex_rows
from xecomla_cli.init.stats import layer_stats
from xecomla_cli.init.transmla import search_freqfold
from xecomla_cli.layerwise import LayerRunner
from xecomla_cli.mla.spec import MLASpec


# ---- method strings and specs --------------------------------------------------------------------
def test_parse_peer_methods():
    assert parse_method("transmla") == MethodConfig(whiten=True, freqfold=0, balance=True)
    assert parse_method("freqfold-4").freqfold == 4 and not parse_method("freqfold-4").whiten
    assert parse_method("mha2mla") == MethodConfig(pairs="qk", group_rope=True)
    assert parse_method("best+group-rope") == MethodConfig("rot", "complex", True, True, group_rope=True)
    assert parse_method("group-rope").pairs == "rot"  # a slice per group keeps whole original pairs
    assert parse_method("uniform-pairs").pairs == "uniform"
    assert parse_method("best+bkv").balance and parse_method("best+bkv").whiten
    for bad in ("freqfold+rot-pairs", "freqfold+complex", "freqfold+group-rope", "freqfold-0", "freqfold-x"):
        with pytest.raises(XecomlaError):
            parse_method(bad)


def test_specs_of_peer_methods_and_their_json():
    config = make_model("llama").config  # H = 4, G = 2, h = 16
    spec = build_spec(config, kv_rank=16, rope_dim=8, method="transmla")
    assert spec.nope_dim == 16 and spec.rope_groups == 1 and spec.values_per_token(0) == 24
    spec = build_spec(config, kv_rank=16, rope_dim=12, method="mha2mla")
    assert (spec.rope_groups, spec.group_rope_dim, spec.nope_dim, spec.values_per_token(0)) == (2, 6, 10, 28)
    assert build_spec(config, kv_rank=16, method="mha2mla").rope_dim == 8  # default: multiple of 2G up to h/2
    d = spec.to_dict()
    assert d["rope_groups"] == 2 and MLASpec.from_dict(d) == spec
    # Existing methods write no new keys.
    d = build_spec(config, kv_rank=16, rope_dim=8, method="best").to_dict()
    assert "rope_groups" not in d and "qk_nope_dim" not in d
    for method, p in [("mha2mla", 10), ("transmla", 6), ("transmla", 32), ("freqfold-1", 8), ("freqfold-16", 8)]:
        with pytest.raises(XecomlaError):
            build_spec(config, kv_rank=16, rope_dim=p, method=method)


# ---- FreqFold and RoRoPE --------------------------------------------------------------------------
def test_freqfold_without_folding_is_the_identity():
    groups, slots = fold_slots(8, 1, 1)
    assert groups.tolist() == [[j] for j in range(8)] and slots.tolist() == list(range(8))
    groups, slots = fold_slots(8, 4, 2)  # p = h/2: groups of 4 neighbours, 2 RoPE channels each
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and slots.tolist() == [0, 2, 4, 6]
    assert fold_candidates(64, 32) == [2, 4, 8, 16, 32] and fold_candidates(64, 16) == [4, 8, 16, 32]


@pytest.mark.parametrize("G,fold,collapse", [(3, 1, 1), (2, 4, 2), (2, 8, 4), (1, 2, 1)])
def test_freqfold_splits_every_score_into_rope_and_residual_parts(G, fold, collapse):
    """Without rotation (Δ = 0) the RoPE channels plus the residual keys give the original scores."""
    torch.manual_seed(0)
    H, h, c = 2 * G, 16, 10
    wk, wq = torch.randn(G * h, c, dtype=torch.float64), torch.randn(H * h, c, dtype=torch.float64)
    A = torch.randn(c, c, dtype=torch.float64)
    f = freqfold_keys(wk, wq, A @ A.T, H, G, h, h // collapse, fold)
    x = torch.randn(c, dtype=torch.float64)
    k, q = (wk @ x).view(G, h), (wq @ x).view(H, h)
    for head in range(H):
        g = head // (H // G)
        split = f.q_rope[head].double() @ x @ (f.k_rope.double() @ x) + q[head] @ (f.k_resid[g].double() @ x)
        assert split.item() == pytest.approx((q[head] @ k[g]).item(), rel=1e-5)


def test_freqfold_is_exact_when_the_folded_frequencies_are_equal():
    """One KV head, p = h: every rotated channel keeps RoPE, so the fold's only approximation is
    turning a group's channels at one frequency. With equal frequencies in a group it is exact."""
    torch.manual_seed(1)
    H, G, h, c, fold = 2, 1, 8, 6, 2
    wk, wq = torch.randn(G * h, c, dtype=torch.float64), torch.randn(H * h, c, dtype=torch.float64)
    f = freqfold_keys(wk, wq, torch.eye(c, dtype=torch.float64), H, G, h, h, fold)
    assert f.k_resid.abs().max() < 1e-5
    x = torch.randn(c, dtype=torch.float64)
    equal = torch.tensor([1.0, 1.0, 0.1, 0.1], dtype=torch.float64)  # neighbours folded together
    unequal = torch.tensor([1.0, 0.7, 0.1, 0.05], dtype=torch.float64)
    for theta, exact in [(equal, True), (unequal, False)]:
        ref = rope_scores(wq[:h] @ x, wk @ x, theta)
        folded = rope_scores(f.q_rope[0].double() @ x, f.k_rope.double() @ x, theta[f.slot_pairs])
        assert torch.allclose(folded, ref, atol=1e-6) == exact


def test_transmla_is_exact_at_full_rank_when_heads_share_one_real_key_per_pair():
    """RoRoPE per frequency (fold 1, p = h): keys whose KV heads are real multiples of one key per
    pair fit in one rotated channel, so the full-rank conversion reproduces the model."""
    ids = calib()
    ref = structured_model("llama", real_multiples=True)
    model = structured_model("llama", real_multiples=True)
    spec = build_spec(model.config, kv_rank=64, rope_dim=16, method="freqfold-1+bkv")
    spec = convert_model(model, spec, method="freqfold-1+bkv", calib_ids=ids)
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-3
    # A real rotation cannot do the same for complex multiples.
    cplx = structured_model("llama")
    ref = structured_model("llama")
    convert_model(cplx, build_spec(cplx.config, kv_rank=64, rope_dim=16, method="freqfold-1"), "freqfold-1", ids)
    with torch.no_grad():
        assert (cplx(ids).logits - ref(ids).logits).abs().max() > 1e-2


def test_full_rank_latent_skips_the_eigendecomposition(monkeypatch):
    """At full rank without a latent norm (the fold search's model) every basis of the latent is exact:
    the whitened, balanced factors multiply back to W, so the conversion takes up = I, down = W and
    never decomposes; one rank lower it does."""
    from xecomla_cli.init import transmla

    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(16, 32, generator=gen), torch.randn(32, 200, generator=gen)
    k_mask = torch.arange(16) < 8
    up, down, _ = balanced_factors(W, k_mask, X @ X.T / 200, 16, alpha=2.0)
    assert torch.allclose(up @ down, W, atol=1e-4)

    calls = []
    real = transmla.balanced_factors
    monkeypatch.setattr(transmla, "balanced_factors", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    ids = calib()
    for rank, decomposed in ((64, False), (48, True)):  # 64 = 2·G·h of the tiny model: full rank
        model = structured_model("llama", real_multiples=True)
        calls.clear()
        convert_model(
            model, build_spec(model.config, kv_rank=rank, rope_dim=16, method="freqfold-1+bkv"), "freqfold-1+bkv", ids
        )
        assert bool(calls) == decomposed


def test_freqfold_search_doubles_while_the_loss_improves():
    spec = build_spec(make_model("llama").config, kv_rank=16, rope_dim=8, method="transmla")  # c = 2, h/2 = 8
    calls = []

    def convert_all(full, fold):
        assert full.kv_ranks == [64, 64, 64]  # the partial-RoPE model: no rank cut
        calls.append(fold)
        return lambda: None

    for losses, best in [({2: 3.0, 4: 2.5, 8: 2.7}, 4), ({2: 3.0, 4: 3.1}, 2), ({2: 3.0, 4: 2.9, 8: 2.8}, 8)]:
        calls.clear()
        fold, tried = search_freqfold(spec, convert_all, lambda losses=losses: losses[calls[-1]])
        assert fold == best and tried == losses and calls == list(losses)


# ---- BKV-PCA ----------------------------------------------------------------------------------------
def test_bkv_balances_k_and_v_and_minimises_the_balanced_error():
    torch.manual_seed(0)
    nk, nv, d, r, N = 12, 16, 24, 6, 3000
    Wk, Wv = 5 * torch.randn(nk, d, dtype=torch.float64), torch.randn(nv, d, dtype=torch.float64)
    X = torch.randn(N, d, dtype=torch.float64) * torch.logspace(0.5, -1, d, dtype=torch.float64)
    C = X.T @ X / N
    alpha = kv_balance(Wk, Wv, C)
    # α is the ratio of the mean column norms: after dividing K by α they are equal.
    col = lambda W: (X @ W.T).norm(dim=0).mean().item()  # noqa: E731
    assert alpha == pytest.approx(col(Wk) / col(Wv), rel=1e-9) and alpha > 3
    assert col(Wk / alpha) == pytest.approx(col(Wv), rel=1e-9)
    W, k_mask = torch.cat([Wk, Wv]), torch.arange(nk + nv) < nk

    def balanced_err(up, down):
        E = X @ (W - up.double() @ down.double()).T  # (N, rows)
        return ((E[:, k_mask] ** 2).sum(1) / alpha**2 + (E[:, ~k_mask] ** 2).sum(1)).mean().item()

    up, down, ev = balanced_factors(W, k_mask, C, r, alpha)
    assert balanced_err(up, down) == pytest.approx(ev[r:].double().sum().item(), rel=1e-4)  # Eckart-Young
    up0, down0, _ = whitened_factors(W, C, r)  # unbalanced: K dominates the PCA
    assert balanced_err(up, down) < 0.9 * balanced_err(up0, down0)
    for _ in range(10):  # no nearby latent does better
        Un, _ = torch.linalg.qr(
            up.double() * torch.where(k_mask, 1 / alpha, 1.0)[:, None] + 1e-2 * torch.randn(nk + nv, r)
        )
        scale = torch.where(k_mask, alpha, 1.0)[:, None]
        assert balanced_err(scale * Un, Un.T @ (W / scale)) >= balanced_err(up, down) * (1 - 1e-9)
    up, down, _ = balanced_factors(W, k_mask, C, nk + nv, alpha)  # full rank: exact
    assert torch.allclose(up.double() @ down.double(), W, atol=1e-4)


# ---- MHA2MLA -----------------------------------------------------------------------------------------
def test_uniform_pairs():
    assert uniform_pairs(64, 16).tolist() == [0, 4, 8, 12, 16, 20, 24, 28]  # MHA2MLA: dims i = 0, 4, …
    assert uniform_pairs(16, 8).tolist() == [0, 2, 4, 6]


def test_mha2mla_keeps_each_groups_2norm_pairs_and_the_joint_svd():
    ids = calib()
    model = make_model("llama")
    stats = layer_stats(LayerRunner(model, ids), 0)
    w = AttentionWeights.of(model.model.layers[0].self_attn)
    spec = build_spec(model.config, kv_rank=12, rope_dim=8, method="mha2mla")  # 2 pairs per group
    spec = convert_model(model, spec, "mha2mla", ids)
    pairs = spec.rope_pairs["0"]
    want = [select_pairs(pair_scores(stats.heads(s, 2), 2, 1), 4).tolist() for s in range(2)]
    assert pairs == want and pairs[0] != pairs[1]
    # The latent is the plain SVD of the kept rows [K_nope; V] of the KV heads (SVD_joint).
    attn = model.model.layers[0].self_attn
    kept = []
    for g in range(2):
        nope = [i for i in range(16) if i % 8 not in pairs[g]]
        kept += [w.wk.view(2, 16, -1)[g, nope], w.wv.view(2, 16, -1)[g]]
    u, s, vt = torch.linalg.svd(torch.cat(kept).double())
    up = attn.kv_b_proj.weight.view(4, 28, 12)[::2].reshape(56, 12).double()  # one query head per group (n + h = 28)
    down = attn.kv_a_proj_with_mqa.weight[:12].double()
    assert torch.allclose(up @ down, (u[:, :12] * s[:12]) @ vt[:12], atol=1e-4)


# ---- per-group RoPE slices ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_group_rope_at_full_rank_is_the_original_gqa_and_caches_r_plus_g_pg(family):
    """p_g = h (every pair keeps RoPE in its group's slice), r = G·h (the values): the original GQA."""
    ids = torch.randint(0, 300, (2, 9))
    ref = make_model(family)
    model = make_model(family)
    spec = build_spec(model.config, kv_rank=32, rope_dim=32, method="group-rope", attention_bias="keep")
    spec = convert_model(model, spec, "group-rope", calib())
    assert spec.nope_dim == 0 and spec.group_rope_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):  # (B, 1, T, r) latent, (B, 1, T, G·p_g) RoPE key
        assert layer.keys.shape == (2, 1, 9, 32) and layer.values.shape == (2, 1, 9, 32)
        assert (layer.keys[0].numel() + layer.values[0].numel()) // 9 == spec.values_per_token(i) == 32 + 2 * 16
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0))
    assert torch.equal(gen, ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def disjoint_groups_model():
    """A tiny GQA model whose KV head 0 has keys on pairs 0-3 only and KV head 1 on pairs 4-7 only."""
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight.view(2, 16, -1)
            w[0, 4:8], w[0, 12:16], w[1, 0:4], w[1, 8:12] = 0, 0, 0, 0
    return model


def test_group_rope_slices_choose_pairs_per_group():
    """Each group keeps RoPE where its own keys are: exact at full rank with 4 pairs per group, which
    one shared key of the same RoPE width cannot be (it must serve the union, 8 pairs)."""
    ids = calib()
    ref = disjoint_groups_model()
    errs = {}
    for method, p in [("group-rope", 16), ("complex", 8)]:
        model = disjoint_groups_model()
        spec = build_spec(model.config, kv_rank=48, rope_dim=p, method=method)  # full rank G·(n + h)
        spec = convert_model(model, spec, method, ids)
        with torch.no_grad():
            errs[method] = kl(model(ids).logits, ref(ids).logits)
        if method == "group-rope":
            assert spec.rope_pairs["0"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
            q = model.model.layers[0].self_attn.q_proj.weight.view(4, 24, -1)[:, 8:]  # (H, p, d) RoPE rows
            # rotate-half over p = 16: [Re slice 0 | Re slice 1 | Im slice 0 | Im slice 1], 4 dims each
            assert q[:2, [4, 5, 6, 7, 12, 13, 14, 15]].abs().max() == 0  # group 0's heads: slice 1 is zero
            assert q[2:, [0, 1, 2, 3, 8, 9, 10, 11]].abs().max() == 0
            assert q[:2, :4].abs().min() > 0 and q[2:, 4:8].abs().min() > 0
    assert errs["group-rope"] < 1e-8 and errs["complex"] > 1e-4, errs


# ---- CLI -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,rope", [("transmla", "8"), ("mha2mla", "4"), ("best+group-rope", "8")])
def test_cli_peer_methods_round_trip(tiny_model_dir, tmp_path, method, rope):
    from xecomla_cli.checkpoint import load_checkpoint

    src = tiny_model_dir("qwen2")
    out = tmp_path / method
    args = ["--quiet", "init-svd", str(src), "--kv-rank", "16", "--rope-dim", rope, "--method", method]
    res = run_cli([*args, "--calib-tokens", "256", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lm = load_checkpoint(out)
    assert lm.spec.method == method and lm.spec.values_per_token_total == 3 * (16 + int(rope))  # budget: same total
    if method == "transmla":
        assert lm.spec.nope_dim == 16 and lm.spec.freqfold["fold"] in (2, 4, 8)
    else:
        assert lm.spec.rope_groups == 2
    ids = calib()
    with torch.no_grad():
        logits = lm.model(ids).logits
        again = load_checkpoint(out).model(ids).logits
    assert torch.isfinite(logits).all() and torch.equal(logits, again)
    res = run_cli(
        ["init-svd", str(src), "--kv-rank", "16", "--rope-dim", "6", "--method", method, "-o", str(out) + "x"]
    )
    assert res.exit_code != 0 and "--rope-dim 6" in str(res.exception)


def test_complex_rows_pair_layout():
    """The complex view used by every per-frequency method: pair j of a head is dims (j, j + h/2)."""
    w = torch.arange(32.0)[:, None]  # 2 heads of h = 16, one column
    z = complex_rows(w, 2, torch.tensor([1, 3]))
    assert z[1, 0].item() == complex(17, 25) and to_real(z[0, :, 0]).tolist() == [1.0, 3.0, 9.0, 11.0]
