"""init-svd --latent-width W|vllm: r + p chosen for a serving width, refused where it saves no memory."""

from __future__ import annotations

import pytest
from test_cli import run

from xecomla_cli.engines import rank_for_width
from xecomla_cli.errors import XecomlaError
from xecomla_cli.init.run import InitOptions, run_init
from xecomla_cli.sources import load_model


def width(text: str, G: int, h: int, rope_dim=None):
    return rank_for_width(text, original_per_layer=2 * G * h, head_dim=h, rope_dim=rope_dim, default_rope_dim=h // 2)


def test_vllm_preset_picks_deepseeks_split_or_the_default_rope():
    assert width("vllm", G=8, h=128) == (512, 64)  # Llama-3-8B: 2048 -> 576, 3.6x
    assert width("vllm", G=8, h=64) == (544, 32)  # Llama-3.2-1B: p = 64 would leave no no-RoPE dims
    assert width("vllm", G=8, h=128, rope_dim=32) == (544, 32)
    assert width("320", G=8, h=128) == (256, 64)
    assert width("100", G=3, h=64) == (68, 32)


def test_vllm_preset_refuses_where_it_saves_nothing():
    with pytest.raises(XecomlaError) as err:
        width("vllm", G=3, h=64)  # the demo: 384 values per token per layer
    msg = str(err.value)
    assert "\n" not in msg and "384" in msg and "--latent-width 320" in msg and "--kv-rank" in msg
    with pytest.raises(XecomlaError, match="caches 256 values") as err:
        width("vllm", G=2, h=64)
    assert "320" not in str(err.value)  # no vLLM width below 256: only --kv-rank is offered
    with pytest.raises(XecomlaError, match="no latent"):
        width("32", G=8, h=128)
    with pytest.raises(XecomlaError, match="not a number"):
        width("big", G=8, h=128)


def test_init_svd_vllm_preset_on_a_wide_tiny_model(tiny_model_dir, tmp_path):
    """2·G·h = 1024 > 576: r 512 + p 64 in every layer, the spec records the preset."""
    src = tiny_model_dir(
        "llama", hidden_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=128, num_hidden_layers=1
    )
    path = run_init(str(src), InitOptions(latent_width="vllm", output=tmp_path / "ck"))
    spec = load_model(str(path)).spec
    assert (spec.kv_ranks, spec.rope_dim, spec.values_per_token(0)) == ([512], 64, 576)
    assert spec.latent_width == "vllm"


def test_init_svd_latent_width_refusal_is_one_line(tiny_model_dir, tmp_path):
    proc = run(
        "init-svd", str(tiny_model_dir("llama")), "--latent-width", "vllm", "-o", str(tmp_path / "x"), check=False
    )
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Loading weights" not in x]  # transformers bar
    assert proc.returncode == 1 and len(lines) == 1 and "would not save memory" in lines[0]
    assert "caches 64 values per token per layer" in lines[0] and not (tmp_path / "x").exists()
    both = run("init-svd", str(tiny_model_dir("llama")), "--latent-width", "vllm", "--kv-rank", "8", check=False)
    assert both.returncode == 1 and "exactly one of" in both.stderr
