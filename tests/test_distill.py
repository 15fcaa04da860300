"""Distillation: the chunked KL loss, the training loop, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from xecomla_cli.distill import DistillConfig, resolve_config, run_distill
from xecomla_cli.distill.config import cpu_bf16_is_fast
from xecomla_cli.distill.kd_loss import IGNORE_INDEX, kd_loss, kd_loss_reference, next_token_labels
from xecomla_cli.distill.trainer import lr_lambda
from xecomla_cli.errors import XecomlaError


# ---- the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5), (1.5, 1.0)])
def test_chunked_loss_matches_full_logits(temperature, ce_weight):
    """Value and gradients equal autograd through full logits, for any chunking."""
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 45, 12, 70
    hs = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    ht, wt = (
        torch.randn(n, 9, generator=g, dtype=torch.float64),
        torch.randn(vocab, 9, generator=g, dtype=torch.float64),
    )
    labels = next_token_labels(torch.randint(0, vocab, (3, 15), generator=g)).flatten()
    ref = kd_loss_reference(hs @ ws.T, ht @ wt.T, labels, temperature=temperature, ce_weight=ce_weight)
    ref_grads = torch.autograd.grad(ref, (hs, ws))
    for chunk in (7, 16, 1000):
        loss, stats = kd_loss(hs, ws, ht, wt, labels, temperature=temperature, ce_weight=ce_weight, chunk_size=chunk)
        grads = torch.autograd.grad(loss, (hs, ws))
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert stats.tokens == n and stats.labelled == int((labels != IGNORE_INDEX).sum())


def test_loss_statistics_and_no_grad():
    g = torch.Generator().manual_seed(1)
    hs, ws = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (10,), generator=g)
    with torch.no_grad():
        loss, st = kd_loss(hs, ws, hs, ws, labels, teacher_ce=True)
    assert not loss.requires_grad
    assert st.kl_sum.item() == pytest.approx(0.0, abs=1e-5)  # teacher == student
    ce = torch.nn.functional.cross_entropy(hs @ ws.T, labels, reduction="sum")
    assert st.ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)
    assert st.teacher_ce_sum.item() == pytest.approx(ce.item(), rel=1e-5)


def test_vocabularies_are_cut_to_the_shorter_head():
    """A padded head (e.g. Qwen2's) is compared over the shared vocabulary only."""
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(6, 4, generator=g, requires_grad=True), torch.randn(20, 4, generator=g, requires_grad=True)
    wt = torch.randn(16, 4, generator=g)
    loss, _ = kd_loss(hs, ws, hs.detach(), wt)
    ref = kd_loss_reference(hs @ ws[:16].T, hs.detach() @ wt.T)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert ws.grad[16:].abs().max() == 0


def test_bf16_autocast_loss_is_close():
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(32, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(32, 16, generator=g), torch.randn(50, 16, generator=g)
    ref = kd_loss_reference(hs @ ws.T, ht @ wt.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = kd_loss(hs, ws, ht, wt)
    loss.backward()
    assert ws.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)


def test_schedule_warms_up_and_decays():
    f = lr_lambda(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 99))


def test_auto_precision_follows_the_cpu(monkeypatch):
    from xecomla_cli.distill import config

    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "cpu_bf16_is_fast", lambda: False)
    assert config.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(config, "cpu_bf16_is_fast", lambda: True)
    assert config.resolve_precision("auto", cpu) == "bf16"
    assert config.resolve_precision("fp32", cpu) == "fp32"


def test_options_resolve_once_into_a_frozen_config():
    """Budget, teacher, validation tokens and precision are filled in once; the record keeps its keys."""
    cpu = torch.device("cpu")
    opts = DistillConfig(data="teacher", tokens=300, seq_len=32, batch_size=4)
    cfg = resolve_config(opts, student_source="the-source", device=cpu)
    auto = "bf16" if cpu_bf16_is_fast() else "fp32"  # bf16 autocast where the CPU has AMX
    assert (cfg.total_steps, cfg.teacher, cfg.val_tokens, cfg.precision) == (3, "the-source", 4096, auto)
    assert cfg.log_interval(cpu) == 1 and cfg.eval_interval(cpu) == 2
    assert list(cfg.to_dict()) == [f.name for f in dataclasses.fields(DistillConfig)] + ["total_steps"]
    assert cfg.to_dict()["log_every"] is None and cfg.to_dict()["betas"] == [0.9, 0.95]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.total_steps = 5
    big = resolve_config(dataclasses.replace(opts, val_tokens=100_000, teacher="t"), student_source="s", device=cpu)
    assert big.val_tokens == 16384 and big.teacher == "t"  # sampling validation text on a CPU is capped
    with pytest.raises(XecomlaError, match="--precision"):
        resolve_config(dataclasses.replace(opts, precision="fp8"), student_source="s", device=cpu)
    with pytest.raises(XecomlaError, match="multiple of the number of processes"):
        resolve_config(opts, student_source="s", device=cpu, world=3)


# ---- the loop ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, tiny_model_dir):
    """A tiny Llama teacher directory and its MLA (r=8) conversion as a stage checkpoint."""
    from conftest import make_tokenizer

    from xecomla_cli.checkpoint import save_checkpoint
    from xecomla_cli.init import build_spec, convert_model
    from xecomla_cli.sources import load_model

    teacher = tiny_model_dir("llama")
    loaded = load_model(str(teacher))
    spec = build_spec(loaded.model.config, kv_rank=8)
    spec = convert_model(loaded.model, spec)
    ckpt = tmp_path_factory.mktemp("student") / "tiny-mla"
    save_checkpoint(
        ckpt, model=loaded.model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source=str(teacher)
    )
    return ckpt


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from conftest import TEXT

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(TEXT.split(". ")) * 60)
    return path


def _cfg(text_file, **kw) -> DistillConfig:
    # fp32: the runs compared here (resume, DDP, FSDP) must agree to fp32 precision, whatever the CPU
    base = dict(
        data=str(text_file), steps=8, seq_len=32, batch_size=4, lr=3e-3, save_every=0, val_tokens=256, precision="fp32"
    )
    return DistillConfig(**{**base, **kw})


def test_distill_lowers_validation_kl_and_writes_a_stage_checkpoint(student_ckpt, text_file, tmp_path):
    from xecomla_cli.checkpoint import read_meta
    from xecomla_cli.sources import load_model

    out, metrics = run_distill(student_ckpt, _cfg(text_file, steps=12), output=tmp_path / "out")
    assert metrics["val_kl"] < 0.8 * metrics["val_kl_initial"]
    assert metrics["tokens_seen"] == 12 * 4 * 32
    meta = read_meta(out)
    assert meta["stage"] == "distill" and meta["parent"] == str(student_ckpt.resolve())
    assert meta["metrics"]["val_kl"] == metrics["val_kl"] and meta["mla"]["kv_ranks"] == [8, 8, 8]
    assert meta["distill"]["teacher"] == meta["source"]  # default teacher: the checkpoint's source
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "train"] == list(range(1, 13))
    assert lines[0]["event"] == "val" and lines[-1]["event"] == "val" and lines[-1]["step"] == 12
    assert not (tmp_path / "out.run").exists()
    student = load_model(str(out))  # a stage checkpoint every later stage reads
    assert student.is_mla and student.meta["metrics"]["tokens_seen"] == 1536
    with pytest.raises(XecomlaError, match="already exists"):
        run_distill(student_ckpt, _cfg(text_file), output=out)


def test_resume_continues_exactly(student_ckpt, text_file, tmp_path):
    """A run killed after a save and resumed ends with the same weights and loss as an unkilled one."""
    from xecomla_cli.checkpoint import read_weights

    cfg = dict(steps=6, save_every=2, micro_batch=2, ce_weight=0.3)
    _, full = run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "a")
    losses: dict[int, float] = {}

    def kill_at_5(step, record):
        losses[step] = record["loss"]
        if step == 5:
            raise KeyboardInterrupt  # killed between the save at step 4 and the next one

    with pytest.raises(KeyboardInterrupt):
        run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "b", on_step=kill_at_5)
    run_dir = tmp_path / "b.run"
    assert json.loads((run_dir / "state" / "trainer.json").read_text())["step"] == 4
    with pytest.raises(XecomlaError, match="--resume"):
        run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "b")
    with pytest.raises(XecomlaError, match="lr"):
        run_distill(student_ckpt, _cfg(text_file, **{**cfg, "lr": 1e-3}), output=tmp_path / "b", resume=True)
    resumed_losses: dict[int, float] = {}
    _, resumed = run_distill(
        student_ckpt,
        _cfg(text_file, **cfg),
        output=tmp_path / "b",
        resume=True,
        on_step=lambda s, r: resumed_losses.__setitem__(s, r["loss"]),
    )
    assert sorted(resumed_losses) == [5, 6]
    assert resumed_losses[5] == losses[5]
    assert resumed["val_kl"] == full["val_kl"] and resumed["train_kl"] == full["train_kl"]
    assert resumed["val_kl_initial"] == full["val_kl_initial"]
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["event"] == "train"] == [1, 2, 3, 4, 5, 6]  # no duplicated steps


def test_freeze_non_mla_trains_only_attention(student_ckpt, text_file, tmp_path):
    from xecomla_cli.checkpoint import read_weights

    out, _ = run_distill(student_ckpt, _cfg(text_file, steps=2, freeze_non_mla=True), output=tmp_path / "f")
    before, after = read_weights(student_ckpt), read_weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert any("kv_b_proj" in k for k in changed)


def test_teacher_with_another_tokenizer_is_refused(student_ckpt, text_file, tmp_path):
    from conftest import make_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["completely different text " * 50],
        trainers.BpeTrainer(
            vocab_size=280,
            show_progress=False,
            special_tokens=["<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    other = tmp_path / "other"
    make_model("llama").save_pretrained(other)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(other)
    with pytest.raises(XecomlaError, match="different tokenizer"):
        run_distill(student_ckpt, _cfg(text_file, teacher=str(other)), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_budget_options(student_ckpt, text_file, tmp_path):
    with pytest.raises(XecomlaError, match="exactly one of --tokens"):
        run_distill(student_ckpt, _cfg(text_file, steps=None), output=tmp_path / "x")
    with pytest.raises(XecomlaError, match="--fsdp"):
        run_distill(student_ckpt, _cfg(text_file, fsdp=True), output=tmp_path / "x")
    _, m = run_distill(
        student_ckpt, _cfg(text_file, steps=None, tokens=300, data="teacher", val_tokens=64), output=tmp_path / "t"
    )
    assert m["steps"] == math.ceil(300 / (4 * 32)) and m["distill_data"] == "teacher"


def test_cli_pipe(student_ckpt, text_file, tmp_path):
    """`... | xecomla distill - ...` prints the output directory, and only that, on stdout."""
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xecomla_cli",
            "-q",
            "distill",
            "-",
            "--data",
            str(text_file),
            "--tokens",
            "256",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--val-tokens",
            "64",
            "-o",
            str(out),
        ],
        input=f"{student_ckpt}\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    bad = subprocess.run(
        [sys.executable, "-m", "xecomla_cli", "distill", str(student_ckpt), "--tokens", "lots"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


# ---- local (layer-wise) distillation from the CLI ----------------------------------------------
def test_local_cli_pipe_records_per_layer_errors(student_ckpt, text_file, tmp_path):
    """`... | xecomla distill - --local` trains the converted layers, records their errors, prints the path."""
    import json
    import subprocess
    import sys

    from xecomla_cli.checkpoint import read_meta

    out = tmp_path / "local"
    args = ["--data", str(text_file), "--tokens", "512", "--seq-len", "32", "--val-tokens", "64", "-o", str(out)]
    cmd = [sys.executable, "-m", "xecomla_cli", "-q", "distill", "-", "--local", "--local-epochs", "2", *args]
    proc = subprocess.run(cmd, input=f"{student_ckpt}\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    meta = read_meta(out)
    assert meta["stage"] == "distill-local" and meta["parent"] == str(student_ckpt.resolve())
    layers = meta["metrics"]["local_layers"]
    assert [r["layer"] for r in layers] == [0, 1, 2]
    assert all(r["error_after"] < r["error_before"] for r in layers)
    assert meta["local"]["local_inputs"] == "teacher" and meta["local"]["local_epochs"] == 2
    assert meta["local"]["local_batch"] == 1 and not {"lr", "micro_batch", "warmup"} & set(meta["local"])
    assert meta["metrics"]["local_tokens"] == 512
    # the output is an ordinary checkpoint: global distillation continues from it
    glob = [sys.executable, "-m", "xecomla_cli", "-q", "distill", str(out), "--steps", "1", "--batch-size", "2"]
    glob += [*args[:2], *args[4:8], "-o", str(tmp_path / "global"), "--json"]
    again = subprocess.run(glob, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps"] == 1

    # restart semantics and bad input: one line each, nothing written
    bad = subprocess.run(cmd + ["--resume"], input=f"{student_ckpt}\n", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "--resume: not used by --local" in bad.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cmd_empty = [c if c != str(text_file) else str(empty) for c in cmd] + ["--force"]
    bad = subprocess.run(cmd_empty, input=f"{student_ckpt}\n", capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert out.exists()  # the earlier output was not replaced by the failed run


# ---- faults handled by the loop: signals and a diverging loss --------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_state_at_the_step_boundary_and_resume_continues_exactly(
    student_ckpt, text_file, tmp_path, signum
):
    """Ctrl-C / SIGTERM during training: the state of that step is saved (even with --save-every 0),
    one line gives the --resume command, and the resumed run ends bit for bit as an unstopped one."""
    from xecomla_cli.checkpoint import read_weights

    cfg = dict(steps=5, save_every=0)
    run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "a")
    before = signal.getsignal(signum)

    def signal_at_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(XecomlaError, match="--resume") as err:
        run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "b", on_step=signal_at_3)
    assert "\n" not in str(err.value) and f"stopped by {signal.Signals(signum).name} at step 3" in str(err.value)
    assert signal.getsignal(signum) is before  # the handlers are given back
    assert json.loads((tmp_path / "b.run" / "state" / "trainer.json").read_text())["step"] == 3
    assert not (tmp_path / "b").exists()
    run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "b", resume=True)
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_the_run_and_the_last_good_state_resumes_with_a_lower_lr(
    student_ckpt, text_file, tmp_path, monkeypatch
):
    from xecomla_cli.distill.trainer import Trainer

    real_step = Trainer.train_step

    def nan_at_step_4(self):  # the 4th step's loss is NaN
        stats = real_step(self)
        if self.step == 4:
            stats["loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(Trainer, "train_step", nan_at_step_4)
    cfg = dict(steps=6, save_every=2)
    with pytest.raises(XecomlaError) as err:
        run_distill(student_ckpt, _cfg(text_file, **cfg), output=tmp_path / "n")
    line = str(err.value)
    assert "\n" not in line and "the loss became nan at step 4" in line and "--lr 0.003" in line
    assert "the state of step 2 is kept" in line and "--resume" in line
    assert json.loads((tmp_path / "n.run" / "state" / "trainer.json").read_text())["step"] == 2
    monkeypatch.undo()
    with pytest.raises(XecomlaError, match="temperature"):  # only --lr may change
        run_distill(student_ckpt, _cfg(text_file, **cfg, temperature=2.0), output=tmp_path / "n", resume=True)
    out, m = run_distill(student_ckpt, _cfg(text_file, **{**cfg, "lr": 3e-4}), output=tmp_path / "n", resume=True)
    assert m["steps"] == 6 and math.isfinite(m["val_kl"])
    from xecomla_cli.checkpoint import read_meta

    assert read_meta(out)["distill"]["lr"] == 3e-4


def test_a_huge_lr_stops_the_run_with_one_line(student_ckpt, text_file, tmp_path):
    """--lr 1e4 once ran to the end and wrote weights of magnitude 5e4; the loss guard stops it."""
    with pytest.raises(XecomlaError) as err:
        run_distill(student_ckpt, _cfg(text_file, steps=12, lr=1e4, save_every=0), output=tmp_path / "h")
    line = str(err.value)
    assert "\n" not in line and "--lr 10000" in line and "learning rate is likely too high" in line
    assert "no state was saved before it" in line
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("mode", ["kd", "local"])
def test_the_student_checkpoint_is_read_once(student_ckpt, text_file, tmp_path, monkeypatch, mode):
    """Its xecomla.json is opened, and its source resolved, once per run: the value is passed down."""
    from pathlib import Path

    import xecomla_cli.checkpoint as checkpoint
    from xecomla_cli.distill.local import LocalConfig
    from xecomla_cli.distill.local_run import run_local_distill

    reads, sources = [], []
    real_meta, real_source = checkpoint.read_meta, checkpoint.recorded_source
    monkeypatch.setattr(checkpoint, "read_meta", lambda p: reads.append(Path(p).resolve()) or real_meta(p))
    monkeypatch.setattr(checkpoint, "recorded_source", lambda p, m: sources.append(p) or real_source(p, m))
    if mode == "kd":
        run_distill(student_ckpt, _cfg(text_file, steps=1), output=tmp_path / "r")
    else:
        run_local_distill(student_ckpt, _cfg(text_file, steps=1), LocalConfig(epochs=1), output=tmp_path / "r")
    assert reads.count(student_ckpt.resolve()) == 1 and len(sources) == 1


def test_the_resume_command_is_the_run_s_own(monkeypatch):
    """The line of a stopped run gives the command that started it, with --resume (and the new --lr)."""
    from pathlib import Path

    from xecomla_cli.distill.faults import resume_command, with_option

    monkeypatch.setattr("sys.argv", ["/venv/bin/xecomla", "-q", "distill", "-", "--lr", "3e-4", "-o", "out dir"])
    cmd = resume_command(Path("runs/ck"), Path("out dir"))
    assert cmd == "xecomla -q distill runs/ck --lr 3e-4 -o 'out dir' --resume"
    assert with_option(cmd, "--lr", "3e-05") == "xecomla -q distill runs/ck --lr 3e-05 -o 'out dir' --resume"
    two = resume_command(Path("runs/ck"), Path("out dir"), world=2)
    assert two.startswith("torchrun --nproc-per-node 2 $(which xecomla) -q distill runs/ck")
    assert with_option(two, "--seed", "1").endswith("-o 'out dir' --seed 1 --resume")
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert resume_command(Path("ck"), Path("o")) == "xecomla distill ck -o o --resume (and the run's options)"
