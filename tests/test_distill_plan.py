"""distill --plan: the memory plan's weights, gradients and optimizer state are the exact bytes of the
modules and the optimizer a run builds; FSDP shards them over N processes and DDP adds its buckets;
--plan loads nothing, writes nothing and exits 0.

(How close the activations and the KD loss's logits come to a measured peak is not a unit test:
bench/distill_plan.py measures it, docs/results/2026-12-07-distill-plan.md records it.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from test_distill import _cfg, student_ckpt, text_file  # noqa: F401  (shared fixtures)

from xecomla_cli.checkpoint import load_checkpoint
from xecomla_cli.distill.config import resolve_config
from xecomla_cli.distill.memory_plan import StepShape, activations, layer_activations
from xecomla_cli.distill.model_sizes import converted_bytes, plan_distill
from xecomla_cli.distill.trainer import adamw, freeze_non_mla
from xecomla_cli.errors import XecomlaError
from xecomla_cli.sources import load_model

CLI = [sys.executable, "-m", "xecomla_cli"]


def nbytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


@pytest.mark.parametrize("freeze", [False, True])
def test_weights_gradients_and_adamw_are_the_built_modules_bytes(student_ckpt, text_file, freeze):  # noqa: F811
    options = _cfg(text_file, freeze_non_mla=freeze)
    plan = plan_distill(student_ckpt, options, world=1, device="cpu")
    student = load_checkpoint(student_ckpt, dtype="float32").model
    if freeze:
        freeze_non_mla(student)
    trained = [p for p in student.parameters() if p.requires_grad]
    memory = plan.memory
    assert memory.row("student weights") == nbytes(student.parameters())
    assert memory.row("gradients") == nbytes(trained) and plan.student.trainable == sum(p.numel() for p in trained)
    if freeze:
        assert 0 < plan.student.trainable < plan.student.params and not plan.student.head_trainable

    # AdamW's state after one step, as the trainer builds it
    for p in trained:
        p.grad = torch.zeros_like(p)
    cfg = resolve_config(options, student_source=str(student_ckpt), device=torch.device("cpu"))
    optimizer = adamw(student, cfg, fused=False)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert memory.row("optimizer state") == sum(t.numel() * t.element_size() for t in state)

    teacher = load_model(plan.cfg.teacher, dtype="float32").model
    assert memory.row("teacher weights") == nbytes(teacher.parameters())
    assert memory.peak >= memory.end_of_forward > memory.row("student weights")


def test_a_bf16_run_holds_the_teacher_in_bf16(student_ckpt, text_file):  # noqa: F811
    plan = plan_distill(student_ckpt, _cfg(text_file, precision="bf16"), world=1, device="cpu")
    teacher = load_model(plan.cfg.teacher, dtype="bfloat16").model
    assert plan.memory.row("teacher weights") == nbytes(teacher.parameters())
    assert plan.memory.row("student weights") == plan.student.params * 4  # fp32 master weights


def test_loading_counts_a_teacher_file_in_another_dtype(student_ckpt, text_file):  # noqa: F811
    from xecomla_cli.weights_on_disk import WeightsOnDisk

    plan = plan_distill(student_ckpt, _cfg(text_file), world=1, device="cpu")
    teacher_dir = plan.cfg.teacher  # the tiny teacher is saved in fp32
    on_disk = WeightsOnDisk(teacher_dir)
    assert on_disk.floating_dtype() == torch.float32
    assert converted_bytes(on_disk.directory, torch.float32, plan.teacher.params) == 0  # loaded in place
    assert converted_bytes(on_disk.directory, torch.bfloat16, plan.teacher.params) == on_disk.nbytes()
    memory = plan.memory
    assert memory.loading >= memory.row("runtime") + 2 * memory.row("student weights")  # its file + the model


def test_fsdp_shards_over_n_processes_and_ddp_adds_its_buckets(student_ckpt, text_file):  # noqa: F811
    options = _cfg(text_file, batch_size=8)
    one = plan_distill(student_ckpt, options, world=1, device="cuda").memory
    ddp = plan_distill(student_ckpt, options, world=4, device="cuda").memory
    fsdp = plan_distill(student_ckpt, dataclasses.replace(options, fsdp=True), world=4, device="cuda").memory
    for row in ("student weights", "gradients", "optimizer state"):
        assert ddp.row(row) == one.row(row)
        assert fsdp.row(row) == one.row(row) // 4
    assert one.row("DDP buckets") == fsdp.row("DDP buckets") == 0
    assert ddp.row("DDP buckets") == one.row("gradients")
    assert fsdp.row("teacher weights") < ddp.row("teacher weights") == one.row("teacher weights")
    assert fsdp.row("FSDP gathered") > 0 == ddp.row("FSDP gathered")
    # each process computes a quarter of the batch: a quarter of the activations (all on GPU at once)
    assert ddp.row("activations") < one.row("activations")
    with pytest.raises(XecomlaError, match="multiple of the number of processes"):
        plan_distill(student_ckpt, _cfg(text_file, batch_size=6), world=4, device="cuda")
    with pytest.raises(XecomlaError, match="--fsdp shards"):
        plan_distill(student_ckpt, dataclasses.replace(options, fsdp=True), world=1, device="cuda")


def test_activations_scale_with_the_tokens_and_checkpointing_keeps_layer_inputs(student_ckpt, text_file):  # noqa: F811
    plan = plan_distill(student_ckpt, _cfg(text_file), world=1, device="cuda")
    step, model = plan.step, plan.student
    double = dataclasses.replace(step, micro_batch=2 * step.micro_batch)
    layer = model.layers[0]
    assert layer_activations(layer, double) == 2 * layer_activations(layer, step)  # no T² term on GPU
    checkpointed = dataclasses.replace(step, checkpointed_layers=len(model.layers))
    n_tok, d = step.tokens, model.hidden
    assert activations(model, checkpointed) == (len(model.layers) + 2) * n_tok * d * 4
    cpu = StepShape(**{**dataclasses.asdict(step), "device": "cpu"})
    if layer.qk_dim != layer.head_dim:  # SDPA's math kernel on CPU keeps the T² probabilities
        assert layer_activations(layer, cpu) > layer_activations(layer, step)


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_cli_plan_prints_and_writes_nothing(student_ckpt, text_file, tmp_path):  # noqa: F811
    before = sorted(p.name for p in student_ckpt.parent.iterdir())
    common = [str(student_ckpt), "--steps", "2", "--data", str(text_file), "--seq-len", "32", "--device", "cpu"]
    proc = run_cli("distill", *common, "--batch-size", "4", "--plan", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["memory"]["peak"] > report["memory"]["rows"]["student weights"] > 0
    assert report["micro_batch"] == 4 and report["processes"] == 1 and report["fits"] in (True, False)
    assert "peak" in proc.stderr and "student weights" in proc.stderr
    assert sorted(p.name for p in student_ckpt.parent.iterdir()) == before  # no OUT, no OUT.run
    assert list(tmp_path.iterdir()) == []

    proc = run_cli("distill", *common, "--batch-size", "4", "--plan", "--plan-processes", "2", "--fsdp", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "" and "FSDP" in proc.stderr
    refused = [
        (["--plan", "--local"], "--plan"),
        (["--plan-processes", "2"], "add --plan"),
        (["--plan", "--plan-processes", "3"], "multiple of the number of processes"),
    ]
    for extra, message in refused:
        proc = run_cli("distill", *common, "--batch-size", "4", *extra, cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
