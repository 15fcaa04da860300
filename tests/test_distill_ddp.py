"""torchrun with two CPU processes (gloo): DDP and FSDP training equal single-process training
with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from test_distill import _cfg, student_ckpt, text_file  # noqa: F401  (shared fixtures)

from xecomla_cli.checkpoint import read_meta, read_weights
from xecomla_cli.distill import run_distill

ARGS = [
    "--steps",
    "4",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--save-every",
    "2",
    "--val-tokens",
    "256",
    "--precision",
    "fp32",  # as the single-process run it is compared with
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(ckpt, data, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "xecomla_cli",
        "-q",
        "distill",
        str(ckpt),
        "--data",
        str(data),
        *ARGS,
        "-o",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


@pytest.fixture(scope="module")
def single(student_ckpt, text_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "out"
    run_distill(student_ckpt, _cfg(text_file, steps=4, save_every=2), output=out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, single, student_ckpt, text_file, tmp_path):  # noqa: F811
    out = tmp_path / mode
    proc = _torchrun(student_ckpt, text_file, out, *(["--fsdp"] if mode == "fsdp" else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)  # rank 0 alone prints (and writes)
    meta = read_meta(out)
    assert meta["distill"]["world_size"] == 2 and meta["distill"]["fsdp"] == (mode == "fsdp")
    ref, got = read_weights(single), read_weights(out)
    assert ref.keys() == got.keys()
    moved = max((ref[k] - read_weights(student_ckpt)[k]).abs().max().item() for k in ref)
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < 1e-3 * moved, (diff, moved)
    assert meta["metrics"]["val_kl"] == pytest.approx(read_meta(single)["metrics"]["val_kl"], rel=1e-3)
    assert not (tmp_path / f"{mode}.run").exists()
    assert torch.isfinite(torch.tensor(meta["metrics"]["train_kl"]))
