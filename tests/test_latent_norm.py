"""The latent norm's channel (init.latent_norm): its stated objective, every method's default, export, training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from xecomla_cli.checkpoint import load_checkpoint
from xecomla_cli.distill.trainer import freeze_non_mla
from xecomla_cli.errors import XecomlaError
from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.latent_norm import (
    add_norm_channel,
    fit_norm_channel,
    normed_latent_error,
    scale_error,
    token_weights,
)
from xecomla_cli.layerwise import LayerRunner
from xecomla_cli.mla.attention import LatentRMSNorm
from xecomla_cli.mla.rebuild import decoder_layers


def ids(seed=0, B=4, T=48):
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def sphere_case(N=512, d=12, r=6, seed=0):
    """Inputs whose last coordinate makes up the latent's energy to exactly K = 2·max‖D x‖²: one linear
    channel (the last coordinate) gives every token the same RMS. Returns blocks, D and the dominance k
    with K = (1 + k²)·E‖D x‖²."""
    g = torch.Generator().manual_seed(seed)
    down = torch.cat([torch.randn(r - 1, d - 1, generator=g), torch.zeros(r - 1, 1)], 1) / d**0.5
    z = torch.randn(N, d - 1, generator=g)
    e = (z @ down[:, :-1].T).pow(2).sum(1)
    K = 2 * e.max()
    x = torch.cat([z, (K - e).sqrt()[:, None]], 1)
    return x.view(8, N // 8, d), down, float((K / e.mean() - 1) ** 0.5)


def test_exact_when_one_channel_can_even_out_the_energy():
    blocks, down, k = sphere_case()
    ch = fit_norm_channel([blocks], down, rank=6, dominance=k, ridge=0.0, sink_share=0.0, eps=0.0)
    e = torch.zeros(12)
    e[-1] = 1
    assert torch.allclose(ch.row, e, atol=1e-4)  # the regression finds the coordinate
    assert ch.error < 1e-5 and ch.max_scale == pytest.approx(1, abs=1e-5)
    # A little ridge moves it only a little; a unit norm (γ = 1) would be off by the latent's RMS.
    assert fit_norm_channel([blocks], down, rank=6, dominance=k, sink_share=0.0).error < 1e-2


def test_gain_minimises_the_weighted_scale_error():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 10) + 3 * torch.ones(10)  # a mean direction, some spread
    down = torch.randn(5, 10) / 3
    ch = fit_norm_channel([x], down, rank=6)
    w = token_weights([x])
    flat = x.reshape(-1, 10)

    def err(gain):
        s1 = scale_error(flat, down, ch.row, gain, 6)
        return float((w * s1**2).sum() / w.sum()) ** 0.5

    assert err(ch.gain) == pytest.approx(ch.error, rel=1e-6)
    assert err(ch.gain) < err(ch.gain * 1.001) and err(ch.gain) < err(ch.gain * 0.999)


def test_sink_tokens_get_their_share_of_the_weight():
    w = token_weights([torch.zeros(2, 10, 3), torch.zeros(3, 10, 3)], sink_share=0.1)
    first = torch.arange(50) % 10 == 0
    assert float(w[first].sum() / w.sum()) == pytest.approx(0.1) and torch.all(w[~first] == 1)


def test_module_error_is_the_constructions_scale_error():
    """The MLAAttention's own norm path gives exactly the error the construction predicts; with a
    "massive activation" (one hidden dim offset in every token, as LLMs have) it is far below a unit
    norm's (the former --latent-norm) on the same weights."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 2.0
    calib = ids()
    runner = LayerRunner(model, calib)
    x = decoder_layers(model)[0].input_layernorm(runner.chunks[0].h)  # (B, T, d)
    spec = build_spec(model.config, kv_rank=16, latent_norm=True, method="deepseek")
    convert_model(model, spec, "deepseek", calib)
    attn = decoder_layers(model)[0].self_attn
    r = attn.kv_rank
    W = attn.kv_a_proj_with_mqa.weight.detach()
    gain = float(attn.kv_a_layernorm.weight[0].detach())
    assert torch.all(attn.kv_a_layernorm.weight[:-1] == gain) and attn.kv_a_layernorm.weight[-1] == 0
    assert torch.all(attn.kv_b_proj.weight[:, -1] == 0)  # the norm channel reaches no key or value
    flat = x.reshape(-1, x.shape[-1]).detach().double()
    s1 = scale_error(flat, W[: r - 1], W[r - 1], gain, r)
    uc = (flat @ W[: r - 1].double().T) @ attn.kv_b_proj.weight[:, : r - 1].detach().double().T
    predicted = float((s1[:, None] ** 2 * uc**2).sum() / uc.pow(2).sum()) ** 0.5
    assert normed_latent_error(attn, x) == pytest.approx(predicted, rel=1e-4) and predicted < 0.01
    attn.kv_a_layernorm = LatentRMSNorm(r)
    assert normed_latent_error(attn, x) > 10 * predicted


def test_norm_channel_stays_a_norm_channel_under_training():
    """Its γ and up-projection column are both zero: gradients keep them zero, the rest trains."""
    model = make_model("llama")
    calib = ids()
    spec = build_spec(model.config, kv_rank=16, latent_norm=True)
    convert_model(model, spec, "paper", calib)
    assert freeze_non_mla(model) > 0
    attn = decoder_layers(model)[1].self_attn
    assert attn.kv_a_layernorm.weight.requires_grad
    before = attn.kv_a_layernorm.weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(calib, labels=calib).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    gamma = attn.kv_a_layernorm.weight.detach()
    assert not torch.equal(gamma[:-1], before[:-1])  # the norm weight trains
    assert gamma[-1] == 0 and torch.all(attn.kv_b_proj.weight[:, -1] == 0)


def test_latent_norm_needs_calibration_and_rank_two():
    model = make_model("llama")
    with pytest.raises(XecomlaError, match="calibration"):
        convert_model(model, build_spec(model.config, kv_rank=16, latent_norm=True))
    with pytest.raises(XecomlaError, match="r >= 2"):
        convert_model(model, build_spec(model.config, kv_rank=1, latent_norm=True), "paper", ids())
    with pytest.raises(XecomlaError, match="calibration"):
        add_norm_channel({}, None, 16)


# ---- every method's default checkpoint, its export, the opt-out --------------------------------
def run_cli(args):
    from typer.testing import CliRunner

    from xecomla_cli.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("method,rope", [("paper", "8"), ("deepseek", "8"), ("transmla", "8"), ("mha2mla", "4")])
def test_every_method_defaults_to_a_portable_latent_norm(tiny_model_dir, tmp_path, method, rope):
    from xecomla_cli.export import export_checkpoint, plan_export

    src = tiny_model_dir("llama")
    out = tmp_path / method
    args = ["--quiet", "init-svd", str(src), "--kv-rank", "16", "--rope-dim", rope, "--method", method]
    res = run_cli([*args, "--calib-tokens", "256", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lm = load_checkpoint(out)
    assert lm.spec.latent_norm and lm.spec.kv_ranks == [16, 16, 16]  # the cache budget is unchanged
    assert lm.spec.calibration["tokens"] >= 256
    for layer in decoder_layers(lm.model):
        assert layer.self_attn.kv_a_layernorm.weight[-1] == 0
    if method == "mha2mla":  # per-group RoPE slices: not the DeepSeek-V3 layout, the norm is there all the same
        with pytest.raises(XecomlaError, match="per-group RoPE"):
            plan_export(lm)
        return
    plan = plan_export(lm)
    assert plan.latent == "norm" and not plan.attention_bias and plan.portable
    result = export_checkpoint(out, tmp_path / "export", portable=True)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert not [k for k in weights if "self_attn" in k and k.endswith(".bias")]
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["attention_bias"] is False and cfg["kv_lora_rank"] == 16
    assert result.verify["greedy_tokens_equal"]


def test_no_latent_norm_is_the_paper_latent_exported_with_the_emulation(tiny_model_dir, tmp_path):
    from xecomla_cli.export import plan_export
    from xecomla_cli.sources import load_model

    src = tiny_model_dir("llama")
    out = tmp_path / "p"
    paper = ["--method", "paper", "--no-latent-norm"]
    res = run_cli(["--quiet", "init-svd", str(src), "--kv-rank", "16", *paper, "-o", str(out)])
    assert res.exit_code == 0, res.output
    lm = load_checkpoint(out)
    assert not lm.spec.latent_norm and lm.spec.calibration is None  # data-free, as the paper
    plan = plan_export(lm)
    assert plan.latent == "identity" and plan.attention_bias and plan.kv_lora_rank == 17
    model = load_model(str(src)).model
    convert_model(model, build_spec(model.config, kv_rank=16))
    assert torch.equal(lm.model.state_dict()["model.layers.0.self_attn.kv_b_proj.weight"],
                       model.state_dict()["model.layers.0.self_attn.kv_b_proj.weight"])  # fmt: skip
    text = tmp_path / "calib.txt"
    text.write_text("Shall I compare thee to a summer's day? " * 50)
    res = run_cli(["init-svd", str(src), "--kv-rank", "16", *paper, "--calib-data", str(text)])
    assert res.exit_code != 0 and "data-free" in str(res.exception)
