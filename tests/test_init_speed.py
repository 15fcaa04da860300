"""The faster paths of init-svd give what their references give (init speed, issue 27)."""

from __future__ import annotations

import torch
from conftest import calib_ids, make_model

from xecomla_cli.init import build_spec, convert_model
from xecomla_cli.init.stats import pair_norms


def test_pair_norms_are_the_reference_norms_to_float_rounding():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(512, 4 * 16, generator=g) * torch.logspace(-3, 3, 64)  # wide range of magnitudes
    got = pair_norms(y, 4)
    halves = y.double().view(512, 4, 2, 8)
    exact = halves.norm(dim=2)  # (N, 4, 8) in fp64
    reference = y.view(512, 4, 2, 8).norm(dim=2)  # what pair_norms computed before (fp32)
    per_token = torch.hypot(y.view(512, 4, 2, 8)[:, :, 0], y.view(512, 4, 2, 8)[:, :, 1])
    assert torch.allclose(per_token.double(), exact, rtol=2**-23, atol=0)  # within one fp32 rounding
    assert torch.allclose(per_token, reference, rtol=2**-22, atol=0)
    assert torch.allclose(got, exact.float().sum(0).double(), rtol=1e-6)
    assert got.shape == (4, 8) and got.dtype == torch.float64


def test_the_paper_init_with_a_latent_norm_collects_no_statistics(monkeypatch):
    """paper's factors are data-free: its calibration pass collects only the latent norm's inputs
    (the statistics cost a third of that pass); a data-aware method still collects them."""
    from xecomla_cli.init import convert as convert_module

    ids = calib_ids(batch=2, seq=32)
    spec = build_spec(make_model("llama").config, kv_rank=16, latent_norm=True)
    calls = []
    layer_stats = convert_module.layer_stats
    monkeypatch.setattr(convert_module, "layer_stats", lambda r, i: calls.append(i) or layer_stats(r, i))
    model = make_model("llama")
    convert_model(model, spec, "paper", ids)
    assert calls == [] and all(layer.self_attn.kv_rank == 16 for layer in model.model.layers)
    convert_model(make_model("llama"), spec, "whiten", ids)
    assert calls == [0, 1, 2]


def test_the_norm_channel_fit_reuses_the_latent_energy_bit_for_bit():
    from xecomla_cli.init.latent_norm import scale_error

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64)
    down, row = torch.randn(7, 24, generator=g), torch.randn(24, generator=g)
    energy = (x @ down.double().T).pow(2).sum(-1)
    assert torch.equal(scale_error(x, down, row, 0.9, 8, energy=energy), scale_error(x, down, row, 0.9, 8))
