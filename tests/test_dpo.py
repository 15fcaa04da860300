"""DPO and on-policy distillation (distill --dpo / --on-policy) and the sampler they share."""

from __future__ import annotations

import json

import pytest
import torch

from xecomla_cli.distill.dpo import answer_logps, dpo_loss, dpo_loss_reference, pair_batch
from xecomla_cli.distill.preferences import Pairs
from xecomla_cli.errors import XecomlaError


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, tiny_model_dir):
    """A tiny Llama teacher and its MLA (r=8) conversion as a stage checkpoint."""
    from conftest import make_tokenizer

    from xecomla_cli.checkpoint import save_checkpoint
    from xecomla_cli.init import build_spec, convert_model
    from xecomla_cli.sources import load_model

    teacher = tiny_model_dir("llama")
    loaded = load_model(str(teacher))
    spec = build_spec(loaded.model.config, kv_rank=8)
    convert_model(loaded.model, spec)
    ckpt = tmp_path_factory.mktemp("student") / "tiny-mla"
    save_checkpoint(
        ckpt, model=loaded.model, tokenizer=make_tokenizer(), stage="init-svd", spec=spec, source=str(teacher)
    )
    return ckpt


def _pairs() -> Pairs:
    return Pairs(
        prompt=[[5, 9, 13], [11, 4, 7, 2], [8]],
        chosen=[[20, 21, 2], [30, 2], [40, 41, 42, 2]],
        rejected=[[22, 2], [31, 32, 33, 2], [43, 2]],
    )


# ---- the loss --------------------------------------------------------------------------------------
def test_dpo_loss_equals_an_independent_computation():
    """Sequence log-probs from answer positions only + the sigmoid loss = the formula on full logits."""
    from conftest import make_model

    policy, ref = make_model("llama", seed=0), make_model("llama", seed=1)
    b = pair_batch(_pairs(), [0, 1, 2])
    beta = 0.1
    got = dpo_loss(answer_logps(policy, b), answer_logps(ref, b).detach(), beta).loss
    with torch.no_grad():
        want = dpo_loss_reference(
            policy(b.ids, attention_mask=b.attention).logits, ref(b.ids, attention_mask=b.attention).logits,
            b.ids, b.answer, beta,
        )  # fmt: skip
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # by hand, for one pair: Σ log-probs over the answer tokens only
    with torch.no_grad():
        lp = torch.log_softmax(policy(b.ids[:1]).logits[0].double(), -1)
    p, a = _pairs().prompt[0], _pairs().chosen[0]
    by_hand = sum(lp[len(p) - 1 + k, t] for k, t in enumerate(a))
    assert answer_logps(policy, b)[0].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_dpo_loss_matches_trl_on_the_same_batch():
    """TRL's DPOTrainer (X-EcoMLA's choice) computes the same sigmoid loss from the same log-probs."""
    trl = pytest.importorskip("trl")
    import inspect

    source = inspect.getsource(trl.DPOTrainer)
    assert "-F.logsigmoid(self.beta * delta_score)" in source  # the formula we test against below
    g = torch.Generator().manual_seed(0)
    policy, reference = (
        torch.randn(8, generator=g, dtype=torch.float64),
        torch.randn(8, generator=g, dtype=torch.float64),
    )
    beta = 0.3
    # TRL: chosen_scores - rejected_scores of the log-ratios, then -logsigmoid(beta * delta)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    delta = (pc - rc) - (pr - rr)
    trl_loss = (-torch.nn.functional.logsigmoid(beta * delta)).mean()
    assert dpo_loss(policy, reference, beta).loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)


def test_gradient_vanishes_as_beta_goes_to_zero():
    from conftest import make_model

    model = make_model("llama")
    b = pair_batch(_pairs(), [0, 1, 2])
    ref = answer_logps(model, b).detach() + torch.randn(6, generator=torch.Generator().manual_seed(0))
    norms = []
    for beta in (1.0, 1e-2, 1e-4):
        model.zero_grad()
        dpo_loss(answer_logps(model, b), ref, beta).loss.backward()
        norms.append(sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None).sqrt().item())
    assert norms[0] > 0 and norms[1] < 0.05 * norms[0] and norms[2] < 1e-3 * norms[0]
    assert dpo_loss(ref, ref, 0.01).loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_pair_batch_keeps_prompt_and_answer_aligned_and_truncates():
    b = pair_batch(_pairs(), [1, 0], max_prompt=2, max_length=5)
    assert b.n == 2
    # chosen of pair 1: the last 2 prompt tokens, then the answer
    assert b.ids[0, :4].tolist() == [7, 2, 30, 2] and b.answer[0, :4].tolist() == [0, 0, 1, 1]
    # rejected of pair 1 is cut to max_length with its prompt
    assert b.ids[2].tolist() == [7, 2, 31, 32, 33] and b.attention[2].sum() == 5


# ---- preference data ---------------------------------------------------------------------------------
def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preference_records_in_both_forms(tmp_path, tokenizer):
    from xecomla_cli.distill.preferences import load_pairs

    flat = {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"}
    chat = {
        "prompt": "Say yes.",
        "chosen": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "no"}],
    }
    a = load_pairs(str(_write(tmp_path / "a.jsonl", [flat])), tokenizer)
    b = load_pairs(str(_write(tmp_path / "b.jsonl", [chat])), tokenizer)
    assert a == b and len(a) == 1
    assert tokenizer.decode(a.prompt[0] + a.chosen[0]).endswith(
        "user\nSay yes.<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>"
    )


@pytest.mark.parametrize(
    "records,message",
    [
        ([{"prompt": "a", "chosen": "b"}], "'rejected'"),
        ([], "no pairs"),
        ([{"prompt": "a", "chosen": "b", "rejected": "b"}] * 3, "chosen equals rejected in every pair"),
        ([{"chosen": "b", "rejected": "c"}], "'prompt'"),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "\udcff\udcfe\udc80"}],
            "record 1's 'rejected' is not valid UTF-8",
        ),
    ],
)
def test_bad_preference_data_is_one_line_and_writes_nothing(student_ckpt, tmp_path, records, message):
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy

    prefs = _write(tmp_path / "p.jsonl", records)
    with pytest.raises(XecomlaError, match=message) as err:
        run_policy(student_ckpt, PolicyConfig(prefs=str(prefs)), output=tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_output_is_never_an_input(student_ckpt, tmp_path):
    """--dpo / --on-policy claim OUT as every stage does (outputs.claim): inside the student, or the
    preference file itself, is refused with one line and nothing is written."""
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy

    prefs = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    before = {p: p.read_bytes() for p in [prefs, *student_ckpt.iterdir()] if p.is_file()}
    for out in (student_ckpt / "inside", prefs):
        with pytest.raises(XecomlaError, match="the input") as err:
            run_policy(student_ckpt, PolicyConfig(prefs=str(prefs)), output=out, force=True)
        assert "\n" not in str(err.value)
    assert not (student_ckpt / "inside").exists()
    assert {p: p.read_bytes() for p in before} == before


def test_teacher_built_pairs_keep_prompt_and_answers_aligned(tokenizer):
    """chosen = the teacher's own sample for that prompt, rejected = the student's, same prompt."""
    from conftest import make_model

    from xecomla_cli.distill.preferences import answers, teacher_pairs

    teacher, student = make_model("llama", seed=0), make_model("llama", seed=1)
    pairs = teacher_pairs(teacher, student, tokenizer, 3, batch=3, seed=5)
    assert len(pairs) == 3
    assert pairs == teacher_pairs(teacher, student, tokenizer, 3, batch=3, seed=5)  # seeded
    for p in pairs.prompt:
        assert tokenizer.decode(p).startswith("<|im_start|>user\n") and tokenizer.decode(p).endswith("assistant\n")
    # greedy: each answer is exactly what its model writes after that prompt alone
    for model, field in ((teacher, "chosen"), (student, "rejected")):
        greedy = teacher_pairs(teacher, student, tokenizer, 3, batch=3, seed=5, temperature=1e-6)
        for k in range(3):
            alone = answers(model, tokenizer, [greedy.prompt[k]], 1e-6)[0]
            assert getattr(greedy, field)[k] == alone


# ---- runs -----------------------------------------------------------------------------------------------
def _prefs(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "fox", "dog", "latent", "vector"]
    recs = [
        {"prompt": f"Say {w}.", "chosen": f"{w} {w}.", "rejected": f"no {words[(i + 3) % 8]}"}
        for i, w in enumerate(words)
    ]
    return _write(tmp_path / "prefs.jsonl", recs)


def test_dpo_run_prefers_chosen_keeps_reference_frozen_and_records(student_ckpt, tmp_path):
    from xecomla_cli.checkpoint import read_meta
    from xecomla_cli.distill.dpo import reference_logps
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy
    from xecomla_cli.sources import load_model

    cfg = PolicyConfig(prefs=str(_prefs(tmp_path)), epochs=3, batch_size=4, lr=3e-3, beta=0.5, save_every=0)
    cached = {}
    import xecomla_cli.distill.recipe as recipe

    real_prepare = recipe.prepare_items

    def spy(*a, **k):
        cached.update(real_prepare(*a, **k))
        return cached

    recipe.prepare_items = spy
    try:
        out, m = run_policy(student_ckpt, cfg, output=tmp_path / "dpo")
    finally:
        recipe.prepare_items = real_prepare
    # the reference is the input checkpoint, frozen: its log-probs, recomputed now, are the ones used
    before = load_model(str(student_ckpt)).model
    again = reference_logps(before, cached["pairs"], 2, 512, 1024)
    assert torch.equal(again, cached["ref_logps"])
    # the trained policy prefers the chosen answers more than the reference does
    after = load_model(str(out)).model
    now = reference_logps(after, cached["pairs"], 2, 512, 1024)
    margin = lambda lp: (lp[:, 0] - lp[:, 1]).mean().item()  # noqa: E731
    assert margin(now) > margin(again)
    assert m["dpo_loss"] < m["dpo_loss_first"]
    meta = read_meta(out)
    assert meta["stage"] == "dpo" and meta["dpo"]["beta"] == 0.5 and meta["dpo"]["items"] == 8
    assert not (tmp_path / "dpo.run").exists()


def test_dpo_resume_is_exact(student_ckpt, tmp_path):
    from xecomla_cli.checkpoint import read_weights
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy

    cfg = PolicyConfig(prefs=str(_prefs(tmp_path)), epochs=2, batch_size=2, lr=1e-3, save_every=2)
    run_policy(student_ckpt, cfg, output=tmp_path / "a")

    def kill_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_policy(student_ckpt, cfg, output=tmp_path / "b", on_step=kill_at_3)
    with pytest.raises(XecomlaError, match="--resume"):
        run_policy(student_ckpt, cfg, output=tmp_path / "b")
    run_policy(student_ckpt, cfg, output=tmp_path / "b", resume=True)
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_stopped_by_a_signal_resumes_exactly(student_ckpt, tmp_path):
    """The loop's signal handling is every mode's: Ctrl-C in a DPO run saves its state and stops."""
    import os
    import signal

    from xecomla_cli.checkpoint import read_weights
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy

    cfg = PolicyConfig(prefs=str(_prefs(tmp_path)), epochs=2, batch_size=2, lr=1e-3, save_every=0)
    run_policy(student_ckpt, cfg, output=tmp_path / "a")

    def ctrl_c_at_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(XecomlaError, match="stopped by SIGINT at step 3 of 8.*--resume"):
        run_policy(student_ckpt, cfg, output=tmp_path / "b", on_step=ctrl_c_at_3)
    run_policy(student_ckpt, cfg, output=tmp_path / "b", resume=True)
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_samples_come_from_the_student_and_the_teacher_scores_them(student_ckpt, tokenizer, monkeypatch):
    """The tokens trained on are the student's own samples; the loss is the teacher's divergence on them."""
    from xecomla_cli.distill import on_policy
    from xecomla_cli.sources import load_model

    student = load_model(str(student_ckpt)).model
    teacher = load_model(load_model(str(student_ckpt)).meta["source"]).model
    prompts = [[1, 5, 9], [1, 11]]
    torch.manual_seed(0)
    batch = on_policy.sample_answers(student, prompts, tokenizer, 6, temperature=1e-6)
    # greedy: every answer token is the student's argmax given what came before (its own logits)
    for b in range(2):
        n = int(batch.attention[b].sum())
        with torch.no_grad():
            logits = student(batch.ids[b : b + 1, :n]).logits[0]
        for t in batch.answer[b].nonzero().squeeze(1).tolist():
            assert batch.ids[b, t] == logits[t - 1].argmax()
    d, n = on_policy.on_policy_loss(student, teacher, batch, "reverse")
    assert n == int(batch.answer[:, 1:].sum())
    s, t = on_policy.answer_logits(student, batch), on_policy.answer_logits(teacher, batch)
    want = (s.softmax(-1) * (s.log_softmax(-1) - t.log_softmax(-1))).sum(-1).mean()
    assert d.item() == pytest.approx(want.item(), rel=1e-5)
    assert on_policy.on_policy_loss(student, student, batch, "reverse")[0].item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_divergences(kind):
    from xecomla_cli.distill.on_policy import divergence

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    ps, pt = s.softmax(-1), t.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    m = 0.3 * pt + 0.7 * ps
    want = {"forward": kl(pt, ps), "reverse": kl(ps, pt), "jsd": 0.3 * kl(pt, m) + 0.7 * kl(ps, m)}[kind]
    torch.testing.assert_close(divergence(s, t, kind, 0.3).double(), want, rtol=1e-5, atol=1e-6)


def test_on_policy_run_and_resume(student_ckpt, tmp_path):
    from xecomla_cli.checkpoint import read_meta, read_weights
    from xecomla_cli.distill.policy_config import PolicyConfig
    from xecomla_cli.distill.recipe import run_policy

    cfg = PolicyConfig(mode="on-policy", prompts=4, epochs=2, batch_size=2, lr=1e-3, new_tokens=6, save_every=2,
                       student_fraction=0.5)  # fmt: skip
    out, m = run_policy(student_ckpt, cfg, output=tmp_path / "a")
    assert read_meta(out)["stage"] == "on-policy" and m["on_policy_steps"] == 4

    def kill_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_policy(student_ckpt, cfg, output=tmp_path / "b", on_step=kill_at_3)
    run_policy(student_ckpt, cfg, output=tmp_path / "b", resume=True)
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the sampler ---------------------------------------------------------------------------------------
def test_sampler_is_the_same_at_any_thread_count_and_for_mla(student_ckpt):
    from xecomla_cli.sources import load_model
    from xecomla_cli.text.chat import left_pad
    from xecomla_cli.text.sampling import ThreadChoice, sample

    mla = load_model(str(student_ckpt)).model
    ids, mask = left_pad([[5, 9, 13, 2, 7], [11, 4]], 0, torch.device("cpu"))
    outs = []
    for forced in (1, 2):
        choice = ThreadChoice(ids.device)
        choice.pick = lambda n=forced: n  # noqa: B023
        torch.manual_seed(3)
        outs.append(sample(mla, ids, mask, 8, [], 1.0, threads=choice))
    assert torch.equal(outs[0], outs[1])
    # greedy MLA sampling through the latent cache = generate without a cache
    greedy = sample(mla, ids[1:, 3:], mask[1:, 3:], 5, [], 0.0)
    want = mla.generate(ids[1:, 3:], do_sample=False, max_new_tokens=5, use_cache=False, pad_token_id=0)
    assert greedy[0].tolist() == want[0, 2:].tolist()


def test_sampler_restores_the_attention_backend():
    from conftest import make_model

    from xecomla_cli.text.sampling import sample

    model = make_model("llama")
    before = model.config._attn_implementation
    sample(model, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), 3, [], 1.0)
    assert model.config._attn_implementation == before


def test_cli_dpo_in_a_pipe(student_ckpt, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "xecomla_cli", "-q", "distill", "-", "--dpo", "--prefs", str(_prefs(tmp_path)), "-o",
         str(out)],
        input=f"{student_ckpt}\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
