"""The chat-quality measures of bench/recipe_curve.py: agreement, the loop rate, greedy answers."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_model, make_tokenizer
from xecomla_cli.evaluate.chat_quality import agreement, greedy_answers, loop_rate, loops, mean_agreement, render
from xecomla_cli.text.chat import stop_ids


def test_agreement_counts_positions_of_the_reference():
    ref = [5, 6, 7, 8]
    assert agreement([5, 6, 7, 8], ref) == 1.0
    assert agreement([5, 9, 7, 0], ref) == 0.5  # position by position, not as a prefix
    assert agreement([6, 7, 8, 9], ref) == 0.0  # shifted by one: nothing at the same place
    assert agreement([5, 6], ref) == 0.5  # a shorter answer misses the rest
    assert agreement([5, 6, 7, 8, 1, 2], ref) == 1.0  # past the reference's end does not count
    assert agreement(list(range(20)), list(range(20)), n=16) == 1.0
    assert agreement([0] * 15 + [1], [0] * 16 + [9] * 4, n=16) == 15 / 16  # only the first n tokens


def test_mean_agreement_is_per_prompt():
    assert mean_agreement([[1, 2], [3]], [[1, 2], [4]]) == 0.5
    with pytest.raises(ValueError):
        mean_agreement([[1]], [[1], [2]])


def test_loops_needs_a_4gram_three_times():
    assert not loops([1, 2, 3, 4, 1, 2, 3, 4])  # twice
    assert loops([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4])  # three times
    assert loops([7] * 6)  # overlapping occurrences count: (7,7,7,7) three times
    assert not loops([7] * 5)
    assert not loops(list(range(40)))
    assert loops([9, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 1, 2, 3, 4])  # apart from each other
    assert not loops([1, 2, 3, 1, 2, 3, 1, 2, 3], gram=4)
    assert loops([1, 2, 3, 1, 2, 3, 1, 2, 3], gram=3)


def test_loop_rate_is_the_share_of_answers_that_loop():
    assert loop_rate([[1] * 8, list(range(8)), [2] * 8, list(range(9))]) == 0.5
    with pytest.raises(ValueError):
        loop_rate([])


def test_greedy_answers_see_the_whole_prompt_when_eos_is_a_chat_header():
    """SmolLM2's tokenizer says EOS is <|im_start|>: nothing of the rendered prompt may be masked,
    so each answer equals an argmax loop over the full, unmasked sequence."""
    tok = make_tokenizer()
    tok.eos_token = "<|im_start|>"
    model = make_model("llama", seed=3).eval()
    prompts = ["hello there", "a longer prompt than the first one"]
    got = greedy_answers(model, tok, prompts, 8)
    stop = stop_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_start|>") in stop
    for p, answer in zip(prompts, got, strict=True):
        seq = render(tok, p)
        assert seq.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # both chat headers are in the prompt
        ref = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([seq + ref])).logits[0, -1].argmax())
                ref.append(nxt)
                if nxt in stop:
                    break
        assert answer == ref
    # a masked-out header changes the logits: the check above can tell a hidden prompt from a seen one
    seq = torch.tensor([render(tok, prompts[0])])
    hidden = (seq != tok.eos_token_id).long()
    with torch.no_grad():
        assert not torch.allclose(model(seq).logits[0, -1], model(seq, attention_mask=hidden).logits[0, -1])


def test_curves_add_up_minutes_from_the_parent_and_adopted_runs_stand_alone():
    """A recipe's cumulative minutes start from its parent's stage; an adopted run (--adopt-demo, no
    RECIPES entry) is a line of its own; the table lists each recipe's own points once."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import recipe_curve as rc

    point = {"lambada_ppl": 1.0, "heldout_ppl": 1.0, "agreement": 0.5, "loop_rate": 0.0, "readme_loop_rate": 0.0}
    res = {
        "teacher": {**point, "loop_rate": 0.03},
        "recipes": {
            "baseline": {"points": [{"stage": s, "cpu_min": 1.0, "wall_min": 2.0, **point} for s in
                                    ("init", "local16k", "kd32k")]},
            "seqkd-0.5": {"points": [{"stage": "kd32k-greedy0.5", "cpu_min": 5.0, "wall_min": 5.0, **point}]},
            "make-demo": {"points": [{"stage": "init", "cpu_min": 3.0, "wall_min": 1.0, **point}]},
        },
    }  # fmt: skip
    assert [p["cum_cpu_min"] for p in rc.curve(res, "seqkd-0.5")] == [1.0, 2.0, 7.0]  # from baseline:local16k
    assert [p["cum_cpu_min"] for p in rc.curve(res, "make-demo")] == [3.0]
    rows = rc.table(res).splitlines()
    assert len(rows) == 3 + 3 + 1 + 1 and sum("seqkd-0.5" in r for r in rows) == 1
