"""Data-aware initialisations (init.methods and its parts, init.stats, text.calibration): the math, then the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import make_model, make_tokenizer

from xecomla_cli.errors import XecomlaError
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.convert import convert_layer
from xecomla_cli.init.latent import budget_ranks, whitened_factors
from xecomla_cli.init.methods import MethodConfig, parse_method
from xecomla_cli.init.refit import attention_head_outputs, refit_output
from xecomla_cli.init.rope_pairs import drop_pairs, pair_plan, pair_scores, rotation_weight, select_pairs
from xecomla_cli.init.shared_key import head_rotation, shared_key_fit
from xecomla_cli.init.stats import LayerStats, attention_stats, layer_stats
from xecomla_cli.layerwise import LayerRunner
from xecomla_cli.mla.rope import apply_rope, rope_cos_sin
from xecomla_cli.text.calibration import (
    calibration_documents,
    calibration_ids,
    calibration_parts,
    teacher_calibration_ids,
)
from xecomla_cli.text.teacher import teacher_samples


def kl(out, ref):
    return torch.nn.functional.kl_div(
        out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()


def calib(seed=0, B=4, T=48):
    torch.manual_seed(seed)
    return torch.randint(0, 300, (B, T))


# ---- method strings ---------------------------------------------------------------------------
def test_parse_method():
    assert parse_method("paper").is_paper
    assert parse_method("best") == MethodConfig("rot", "complex", True, True)
    assert parse_method("mha2mla") == MethodConfig(pairs="qk", group_rope=True)  # per-KV-head RoPE keys (MHA2MLA)
    assert parse_method("complex").pairs == "rot"  # a per-frequency shared key needs whole pairs
    assert parse_method("qk-pairs+rorope") == MethodConfig("qk", "rorope")
    assert parse_method("best+refit").refit
    assert parse_method("deepseek") == MethodConfig("fast", "complex", True)
    for bad in ("nope", "rorope+complex", "qk-pairs+rot-pairs", "fast-pairs+rot-pairs"):
        with pytest.raises(XecomlaError):
            parse_method(bad)


# ---- RoPE pairs --------------------------------------------------------------------------------
def test_rotation_weight():
    theta = torch.tensor([1.0, 1e-2, 1e-6])
    w = rotation_weight(theta, 2048)
    # A fast pair averages |e^{iθΔ} − 1| = 4/π; a slow one ≈ θ·mean(Δ).
    assert w[0] == pytest.approx(4 / torch.pi, rel=2e-2)
    assert w[2] == pytest.approx(1e-6 * 2047 / 2, rel=1e-3)
    assert w[0] > w[1] > w[2]


def test_pair_selection_by_qk_norm():
    H, G, P = 4, 2, 8
    q = torch.ones(H, P)
    k = torch.ones(G, P)
    k[:, 5] = 10.0  # pair 5: large keys
    q[:, 2] = 5.0  # pair 2: large queries
    k[0, 7] = 3.0  # pair 7: one KV head only
    stats = LayerStats(1, torch.eye(3, dtype=torch.float64), q.double(), k.double())
    assert select_pairs(pair_scores(stats, H, G), 6).tolist() == [2, 5, 7]
    # Rotation weighting: the same norms on a pair that does not turn lose to one that does.
    theta = torch.tensor([1.0] * 7 + [1e-7])
    assert 7 not in select_pairs(pair_scores(stats, H, G, theta), 6).tolist()
    plan = pair_plan(torch.tensor([2, 5]), 16, torch.arange(8.0))
    assert plan.rope_idx.tolist() == [2, 5, 10, 13] and plan.inv_freq.tolist() == [2.0, 5.0]
    assert sorted(plan.nope_idx.tolist() + plan.rope_idx.tolist()) == list(range(16))


# ---- RoRoPE / complex shared key ----------------------------------------------------------------
def rope_scores(q, k, theta, T=20):
    """Scores (T, T) of real rotate-half vectors q, k (…, 2m) at positions 0..T-1."""
    pos = torch.arange(T)[None]
    cos, sin = rope_cos_sin(pos, theta, 1.0, torch.float64)
    qr = apply_rope(q.expand(1, 1, T, -1), cos, sin)[0, 0]
    kr = apply_rope(k.expand(1, 1, T, -1), cos, sin)[0, 0]
    return qr @ kr.T


def to_real(z):  # complex (…, m) -> real rotate-half (…, 2m)
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("real", [True, False])
def test_head_rotation_keeps_scores_of_full_rank_keys(real):
    """Rotating the G heads' keys per frequency (and the queries with it) changes no score, at
    any position pair: RoPE is a per-frequency phase, the rotation mixes heads."""
    torch.manual_seed(0)
    G, m, d = 3, 4, 10  # heads, frequency pairs, input dim
    theta = torch.tensor([1.0, 0.3, 0.05, 0.001], dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    Kw = torch.randn(G, m, d, dtype=torch.complex128)  # full-rank keys: no head is a multiple of another
    qh = torch.randn(m, d, dtype=torch.complex128)  # one query head, of group g = 1
    g = 1
    C = torch.randn(d, d, dtype=torch.float64)
    C = C @ C.T
    U = [head_rotation(Kw[:, j], C, real=real)[0] for j in range(m)]
    for Uj in U:
        assert torch.allclose(Uj.conj().T @ Uj, torch.eye(G, dtype=Uj.dtype), atol=1e-10)
        assert real is False or Uj.imag.abs().max() == 0
    k = Kw @ x.to(Kw.dtype)  # (G, m)
    q = qh @ x.to(qh.dtype)  # (m,)
    ref = rope_scores(to_real(q), to_real(k[g]), theta)
    rot = sum(
        rope_scores(
            to_real(torch.stack([U[j][g, c].conj() * q[j] for j in range(m)])),  # q'_c = conj(U_gc)·q
            to_real(torch.stack([U[j][:, c].conj() @ k[:, j] for j in range(m)])),  # k'_c = Σ conj(U_gc)·k_g
            theta,
        )
        for c in range(G)
    )
    assert torch.allclose(rot, ref, atol=1e-9)
    # And the first rotated key holds the most energy: it is the shared key.
    e = [torch.stack([(U[j][:, c].conj() @ Kw[:, j]) for j in range(m)]) for c in range(G)]
    energy = [torch.einsum("jc,cd,jd->", ec, C.to(ec.dtype), ec.conj()).real for ec in e]
    assert energy[0] >= energy[1] >= energy[2]


def test_shared_key_fit_is_the_best_rank_one():
    torch.manual_seed(1)
    G, d = 3, 12
    K = torch.randn(G, d, dtype=torch.complex128)
    A = torch.randn(d, d, dtype=torch.float64)
    C = A @ A.T / d
    omega = torch.tensor([1.0, 2.0, 0.5])

    def err(z, s):
        R = K - z[:, None] * s[None]
        return (omega * torch.einsum("gc,cd,gd->g", R, C.to(R.dtype), R.conj()).real).sum()

    z, s = shared_key_fit(K, C, omega)
    zr, sr = shared_key_fit(K, C, omega, real=True)
    best = err(z, s)
    assert best <= err(zr, sr) + 1e-9  # a real rotation (RoRoPE) is a special case of the complex fit
    assert best <= err(torch.ones(G, dtype=K.dtype), K.mean(0)) + 1e-9  # ... and so is the mean of heads
    for _ in range(20):  # no nearby fit is better
        dz = 1e-3 * torch.randn(G, dtype=K.dtype)
        ds = 1e-3 * torch.randn(d, dtype=K.dtype)
        assert err(z + dz, s + ds) >= best - 1e-9
    # Exact when the heads' keys are complex multiples of one key.
    Km = torch.tensor([1.0, 0.5 - 2j, -1j], dtype=K.dtype)[:, None] * K[0]
    z, s = shared_key_fit(Km, C)
    assert torch.allclose(z[:, None] * s[None], Km, atol=1e-10)


def structured_model(family: str, real_multiples: bool = False):
    """A tiny GQA model whose keys live on 4 of the 8 pairs of each head, and whose second KV
    head's keys there are complex multiples of the first's: representable exactly by an MLA with
    one shared RoPE key of p = 8 dims at full latent rank."""
    model = make_model(family)
    G, h = 2, 16
    zs = torch.tensor([1.5, -0.5, 2.0, 0.7]) if real_multiples else torch.tensor([1 + 1j, 0.5 - 1j, -2j, 0.7 + 0.2j])
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj
            w = k.weight.view(G, h, -1)
            w[:, 4:8] = 0  # pairs 4..7 carry no key: NoPE there is exact
            w[:, 12:16] = 0
            z = zs.to(torch.complex64)[:, None]
            k0 = torch.complex(w[0, 0:4], w[0, 8:12])
            k1 = z * k0
            w[1, 0:4], w[1, 8:12] = k1.real, k1.imag
            if k.bias is not None:
                b = k.bias.view(G, h)
                b[:, 4:8] = 0
                b[:, 12:16] = 0
                b1 = zs.to(torch.complex64) * torch.complex(b[0, 0:4], b[0, 8:12])
                b[1, 0:4], b[1, 8:12] = b1.real, b1.imag
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_complex_shared_key_is_exact_when_heads_are_multiples(family):
    ids = calib()
    ref_model = structured_model(family)
    with torch.no_grad():
        ref = ref_model(ids).logits
    results = {}
    for method in ("complex", "rorope", "rot-pairs", "paper"):
        model = structured_model(family)
        spec = build_spec(model.config, kv_rank=48, rope_dim=8, method=method, attention_bias="keep")  # 48: full rank
        spec = convert_model(model, spec, method=method, calib_ids=ids)
        with torch.no_grad():
            out = model(ids).logits
        results[method] = (out - ref).abs().max().item()
        if method != "paper":
            assert spec.rope_pairs["0"] == [0, 1, 2, 3]
    assert results["complex"] < 1e-3, results
    # Complex multiples are not real ones: RoRoPE's real rotation and the mean key are not exact.
    assert results["rorope"] > 100 * results["complex"]
    assert results["rot-pairs"] > 100 * results["complex"]
    assert results["paper"] > 100 * results["complex"]


def test_rorope_is_exact_for_real_multiples():
    ids = calib()
    ref_model = structured_model("llama", real_multiples=True)
    model = structured_model("llama", real_multiples=True)
    spec = build_spec(model.config, kv_rank=48, rope_dim=8, method="rorope")
    spec = convert_model(model, spec, method="rorope", calib_ids=ids)
    with torch.no_grad():
        assert (model(ids).logits - ref_model(ids).logits).abs().max() < 1e-3


# ---- activation-aware low rank -------------------------------------------------------------------
def test_whitened_factors_minimise_output_error():
    torch.manual_seed(0)
    rows, d, r, N = 40, 32, 8, 2000
    W = torch.randn(rows, d, dtype=torch.float64)
    X = torch.randn(N, d, dtype=torch.float64) * torch.logspace(1, -2, d, dtype=torch.float64)  # anisotropic
    C = X.T @ X / N

    def err(up, down):
        return ((X @ (W - up.double() @ down.double()).T) ** 2).sum(1).mean().item()

    up, down, ev = whitened_factors(W, C, r)
    e = err(up, down)
    assert e == pytest.approx(ev[r:].double().sum().item(), rel=1e-4)  # Eckart-Young in the C metric
    # The same optimum as the SVD of W C^{1/2} (down = S_r V_rᵀ C^{-1/2}).
    lam, Q = torch.linalg.eigh(C)
    u, s, vt = torch.linalg.svd(W @ Q @ torch.diag(lam.sqrt()) @ Q.T)
    down2 = torch.diag(s[:r]) @ vt[:r] @ Q @ torch.diag(lam.rsqrt()) @ Q.T
    assert e == pytest.approx(err(u[:, :r], down2), rel=1e-6)
    # Better than the data-free SVD, and than any nearby subspace.
    up0, down0, _ = whitened_factors(W, None, r)
    assert e < 0.9 * err(up0, down0)
    for _ in range(10):
        Un, _ = torch.linalg.qr(up.double() + 1e-2 * torch.randn(rows, r, dtype=torch.float64))
        assert err(Un, Un.T @ W) >= e * (1 - 1e-9)
    # Without data it is the paper's truncated SVD: up·down = U_r S_r V_rᵀ.
    u, s, vt = torch.linalg.svd(W)
    assert torch.allclose(up0.double() @ down0.double(), u[:, :r] @ torch.diag(s[:r]) @ vt[:r], atol=1e-4)


def test_whiten_is_exact_at_full_rank_and_better_below():
    ids = calib()
    ref_model = make_model("llama")
    with torch.no_grad():
        ref = ref_model(ids).logits
    errs = {}
    for method, rank in [("qk-pairs", 48), ("qk-pairs+whiten", 48), ("qk-pairs", 16), ("qk-pairs+whiten", 16)]:
        model = make_model("llama")
        spec = build_spec(model.config, kv_rank=rank, rope_dim=8, method=method)
        spec = convert_model(model, spec, method=method, calib_ids=ids)
        with torch.no_grad():
            errs[method, rank] = kl(model(ids).logits, ref)
    # Full rank: the latent reproduces K_nope and V exactly, so only the RoPE handling differs.
    assert errs["qk-pairs", 48] == pytest.approx(errs["qk-pairs+whiten", 48], rel=1e-3, abs=1e-6)
    assert errs["qk-pairs+whiten", 16] < errs["qk-pairs", 16]


# ---- per-layer ranks under a budget --------------------------------------------------------------
def test_budget_ranks_optimal_and_within_budget():
    torch.manual_seed(0)
    energies = {i: torch.rand(48).sort(descending=True).values ** (i + 1) for i in range(3)}
    ranks = budget_ranks(energies, 16)
    assert sum(ranks.values()) == 48 and all(r % 8 == 0 and 8 <= r <= 48 for r in ranks.values())

    def kept(rs):
        return sum((energies[i][: rs[i]] / energies[i].sum()).sum().item() for i in rs)

    best = max(
        (dict(zip(range(3), rs, strict=True)) for rs in itertools.product(range(8, 49, 8), repeat=3) if sum(rs) == 48),
        key=kept,
    )
    assert kept(ranks) == pytest.approx(kept(best))
    with pytest.raises(XecomlaError):
        budget_ranks(energies, 4)


def test_budget_method_keeps_total_cache():
    ids = calib()
    model = make_model("llama")
    spec = build_spec(model.config, kv_rank=16, rope_dim=8, method="best")
    spec = convert_model(model, spec, method="best", calib_ids=ids)
    assert sum(spec.kv_ranks) == 3 * 16 and all(r % 8 == 0 for r in spec.kv_ranks)
    assert spec.rank_budget == 48
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.kv_rank == spec.kv_ranks[i]


# ---- calibration ---------------------------------------------------------------------------------
def test_calibration_texts_and_ids(tmp_path):
    tok = make_tokenizer()
    (tmp_path / "a.txt").write_text("Shall I compare thee to a summer's day? " * 40)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "The quick brown fox jumps. " * 40}) + "\n\n")
    assert len(list(calibration_documents(tmp_path))) == 2
    assert list(calibration_documents(tmp_path / "b.jsonl"))[0].startswith("The quick")
    ids = calibration_ids(tok, tmp_path, tokens=300, seq_len=64)
    assert ids.shape[1] == 64 and ids.numel() >= 300
    default = calibration_ids(tok, None, tokens=256, seq_len=128)  # the Shakespeare slice
    assert default.shape == (2, 128)
    with pytest.raises(XecomlaError):
        list(calibration_documents(tmp_path / "missing.txt"))
    with pytest.raises(XecomlaError):
        calibration_ids(tok, tmp_path / "a.txt", tokens=5000, seq_len=5000)
    assert torch.equal(calibration_ids(tok, "shakespeare", tokens=256, seq_len=128), default)
    assert calibration_parts("teacher+shakespeare") == ["teacher", "shakespeare"]
    (tmp_path / "x+y.txt").write_text("a file whose name has a plus")
    assert calibration_parts(str(tmp_path / "x+y.txt")) == [str(tmp_path / "x+y.txt")]
    with pytest.raises(XecomlaError, match="join different sources with one"):
        calibration_parts("teacher++shakespeare")


def test_teacher_calibration_is_the_models_own_text_apart_from_distills():
    model, tok = make_model("llama"), make_tokenizer()
    ids = teacher_calibration_ids(model, tok, tokens=96, seq_len=32)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert torch.equal(teacher_calibration_ids(make_model("llama"), tok, tokens=96, seq_len=32), ids)  # cached
    distill = teacher_samples(model, tok, 3, 32, batch_size=32, seed=0)  # distill --data teacher's blocks
    assert not torch.equal(distill, ids)


def test_layer_runner_stats_match_hidden_states():
    model = make_model("qwen2")
    ids = calib(B=3)
    runner = LayerRunner(model, ids, micro_batch=2)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.model.layers):
        s = layer_stats(runner, i)
        x = layer.input_layernorm(hs[i]).reshape(-1, 64)
        ref = attention_stats(layer.self_attn, x)
        assert s.n == ids.numel()
        assert torch.allclose(s.cov, (x.T @ x).double() / s.n, atol=1e-5)
        assert torch.allclose(s.cov_aug[-1, :-1], x.mean(0).double(), atol=1e-5)
        assert torch.allclose(s.q_pair_norm, ref.q_pair_norm, atol=1e-4)
        q = layer.self_attn.q_proj(x).view(-1, 4, 2, 8)
        assert torch.allclose(s.q_pair_norm[1, 3], q[:, 1, :, 3].norm(dim=-1).mean().double(), atol=1e-4)
        runner.advance(i)


def test_refit_output_reduces_layer_error_and_is_exact_at_full_rank():
    import copy

    ids = calib(B=6)
    model = make_model("llama")
    runner = LayerRunner(model, ids)
    stats, xs = layer_stats(runner, 0), runner.attention_inputs(0)
    old = model.model.layers[0].self_attn

    def err(attn):
        e = 0.0
        for x, c in zip(xs, runner.chunks, strict=True):
            y = attention_head_outputs(old, x.float(), c) @ old.o_proj.weight.double().T
            y2 = attention_head_outputs(attn, x.float(), c) @ attn.o_proj.weight.double().T
            e += ((y - y2) ** 2).sum().item()
        return e

    for rank, method in [(16, "complex+whiten"), (48, "complex")]:
        spec = build_spec(model.config, kv_rank=rank, rope_dim=8, method=method)
        new = convert_layer(model, spec, 0, parse_method(method), stats)
        refit = copy.deepcopy(new)
        refit_output(old, refit, xs, runner.chunks)
        assert err(refit) < 0.7 * err(new)
    # When the MLA already reproduces the heads' outputs, the refit leaves W_o unchanged.
    same = copy.deepcopy(old)
    refit_output(old, same, xs, runner.chunks)
    assert torch.allclose(same.o_proj.weight, old.o_proj.weight, atol=1e-4)


# ---- CLI -----------------------------------------------------------------------------------------
def run_cli(args):
    from typer.testing import CliRunner

    from xecomla_cli.cli import app

    result = CliRunner().invoke(app, args)
    return result


def test_cli_method(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from xecomla_cli.checkpoint import load_checkpoint

    src = tiny_model_dir("llama")
    text = tmp_path / "calib.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 60)
    out = tmp_path / "best"
    base = ["--quiet", "init-svd", str(src), "--kv-rank", "16", "--rope-dim", "8"]
    res = run_cli([*base, "--method", "best", "--calib-data", str(text), "--calib-tokens", "256", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lm = load_checkpoint(out)
    assert lm.spec.method == "best" and sum(lm.spec.kv_ranks) == 48
    assert lm.spec.calibration["tokens"] >= 256
    ids = calib()
    assert torch.isfinite(lm.model(ids).logits).all()
    # The paper's data-free init is unchanged: the CLI's weights equal a direct paper conversion.
    args = [*base, "--method", "paper", "--no-latent-norm"]
    res = run_cli([*args, "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    from xecomla_cli.sources import load_model

    model = load_model(str(src)).model
    convert_model(model, build_spec(model.config, kv_rank=16, rope_dim=8))
    saved = load_file(str(tmp_path / "p" / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v), k
    # One-line errors.
    res = run_cli(["init-svd", str(src), "--kv-rank", "16", "--method", "magic", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown --method 'magic'" in res.output  # refused while parsing
    args = ["init-svd", str(src), "--kv-rank", "16", "--method", "paper", "--no-latent-norm", "--calib-data", str(text)]
    res = run_cli([*args, "-o", str(tmp_path / "y")])
    assert res.exit_code != 0 and "--method" in str(res.exception)


# ---- dropping fast pairs that get no RoPE slot ---------------------------------------------------
def test_fast_pairs_rule():
    # E_Δ cos(θΔ) over Δ = 0..T-1: 1 for θ = 0 (kept unrotated for free), ~0 for a fast pair.
    inv_freq = torch.tensor([0.0, 1e-4, 0.5, 1.0])
    assert drop_pairs(inv_freq, context=2048).tolist() == [False, False, True, True]


def test_drop_zeroes_the_dropped_score_terms():
    ids = calib()
    model = make_model("llama")
    h = model.config.head_dim
    spec = build_spec(model.config, kv_rank=16, rope_dim=8, method="rot-pairs+drop")
    spec = convert_model(model, spec, method="rot-pairs+drop", calib_ids=ids)
    attn = model.model.layers[0].self_attn
    n = spec.nope_dim
    # Some no-RoPE dims turn fast in the tiny model's RoPE (theta 10000, h=16): their query rows are zero.
    q = attn.q_proj.weight.view(spec.num_heads, h, -1)[:, :n]  # (H, n, d): no-RoPE query rows
    zero_rows = (q.abs().sum(-1) == 0).all(0)  # (n,)
    assert zero_rows.any() and not zero_rows.all()
    # ... and the K up-projection spends nothing on them: its rows for those dims are zero too.
    up = attn.kv_b_proj.weight.view(spec.num_heads, n + h, -1)[:, :n]
    assert up[:, zero_rows].abs().max() < 1e-6 * up.abs().max()
    assert model(ids).logits.isfinite().all()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_wide_keeps_the_scores_and_adds_trainable_no_rope_dims(family):
    ids = calib()
    logits, specs, models = {}, {}, {}
    for method in ("deepseek", "deepseek+wide0"):
        model = make_model(family)
        spec = build_spec(model.config, kv_rank=16, rope_dim=8, method=method)
        specs[method] = convert_model(model, spec, method=method, calib_ids=ids)
        models[method] = model
        with torch.no_grad():
            logits[method] = model(ids).logits
    h = models["deepseek"].config.head_dim
    assert specs["deepseek"].nope_dim == h - 8 and specs["deepseek+wide0"].nope_dim == h
    # At init the extra dims' keys are zero: the model computes the same function.
    assert torch.allclose(logits["deepseek+wide0"], logits["deepseek"], atol=1e-4, rtol=1e-4)
    attn = models["deepseek+wide0"].model.layers[0].self_attn
    n = h
    up_k = attn.kv_b_proj.weight.view(specs["deepseek+wide0"].num_heads, n + h, -1)[:, :n]  # (H, n, r)
    zero = (up_k.abs().amax(-1) < 1e-6 * up_k.abs().max()).all(0)  # (n,): the RoPE dims' key rows
    assert zero.sum() == 8
    q = attn.q_proj.weight.view(specs["deepseek+wide0"].num_heads, n + 8, -1)[:, :n]
    assert (q[:, zero].abs().sum(-1) > 0).all()  # their queries are kept ...
    models["deepseek+wide0"](ids).logits.logsumexp(-1).mean().backward()
    grad = attn.kv_b_proj.weight.grad.view(specs["deepseek+wide0"].num_heads, n + h, -1)[:, :n]
    assert grad[:, zero].abs().sum() > 0  # ... so the zero key rows train


def test_wide_parse():
    assert parse_method("deepseek+wide") == MethodConfig("fast", "complex", True, wide="resid")
    assert parse_method("deepseek+wide0").wide == "zero"
    assert parse_method("wide").pairs == "rot"
    assert not parse_method("transmla+wide").wide  # TransMLA keeps n = h already
    with pytest.raises(XecomlaError):
        parse_method("mha2mla+wide")


def test_cli_calib_data_teacher(tiny_model_dir, tmp_path):
    from xecomla_cli.checkpoint import load_checkpoint

    out = tmp_path / "t"
    args = ["--quiet", "init-svd", str(tiny_model_dir("llama")), "--kv-rank", "16", "--rope-dim", "8"]
    res = run_cli([*args, "--method", "deepseek", "--calib-data", "teacher", "--calib-tokens", "128", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out).spec.calibration == {"data": "teacher", "tokens": 128}
