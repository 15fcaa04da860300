"""Fault injection: runs killed at random moments, two runs on one output, outputs pointed at inputs,
bad inputs, a full disk. Every failure is one line on stderr with a non-zero exit, and no file that
existed before changes.

Runs are stopped at named points (`outputs.fault_point`, driven by XECOMLA_FAULT_AT and a barrier
directory), never by sleeping. The point of each killed run is drawn at random: set
XECOMLA_FAULT_SEED to replay a draw (the seed and the point are in every assertion message), or
XECOMLA_FAULT_POINT to choose the point.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xecomla_cli import cli, outputs

SEED = int(os.environ.get("XECOMLA_FAULT_SEED", random.SystemRandom().randrange(10**6)))
RNG = random.Random(SEED)
DISTILL = ["--steps", "6", "--seq-len", "32", "--batch-size", "4", "--save-every", "2", "--precision", "fp32"]
DISTILL += ["--val-tokens", "256", "--device", "cpu", "--lr", "3e-3"]


# ---- helpers ------------------------------------------------------------------------------------
def tree_hash(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (and where each symlink points)."""
    out = {}
    for root in paths:
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*") if not p.is_dir())
        for f in files:
            out[str(f)] = os.readlink(f) if f.is_symlink() else hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def xecomla(*args: str, env: dict | None = None, quiet: bool = True) -> tuple[int, str, str]:
    """The CLI in this process, as the console script runs it (with --quiet): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, dict(os.environ)
    sys.argv = ["xecomla", *(["-q"] if quiet else []), *map(str, args)]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])
        cli._state["debug"] = False
    return code, out.getvalue(), err.getvalue()


def one_line_error(result, *needles: str, code: int = 1) -> str:
    rc, out, err = result
    lines = err.strip().splitlines()
    assert rc == code and out == "", f"exit {rc}, stdout {out!r}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(out: Path) -> list[Path]:
    """Temporary, replaced and lock files beside an output (.NAME.tmp-*, .NAME.old-*, .NAME.lock)."""
    return sorted(out.parent.glob(f".{out.name}.*"))


class Paused:
    """`xecomla ARGS` in a subprocess, stopped at the fault point `point` (its PID is the lock holder)."""

    def __init__(self, tmp: Path, point: str, *args: str):
        self.dir = tmp / f"barrier-{point.replace(':', '-')}"
        self.dir.mkdir()
        self.point = point.split(":")[0]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same reductions as this process
            outputs.FAULT_AT_ENV: point,
            outputs.FAULT_DIR_ENV: str(self.dir),
        }
        self.log = (self.dir / "stderr").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xecomla_cli", "-q", *args], env=env, stdout=subprocess.DEVNULL, stderr=self.log
        )
        reached = self.dir / f"{self.point}.reached"
        deadline = time.monotonic() + 300
        while not reached.exists():  # the barrier: the run writes this file when it stops
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"never reached {point}: {(self.dir / 'stderr').read_text()[-2000:]}")
            time.sleep(0.01)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(60) == -signal.SIGKILL
        self.log.close()


def draw(points: list[str]) -> str:
    """A random point (XECOMLA_FAULT_POINT=NAME forces one, where the stage has it)."""
    forced = os.environ.get("XECOMLA_FAULT_POINT")
    return forced if forced in points else RNG.choice(points)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture()
def tiny(tiny_model_dir, tmp_path):
    """A private copy of a tiny Llama directory (the tests change files next to it)."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "tiny"))


@pytest.fixture(scope="module")
def student(tiny_model_dir, tmp_path_factory):
    """An init-svd checkpoint (r=8) of the tiny Llama, and a training text."""
    from conftest import TEXT

    root = tmp_path_factory.mktemp("student")
    assert xecomla("init-svd", tiny_model_dir("llama"), "--kv-rank", "8", "-o", root / "init8")[0] == 0
    (root / "train.txt").write_text("\n".join(TEXT.split(". ")) * 40)
    return root / "init8", tiny_model_dir("llama"), root / "train.txt"


# ---- killed runs and concurrent runs ----------------------------------------------------------
def test_init_svd_killed_at_a_random_point(tiny, tmp_path):
    out = tmp_path / "ck"
    assert xecomla("init-svd", tiny, "--kv-rank", "8", "-o", out)[0] == 0  # the killed run replaces it
    before = tree_hash(tiny)
    point = draw(["claimed", "loaded", "written", "swapped", "renamed"])
    why = f"(XECOMLA_FAULT_SEED={SEED}, killed at {point})"
    run = Paused(tmp_path, point, "init-svd", str(tiny), "--kv-rank", "4", "-o", str(out), "--force")
    second = xecomla("init-svd", tiny, "--kv-rank", "4", "-o", out, "--force")
    one_line_error(second, f"PID {run.proc.pid}", "another xecomla run")
    run.kill()
    assert tree_hash(tiny) == before, why
    outputs.claim(out, force=True).release()  # what the next run does first: clean up after the dead one
    assert leftovers(out) == [], why
    rank = json.loads((out / "xecomla.json").read_text())["mla"]["kv_ranks"][0]
    assert rank == (4 if point == "renamed" else 8), why  # the old output or the new one, complete
    assert xecomla("init-svd", tiny, "--kv-rank", "4", "-o", out, "--force")[0] == 0
    assert leftovers(out) == [] and tree_hash(tiny) == before


def test_distill_killed_at_a_random_point_resumes_bit_for_bit(student, tmp_path):
    from xecomla_cli.checkpoint import read_weights

    init8, teacher, text = student
    args = ["distill", str(init8), "--teacher", str(teacher), "--data", str(text), *DISTILL]
    ref = tmp_path / "ref"
    assert xecomla(*args, "-o", ref)[0] == 0
    before = tree_hash(init8, teacher, text)
    # written:1, :2 are the states at steps 2 and 4, written:3 the output; swapped:1 replaces a state
    point = draw(["claimed", "step:3", "state-saved:1", "written:2", "swapped:1", "written:3", "distilled"])
    why = f"(XECOMLA_FAULT_SEED={SEED}, killed at {point})"
    out = tmp_path / "out"
    run = Paused(tmp_path, point, *args, "-o", str(out))
    one_line_error(xecomla(*args, "--seed", "2", "-o", out), f"PID {run.proc.pid}")  # a second run: refused
    run.kill()
    assert tree_hash(init8, teacher, text) == before, why
    rc, stdout, err = xecomla(*args, "-o", out, "--resume")
    assert rc == 0 and stdout.strip() == str(out), f"{why} {err}"
    a, b = read_weights(ref), read_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed weights differ {why}"
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (ref / "metrics.jsonl").read_text().splitlines()], why
    assert leftovers(out) == [] and not (tmp_path / "out.run").exists(), why
    assert tree_hash(init8, teacher, text) == before, why


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_distill_stopped_by_a_signal_saves_its_state_and_prints_the_resume_command(student, tmp_path, signum):
    """Ctrl-C (or SIGTERM) in the middle of a step: the run saves that step's state at its end,
    prints one line with the command that continues it, exits 1; that command ends bit for bit as
    an unstopped run."""
    import shlex

    from xecomla_cli.checkpoint import read_weights

    init8, teacher, text = student
    args = ["distill", str(init8), "--teacher", str(teacher), "--data", str(text), *DISTILL, "--save-every", "0"]
    ref = tmp_path / "ref"
    assert xecomla(*args, "-o", ref)[0] == 0
    out = tmp_path / "out"
    run = Paused(tmp_path, "step:3", *args, "-o", str(out))  # stopped after step 3, in the loop
    os.kill(run.proc.pid, signum)
    (run.dir / "step.release").write_text("")
    assert run.proc.wait(300) == 1
    run.log.close()
    lines = (run.dir / "stderr").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopped by"), lines
    assert f"{signal.Signals(signum).name} at step 4 of 6" in lines[0]  # the step it was in finished
    assert json.loads((tmp_path / "out.run" / "state" / "trainer.json").read_text())["step"] == 4
    command = shlex.split(lines[0].split("continue with ", 1)[1])
    assert command[0] == "xecomla" and command[-1] == "--resume"
    rc, stdout, err = xecomla(*[a for a in command[1:] if a != "-q"])
    assert rc == 0 and stdout.strip() == str(out), err
    a, b = read_weights(ref), read_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_with_a_huge_lr_stops_with_one_line(student, tmp_path):
    """--lr 1e4 once ran to the end and wrote weights of magnitude 5e4: now one line at the first step."""
    init8, teacher, text = student
    args = ["distill", str(init8), "--teacher", str(teacher), "--data", str(text), *DISTILL, "-o", tmp_path / "o"]
    line = one_line_error(xecomla(*args, "--lr", "1e4"), "at step 1", "likely too high (--lr 10000)")
    assert "no state was saved before it" in line
    assert not (tmp_path / "o").exists()


def test_export_killed_at_a_random_point(student, tmp_path):
    init8 = student[0]
    out = tmp_path / "hf"
    assert xecomla("export", init8, "-o", out, "--no-verify")[0] == 0
    before = tree_hash(init8)
    point = draw(["claimed", "written", "swapped", "renamed"])
    why = f"(XECOMLA_FAULT_SEED={SEED}, killed at {point})"
    run = Paused(tmp_path, point, "export", str(init8), "-o", str(out), "--force", "--format", "xecomla")
    one_line_error(xecomla("export", init8, "-o", out, "--force"), f"PID {run.proc.pid}")
    run.kill()
    assert tree_hash(init8) == before, why
    outputs.claim(out, force=True).release()
    assert leftovers(out) == [], why
    own = (out / "xecomla.json").is_file()  # --format xecomla copies the checkpoint's own files
    assert own == (point == "renamed") and (out / "README.md").is_file(), why
    assert xecomla("export", init8, "-o", out, "--force", "--no-verify")[0] == 0
    assert leftovers(out) == [] and tree_hash(init8) == before


def test_leftovers_of_dead_runs_are_removed_and_a_replaced_output_put_back(tiny, tmp_path):
    out = tmp_path / "ck"
    assert xecomla("init-svd", tiny, "--kv-rank", "8", "-o", out)[0] == 0
    os.replace(out, tmp_path / ".ck.old-dead0001")  # died while replacing ck
    (tmp_path / ".ck.tmp-dead0002").mkdir()  # died while writing
    (tmp_path / ".ck.tmp-dead0002" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".ck.lock").write_text("999999\n")  # its lock file (the kernel dropped the lock)
    one_line_error(xecomla("init-svd", tiny, "--kv-rank", "8", "-o", out), "already exists")
    assert (out / "xecomla.json").is_file() and leftovers(out) == []


def test_resume_recognises_a_finished_output_with_a_stale_run_dir(student, tmp_path, monkeypatch):
    import xecomla_cli.distill.output as output

    init8, teacher, text = student
    args = ["distill", str(init8), "--teacher", str(teacher), "--data", str(text), *DISTILL, "-o", tmp_path / "out"]

    def die(name):
        if name == "distilled":
            raise KeyboardInterrupt  # killed between writing OUT and removing OUT.run

    monkeypatch.setattr(output, "fault_point", die)
    assert xecomla(*args)[0] == 130
    monkeypatch.undo()
    assert (tmp_path / "out.run" / "state").is_dir() and (tmp_path / "out" / "xecomla.json").is_file()
    before = tree_hash(tmp_path / "out")
    rc, stdout, _ = xecomla(*args, "--resume")
    assert rc == 0 and stdout.strip() == str(tmp_path / "out")
    assert not (tmp_path / "out.run").exists() and tree_hash(tmp_path / "out") == before


# ---- outputs pointed at inputs ------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    ["init-svd-self", "init-svd-inside", "init-svd-symlink", "init-svd-parent", "init-svd-calib",
     "distill-self", "distill-teacher", "distill-data", "export-self", "export-inside"],
)  # fmt: skip
def test_no_stage_writes_over_or_into_its_inputs(case, student, tiny, tmp_path):
    init8, _, text = student
    ck = Path(shutil.copytree(init8, tmp_path / "ck"))
    (tmp_path / "link").symlink_to(tiny)
    data = Path(shutil.copy(text, tmp_path / "train.txt"))
    before = tree_hash(tiny, ck, data, tmp_path / "link")
    init = ["init-svd", tiny, "--kv-rank", "4", "--force"]
    distill = ["distill", ck, "--teacher", tiny, "--data", data, "--steps", "1", "--seq-len", "16", "--force"]
    args = {
        "init-svd-self": [*init, "-o", tiny],
        "init-svd-inside": [*init, "-o", tiny / "sub"],
        "init-svd-symlink": [*init, "-o", tmp_path / "link"],
        "init-svd-parent": ["init-svd", ck.parent / "link", "--kv-rank", "4", "--force", "-o", tmp_path],
        "init-svd-calib": [*init, "--method", "whiten", "--calib-data", data, "-o", data],
        "distill-self": [*distill, "-o", ck],
        "distill-teacher": [*distill, "-o", tiny],
        "distill-data": [*distill, "-o", data],
        "export-self": ["export", ck, "-o", ck, "--force"],
        "export-inside": ["export", ck, "-o", ck / "hf", "--force"],
    }[case]
    one_line_error(xecomla(*args), "never writes over or into its inputs")
    assert tree_hash(tiny, ck, data, tmp_path / "link") == before


# ---- bad inputs: one line each, nothing changed ---------------------------------------------------
def test_bad_option_value_names_the_option(tiny, tmp_path):
    one_line_error(xecomla("init-svd", tiny, "--kv-rank", "abc", "-o", tmp_path / "x"), "'--kv-rank'", code=2)


def test_read_only_output_directory_fails_before_loading(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    before = tree_hash(tiny)
    args = ["init-svd", str(tiny), "--kv-rank", "8", "-o", str(ro / "ck")]
    if os.geteuid() != 0:
        import xecomla_cli.init.run as init_run

        def load_model(*a, **k):
            raise AssertionError("the model was loaded before the output was checked")

        pytest.MonkeyPatch().setattr(init_run, "load_model", load_model)
        result = xecomla(*args)
    else:  # root writes anywhere: drop the capabilities as an ordinary user has none
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        env = {**os.environ, outputs.FAULT_AT_ENV: "loaded", outputs.FAULT_DIR_ENV: str(tmp_path)}
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "xecomla_cli", "-q", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert not (tmp_path / "loaded.reached").exists()  # refused before the model was loaded
        result = (proc.returncode, proc.stdout, proc.stderr)
    one_line_error(result, "Permission denied", str(ro / "ck"))
    assert tree_hash(tiny) == before and list(ro.iterdir()) == []


def _corrupt(case: str, tiny: Path, ck: Path, tmp: Path) -> list[str]:
    """Make one bad input; returns the command that must fail on it."""
    if case == "truncated-safetensors":
        f = tiny / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
        return ["init-svd", tiny, "--kv-rank", "8", "-o", tmp / "x"]
    if case == "config-json":
        f = tiny / "config.json"
        f.write_text(f.read_text().replace('"hidden_size": 64,', '"hidden_size": 64'))
        return ["init-svd", tiny, "--kv-rank", "8", "-o", tmp / "x"]
    if case == "missing-kv-ranks":
        meta = json.loads((ck / "xecomla.json").read_text())
        del meta["mla"]["kv_ranks"]
        (ck / "xecomla.json").write_text(json.dumps(meta))
        return ["export", ck, "-o", tmp / "x"]
    if case == "xecomla-json":
        (ck / "xecomla.json").write_text('{"stage": "init-svd", "source": "unterminated}')
        return ["distill", ck, "--steps", "1", "-o", tmp / "x"]
    if case == "gguf-garbage":
        (tmp / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + random.Random(0).randbytes(4000))
        return ["init-svd", tmp / "m.gguf", "--kv-rank", "8", "-o", tmp / "x"]
    if case == "file-as-checkpoint":
        (tmp / "notes.txt").write_text("notes\n")
        return ["export", tmp / "notes.txt"]
    if case == "pickle-only":
        _to_pickle(tiny)
        return ["init-svd", tiny, "--kv-rank", "8", "-o", tmp / "x"]
    if case == "malicious-pickle":
        _to_pickle(tiny, {"x": _Payload(str(tmp / "pwned"))})
        return ["init-svd", tiny, "--kv-rank", "8", "-o", tmp / "x", "--allow-pickle"]
    raise ValueError(case)


class _Payload:
    """A pickle that creates a directory when unpickled (harmless, and detectable)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _to_pickle(directory: Path, state: dict | None = None) -> None:
    from safetensors.torch import load_file

    f = directory / "model.safetensors"
    torch.save(state if state is not None else load_file(f), directory / "pytorch_model.bin")
    f.unlink()


@pytest.mark.parametrize(
    "case, needles",
    [
        ("truncated-safetensors", ["model.safetensors", "corrupt or truncated"]),
        ("config-json", ["config.json", "not valid JSON", "line 13 column 3"]),
        ("missing-kv-ranks", ["xecomla.json", "missing mla.kv_ranks"]),
        ("xecomla-json", ["xecomla.json", "Unterminated string starting at: line 1"]),
        ("gguf-garbage", ["m.gguf", "not a readable GGUF file"]),
        ("file-as-checkpoint", ["notes.txt", "is a file, not a checkpoint directory"]),
        ("pickle-only", ["pytorch_model.bin", "--allow-pickle"]),
        ("malicious-pickle", ["weights_only=True", "refused"]),
    ],
)
def test_bad_inputs_fail_in_one_line_and_change_nothing(case, needles, tiny, student, tmp_path):
    ck = Path(shutil.copytree(student[0], tmp_path / "ck"))
    args = _corrupt(case, tiny, ck, tmp_path)
    before = tree_hash(tmp_path)
    line = one_line_error(xecomla(*args), *needles)
    assert "at at" not in line and "does not exist" not in line
    assert tree_hash(tmp_path) == before and not (tmp_path / "pwned").exists()
    assert not (tmp_path / "x").exists() and leftovers(tmp_path / "x") == []


def test_a_failed_run_leaves_no_directories_it_made(tmp_path):
    one_line_error(xecomla("init-svd", tmp_path / "nowhere", "--kv-rank", "8", "-o", tmp_path / "a/b/ck"), "no such")
    assert list(tmp_path.iterdir()) == []


def test_pickle_weights_load_when_allowed(tiny, tmp_path):
    _to_pickle(tiny)
    rc, out, err = xecomla("init-svd", tiny, "--kv-rank", "8", "-o", tmp_path / "x", "--allow-pickle")
    assert rc == 0 and out.strip() == str(tmp_path / "x"), err


def test_disk_full_is_one_line_and_leaves_nothing(tiny, student, tmp_path, monkeypatch):
    import huggingface_hub

    from xecomla_cli.export import shards
    from xecomla_cli.weights_writer import ShardedWriter

    def full(state, directory, **kw):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "model.safetensors"))

    def full_shard(self, name, tensor):  # init-svd writes its shards tensor by tensor (weights_writer)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / self.slots[name].file))

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", full)
    monkeypatch.setattr(ShardedWriter, "write", full_shard)

    def full_export_shard(entries, dtype):  # export writes its shards header first, tensor by tensor
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(shards, "_header", full_export_shard)
    before = tree_hash(tiny, student[0])
    one_line_error(xecomla("init-svd", tiny, "--kv-rank", "8", "-o", tmp_path / "x"), "no space left", "'")
    one_line_error(xecomla("export", student[0], "-o", tmp_path / "hf", "--no-verify"), "no space left")
    assert tree_hash(tiny, student[0]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, no temporary, no lock


def test_unforeseen_errors_are_one_line_and_debug_shows_the_traceback(tiny, tmp_path, monkeypatch):
    import xecomla_cli.init.run as init_run

    def boom(*a, **k):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(init_run, "build_spec", boom)
    args = ["init-svd", tiny, "--kv-rank", "8", "-o", tmp_path / "x"]
    one_line_error(xecomla(*args), "ZeroDivisionError: boom", "XECOMLA_DEBUG=1")
    with pytest.raises(ZeroDivisionError):
        xecomla(*args, env={"XECOMLA_DEBUG": "1"})
    assert not (tmp_path / "x").exists() and leftovers(tmp_path / "x") == []


def test_failed_push_still_prints_the_export_path(student, tmp_path, monkeypatch):
    import xecomla_cli.export as export
    from xecomla_cli.errors import XecomlaError

    def refuse(*a, **k):
        raise XecomlaError("push to the Hugging Face Hub repo 'me/x' failed (401): run `hf auth login`")

    monkeypatch.setattr(export, "push_to_hub", refuse)
    rc, out, err = xecomla("export", student[0], "-o", tmp_path / "hf", "--no-verify", "--push-to-hub", "me/x")
    assert rc == 1 and out.strip() == str(tmp_path / "hf") and len(err.strip().splitlines()) == 1
    assert (tmp_path / "hf" / "config.json").is_file()


# ---- portable checkpoints ---------------------------------------------------------------------------
def test_checkpoints_record_sources_that_resolve_from_anywhere(tiny, tmp_path, monkeypatch):
    from xecomla_cli.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    assert xecomla("init-svd", "tiny", "--kv-rank", "8", "-o", "runs/ck")[0] == 0
    meta = json.loads((tmp_path / "runs/ck/xecomla.json").read_text())
    assert meta["source"] == str(tmp_path / "tiny")
    old = Path(shutil.copytree(tmp_path / "runs/ck", tmp_path / "old"))  # an older checkpoint: source as typed
    (old / "xecomla.json").write_text(json.dumps({**meta, "source": "tiny"}))
    monkeypatch.chdir(tmp_path / "runs")  # where "tiny" does not exist
    assert load_checkpoint(tmp_path / "old").source == str(tmp_path / "tiny")
    assert load_checkpoint("ck").source == str(tmp_path / "tiny")


# ---- data is text -------------------------------------------------------------------------------
def _garbage(path: Path) -> Path:
    path.write_bytes(random.Random(0).randbytes(100_000))  # as `head -c 100000 /dev/urandom`
    return path


def _not_words(path: Path) -> Path:
    """Valid UTF-8 that is no text the tokenizer knows: random CJK characters (byte pieces only)."""
    r = random.Random(1)
    path.write_text("".join(chr(r.randrange(0x4E00, 0x9FFF)) for _ in range(3000)), encoding="utf-8")
    return path


@pytest.mark.parametrize("make, needle", [(_garbage, "1 not valid UTF-8"), (_not_words, "1 with more than 50%")])
def test_data_that_is_not_text_is_refused(make, needle, student, tiny, tmp_path):
    init8, teacher, _ = student
    bad = make(tmp_path / "bad.txt")
    before = tree_hash(tiny, init8, bad)
    calib = ["init-svd", tiny, "--kv-rank", "8", "--method", "whiten", "--calib-data", bad, "-o", tmp_path / "x"]
    one_line_error(xecomla(*calib), "1 of 1 documents", needle, "bad.txt")
    distill = ["distill", init8, "--teacher", teacher, "--data", bad, "--steps", "1", "--seq-len", "16"]
    one_line_error(xecomla(*distill, "-o", tmp_path / "y"), "1 of 1 documents", needle)
    one_line_error(xecomla("eval", init8, "--ppl-data", bad, "--no-kv"), "1 of 1 documents", "bad.txt")
    assert tree_hash(tiny, init8, bad) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_documents_are_dropped_and_counted(student, tmp_path):
    init8, teacher, text = student
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(text, data / "a.txt")
    _garbage(data / "b.txt")
    args = ["distill", init8, "--teacher", teacher, "--data", data, "--steps", "1", "--seq-len", "16"]
    rc, out, err = xecomla(*args, "--val-tokens", "64", "--precision", "fp32", "-o", tmp_path / "y", quiet=False)
    assert rc == 0 and out.strip() == str(tmp_path / "y"), err
    assert "1 of 2 documents" in err and "dropped" in err


def test_preference_text_is_checked_one_document_at_a_time(tokenizer):
    from xecomla_cli.errors import XecomlaError
    from xecomla_cli.text.validate import check_text

    assert check_text("The quick brown fox.", tokenizer, "pair 3 'chosen'") == "The quick brown fox."
    with pytest.raises(XecomlaError, match="pair 3 'chosen' is not valid UTF-8"):
        check_text(b"ok \xff\xfe".decode("utf-8", "surrogateescape"), tokenizer, "pair 3 'chosen'")
    with pytest.raises(XecomlaError, match="byte-fallback or unknown tokens"):
        check_text("".join(chr(0x4E00 + i) for i in range(50)), tokenizer, "pair 4 'rejected'")
