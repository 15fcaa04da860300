"""The streamed init-svd (one decoder layer in memory at a time, ``init.streamed``) writes the checkpoint
that converting the whole model in memory writes, bit for bit; a bf16 source gives a bf16 checkpoint;
refusals the config decides come before any weight is read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import LLAMA3_ROPE, TEXT, make_model, save_model
from test_cli import run

from xecomla_cli.checkpoint import read_meta, read_weights
from xecomla_cli.choices import DEFAULT_CALIB_DATA
from xecomla_cli.errors import XecomlaError
from xecomla_cli.init.convert import convert_model
from xecomla_cli.init.run import InitOptions, run_init
from xecomla_cli.init.spec_builder import build_spec, parse_layers
from xecomla_cli.loaded import parse_dtype
from xecomla_cli.mla.kv_spectrum import layer_singular_values
from xecomla_cli.mla.spec import MLASpec
from xecomla_cli.sources import load_model
from xecomla_cli.text.calibration import TEACHER, calibration_ids, teacher_calibration_ids
from xecomla_cli.weights_on_disk import WeightsOnDisk


def in_memory_init(source: str, opts: InitOptions):
    """The in-memory init-svd (before #37): the whole model loaded in fp32, ``convert_model``, cast to the
    checkpoint's dtype. Returns the converted spec and the state dict a checkpoint stores."""
    loaded = load_model(source, dtype="float32")
    model, cfg = loaded.model, opts.method_config
    sv = layer_singular_values(model) if opts.energy is not None else None
    spec = build_spec(
        model.config,
        kv_rank=opts.kv_rank,
        energy=opts.energy,
        rope_dim=opts.rope_dim,
        q_rank=opts.q_rank,
        layers=parse_layers(opts.layers, model.config.num_hidden_layers),
        latent_norm=opts.latent_norm,
        method=opts.method_name,
        kv_rows=opts.kv_rows,
        singular_values=sv,
        rope_frequencies=opts.rope_frequencies,
        rope_span=opts.rope_span,
        attention_bias=opts.attention_bias,
    )
    calib = None
    if opts.calibrates or spec.biases_folded:
        data = opts.calib_data or DEFAULT_CALIB_DATA
        parts = [TEACHER, data[len(TEACHER) + 1 :]] if data.startswith(f"{TEACHER}+") else [data]  # the tests' mix
        share = opts.calib_tokens // len(parts)
        calib = torch.cat([
            teacher_calibration_ids(model, loaded.tokenizer, share) if part == TEACHER
            else calibration_ids(loaded.tokenizer, part, share)
            for part in parts
        ])  # fmt: skip
        spec = replace(spec, calibration={"data": data, "tokens": calib.numel()})
    spec = convert_model(model, spec, cfg, calib)
    if opts.dtype not in ("auto", "float32"):
        model.to(parse_dtype(opts.dtype))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return spec, state


def assert_same_checkpoint(path, spec: MLASpec, state: dict[str, torch.Tensor]) -> None:
    got = read_weights(path)
    assert sorted(got) == sorted(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name
    recorded = json.loads(json.dumps(spec.to_dict()))  # as xecomla.json holds it (string keys)
    assert read_meta(path)["mla"] == recorded


CASES = {
    # the default (TransMLA: its fold searched on the calibration text) with the latent norm
    "transmla": ("llama", {}, dict(kv_rank=8, calib_tokens=1024)),
    "paper-data-free": ("llama", {}, dict(kv_rank=12, method="paper", latent_norm=False, q_rank=24)),
    "best-budget": ("mistral", {}, dict(kv_rank=16, method="best", calib_tokens=512)),
    "deepseek-refit-layers": ("llama", {}, dict(kv_rank=8, method="deepseek+refit", layers="0,2", calib_tokens=512)),
    "qwen2-folded-biases": ("qwen2", {}, dict(kv_rank=8, method="deepseek", calib_tokens=512)),
    "energy-tied": ("llama", {"tie_word_embeddings": True}, dict(energy=0.9, method="paper", calib_tokens=256)),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, dict(kv_rank=8, calib_tokens=512)),
    "group-rope": ("mha", {}, dict(kv_rank=16, method="mha2mla", calib_tokens=256)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_init_equals_the_in_memory_conversion(case, tiny_model_dir, tmp_path):
    family, overrides, options = CASES[case]
    if any(isinstance(v, dict) for v in overrides.values()):  # not hashable: not cached by the fixture
        src = str(save_model(make_model(family, **overrides), tmp_path / "src"))
    else:
        src = str(tiny_model_dir(family, **overrides))
    opts = InitOptions(output=tmp_path / "ck", **options)
    path = run_init(src, opts)
    spec, state = in_memory_init(src, opts)
    assert_same_checkpoint(path, spec, state)
    assert load_model(str(path)).spec == MLASpec.from_dict(read_meta(path)["mla"])  # every later stage reads it


def test_a_file_of_calibration_text_gives_the_same_checkpoint(tiny_model_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join([TEXT * 8] * 6))
    src = str(tiny_model_dir("llama"))
    opts = InitOptions(output=tmp_path / "ck", kv_rank=8, calib_data=str(text), calib_tokens=256)
    path = run_init(src, opts)
    assert_same_checkpoint(path, *in_memory_init(src, opts))


def test_a_calibration_mix_shares_the_tokens(tiny_model_dir, tmp_path):
    """--calib-data teacher+FILE: half the tokens sampled from the model, half from the file, in that order."""
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join([TEXT * 8] * 6))
    src = str(tiny_model_dir("llama"))
    opts = InitOptions(output=tmp_path / "mix", kv_rank=8, calib_data=f"teacher+{text}", calib_tokens=256)
    path = run_init(src, opts)
    assert read_meta(path)["mla"]["calibration"] == {"data": f"teacher+{text}", "tokens": 256}
    assert_same_checkpoint(path, *in_memory_init(src, opts))
    alone = run_init(src, replace(opts, output=tmp_path / "file", calib_data=str(text)))
    assert not torch.equal(read_weights(alone)["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                           read_weights(path)["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])  # fmt: skip


def test_a_bf16_source_gives_a_bf16_checkpoint(tmp_path):
    src = save_model(make_model("llama").to(torch.bfloat16), tmp_path / "bf16")
    assert WeightsOnDisk(src).floating_dtype() == torch.bfloat16
    path = run_init(str(src), InitOptions(output=tmp_path / "ck", kv_rank=8, calib_tokens=512))
    meta = read_meta(path)
    weights = read_weights(path)
    assert meta["dtype"] == "bfloat16"
    # every tensor bf16 but the MLA's RoPE frequencies, which ``MLAAttention`` keeps in fp32 in any dtype
    assert {n: t.dtype for n, t in weights.items() if t.dtype != torch.bfloat16} == {
        f"model.layers.{i}.self_attn.rope_inv_freq": torch.float32 for i in range(3)
    }
    # the math in fp32 per layer, then bf16: what the in-memory conversion gives cast to bf16
    spec, state = in_memory_init(str(src), InitOptions(kv_rank=8, calib_tokens=512, dtype="bfloat16"))
    assert_same_checkpoint(path, spec, state)
    # the source's own tensors (embeddings, norms, MLP) are copied as they are
    source = WeightsOnDisk(src)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert torch.equal(weights[name], source.get(name))
    forced = run_init(str(src), InitOptions(output=tmp_path / "f32", kv_rank=8, calib_tokens=512, dtype="float32"))
    assert read_meta(forced)["dtype"] == "float32"


def test_a_big_checkpoint_is_written_in_shards_with_an_index(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("xecomla_cli.weights_writer.MAX_SHARD_BYTES", 40_000)
    src = str(tiny_model_dir("llama"))
    opts = InitOptions(output=tmp_path / "ck", kv_rank=8, method="paper", latent_norm=False)
    path = run_init(src, opts)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (path / "model.safetensors.index.json").is_file()
    assert_same_checkpoint(path, *in_memory_init(src, opts))


def corrupt_copy(src, tmp_path):
    """The source with its weights file cut short: any read of a weight fails."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    return bad


@pytest.mark.parametrize(
    "family,args,message",
    [
        ("llama", ["--kv-rank", "8", "--rope-dim", "7"], "--rope-dim 7 is invalid"),
        ("llama", ["--kv-rank", "1"], "latent norm needs r >= 2"),
        ("llama", ["--kv-rank", "4", "--method", "best"], "below the smallest per-layer rank"),
        ("qwen2", ["--kv-rank", "8", "--q-rank", "16"], "--q-rank with --attention-bias fold"),
        ("llama", ["--kv-rank", "8", "--layers", "0-9"], "out of range"),
    ],
)
def test_refusals_come_before_any_weight_is_read(family, args, message, tiny_model_dir, tmp_path):
    bad = corrupt_copy(tiny_model_dir(family), tmp_path)
    proc = run("init-svd", str(bad), *args, "-o", str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "corrupt" not in proc.stderr and not (tmp_path / "out").exists()


def test_an_unsupported_family_is_refused_from_its_config(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(XecomlaError, match="unsupported architecture"):
        run_init(str(d), InitOptions(kv_rank=8, output=tmp_path / "out"))


def test_the_cost_is_said_before_a_long_run(tiny_model_dir, tmp_path, monkeypatch):
    import xecomla_cli.init.estimate as estimate

    monkeypatch.setattr(estimate, "LONG_SECONDS", -1)
    monkeypatch.setattr(estimate, "BIG_MODEL", 0)
    lines = []
    monkeypatch.setattr("xecomla_cli.init.run.console_line", lambda line: lines.append(line))
    run_init(str(tiny_model_dir("llama")), InitOptions(kv_rank=8, calib_tokens=256, output=tmp_path / "ck"))
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "GFLOP/s" in lines[0] and "peak of" in lines[0] and "samples 256 tokens" in lines[0]
    assert "--calib-data FILE" in lines[0]


def test_teacher_calibration_that_cannot_fit_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    """--calib-data teacher loads the whole model to sample: with too little RAM free, one line, nothing written."""
    import xecomla_cli.init.estimate as estimate

    monkeypatch.setattr(estimate, "mem_available", lambda: 100 * 2**20)  # 100 MiB free
    src = str(tiny_model_dir("llama"))
    with pytest.raises(XecomlaError, match="samples text from the whole model.*--calib-data FILE"):
        run_init(src, InitOptions(kv_rank=8, output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    run_init(src, InitOptions(kv_rank=8, output=tmp_path / "file", calib_data="shakespeare", calib_tokens=256))
