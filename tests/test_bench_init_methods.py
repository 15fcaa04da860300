"""bench/init_methods.py: the budget split of each layout and the table from cached results.

No CLI runs here: ``--cached-only`` reads what the comparison wrote under ``--out``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "init_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("init_methods_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_follows_each_layout(bench):
    assert bench.split("paper", "96", 3) == ("paper", 64, 32)  # shared key: p = V/3 rounded to even
    assert bench.split("deepseek", "48", 3) == ("deepseek", 32, 16)
    assert bench.split("transmla", "80:16", 3) == ("transmla", 80, 16)  # r:p exactly
    assert bench.split("mha2mla", "96", 3) == ("mha2mla", 72, 24)  # per group: p ~ V/4, multiple of 2G
    assert bench.split("best+group-rope", "48", 3) == ("best+group-rope", 36, 12)
    assert bench.split("best+group-rope@1/2", "96", 3) == ("best+group-rope", 48, 48)


def eval_json(ppl: float, avg: float) -> dict:
    task = {"primary": "acc_norm", "acc_norm": avg}
    model = {"perplexity": {"ppl": ppl}, "average": {"value": avg}, "tasks": {"piqa": task}}
    return {"results": {"model": {**model, "kv_cache": {"bytes_per_token": 1024}}}}


def test_cached_only_reports_what_is_there(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "inspect.json").write_text(json.dumps({"architecture": {"num_kv_heads": 3}}))
    key = "piqa-l10-ppl256"
    (out / f"original.eval-{key}.json").write_text(json.dumps(eval_json(50.0, 0.6)))
    for name, ppl, avg in (("paper-r64-p32", 900.0, 0.5), ("transmla-r64-p32", 300.0, 0.55)):
        (out / name).mkdir()
        (out / name / "xecomla.json").write_text("{}")
        (out / f"{name}.seconds").write_text("12.5\n")
        (out / f"{name}.eval-{key}.json").write_text(json.dumps(eval_json(ppl, avg)))
    distilled = out / "transmla-r64-p32-distill-1k"  # paper: not distilled yet; mha2mla: no init yet
    distilled.mkdir()
    (distilled / "xecomla.json").write_text("{}")
    (out / f"{distilled.name}.eval-{key}.json").write_text(json.dumps(eval_json(100.0, 0.58)))

    table = tmp_path / "table.md"
    argv = ["init_methods.py", "--budgets", "96", "--methods", "paper,mha2mla,transmla", "--tasks", "piqa"]
    argv += ["--limit", "10", "--ppl-tokens", "256", "--distill-tokens", "1k", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--cached-only", "--markdown", str(table)])
    bench.main()
    report = json.loads(capsys.readouterr().out)

    assert [r["entry"] for r in report["rows"]] == ["paper", "transmla"]
    paper, transmla = report["rows"]
    assert "distilled" not in paper  # no distilled checkpoint yet: its cells show —
    assert transmla["distilled"]["ppl"] == 100.0
    assert transmla["ppl_increase_vs_paper"] == pytest.approx((300 - 50) / (900 - 50))
    assert report["headline"]["96 init"]["peer"] == {"entry": "transmla", "ppl": 300.0, "avg": 0.55}
    lines = table.read_text().splitlines()
    assert lines[2] == "| — | original | — | — | — | 50.00 | 0.6000 |  |  |"
    assert lines[3] == "| 96 | paper | 64 | 32 | 12 | 900.0 | 0.5000 | — | — |"
    assert lines[4] == "| 96 | transmla | 64 | 32 | 12 | 300.0 | 0.5500 | 100.0 | 0.5800 |"
