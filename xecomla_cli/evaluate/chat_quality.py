"""How a model answers chat prompts, against its teacher: greedy agreement and the loop rate.

* **agreement**: for one prompt, the fraction of the teacher's first ``n`` greedy answer tokens
  that the model reproduces at the same position (the teacher's answer up to its stop token, when
  it stops sooner); a prompt set's agreement is the mean over prompts.
* **loop rate**: the fraction of answers in which some 4-gram of tokens occurs ``times`` or more
  times (occurrences may overlap), the degenerate repetition a poorly converted model falls into.

Answers are greedy, from the chat template with an explicit all-ones attention mask per prompt
(``greedy_answers``): a mask inferred from a pad token would hide the template's headers when
the pad (or EOS) token is one of them, as ``<|im_start|>`` is for SmolLM2's tokenizer.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..text.chat import has_chat_template, stop_ids, trim_at_stop
from ..text.sampling import sample


def agreement(answer: list[int], reference: list[int], n: int = 16) -> float:
    """Fraction of the reference's first ``n`` tokens that ``answer`` has at the same positions."""
    ref = reference[:n]
    if not ref:
        return 1.0 if not answer else 0.0
    return sum(1 for k, t in enumerate(ref) if k < len(answer) and answer[k] == t) / len(ref)


def mean_agreement(answers: list[list[int]], references: list[list[int]], n: int = 16) -> float:
    """Mean per-prompt ``agreement`` over paired answers and references."""
    if len(answers) != len(references) or not answers:
        raise ValueError("agreement needs as many answers as references, at least one")
    return sum(agreement(a, r, n) for a, r in zip(answers, references, strict=True)) / len(answers)


def loops(answer: list[int], gram: int = 4, times: int = 3) -> bool:
    """True when some ``gram``-gram occurs ``times`` or more times in ``answer``."""
    counts = Counter(tuple(answer[k : k + gram]) for k in range(len(answer) - gram + 1))
    return any(c >= times for c in counts.values())


def loop_rate(answers: list[list[int]], gram: int = 4, times: int = 3) -> float:
    """Fraction of ``answers`` that ``loops``."""
    if not answers:
        raise ValueError("loop rate of no answers")
    return sum(loops(a, gram, times) for a in answers) / len(answers)


def render(tokenizer, prompt: str) -> list[int]:
    """A user prompt as the model sees it: the chat template with the assistant header, else the plain text."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], tokens: int) -> list[list[int]]:
    """Each prompt's greedy answer (up to ``tokens`` tokens, its stop token included, so that agreement
    also asks the model to stop where the teacher does), one prompt at a time with an all-ones
    attention mask (no padding, so nothing of the prompt is hidden)."""
    device = next(model.parameters()).device
    stop = stop_ids(tokenizer)
    out = []
    for p in prompts:
        ids = torch.tensor([render(tokenizer, p)], device=device)
        row = sample(model, ids, torch.ones_like(ids), tokens, stop, 0.0)[0].cpu()
        out.append(trim_at_stop(row, stop))
    return out
