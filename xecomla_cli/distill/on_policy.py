"""On-policy distillation (GKD: Agarwal et al., ICLR 2024): the student answers teacher-written
prompts itself, and the teacher scores every token of those answers.

KD trains on text the teacher wrote; at generation time the student conditions on its own
tokens, which nothing trained (exposure bias). Here, per step:

    y ~ π_s(· | x)                                  the student samples an answer to prompt x
                                                    (with probability 1 − λ the teacher does: GKD's mix)
    loss = mean over the answer's positions t of D(p_t(· | x, y_<t), p_s(· | x, y_<t))

with D, over the whole vocabulary at each position (``--divergence``):

    forward   KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)      mode-covering (KD's loss)
    reverse   KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)      mode-seeking (MiniLLM, GKD's best on-policy)
    jsd       β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m),  m = β p_t + (1 − β) p_s   (TRL's generalised JSD)

The sample is not differentiated through (GKD): y is data; gradients flow through log p_s only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..choices import Divergence, values
from ..text.chat import left_pad, stop_ids, trim_at_stop
from ..text.sampling import sample
from .dpo import PairBatch, packed

DIVERGENCES = values(Divergence)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float = 0.5):
    """Per-position divergence (N,) between teacher and student logits (N, V), in fp32."""
    ls = torch.log_softmax(student_logits.float(), -1)
    lt = torch.log_softmax(teacher_logits.float(), -1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError("the generalised JSD needs 0 < beta < 1 (at 0 or 1 it is identically zero)")
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)  # log m
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}")


@torch.no_grad()
def sample_answers(model, prompts: list[list[int]], tokenizer, new_tokens: int, temperature: float) -> PairBatch:
    """Answers sampled from `model` to each rendered prompt, as one right-padded batch of
    prompt + answer with the answer tokens marked (the answer ends at its end-of-turn token)."""
    stop = stop_ids(tokenizer)
    dev = next(model.parameters()).device
    ids, mask = left_pad(prompts, stop[0], dev)
    was_training = model.training
    model.eval()
    rows = sample(model, ids, mask, new_tokens, stop, temperature).cpu()
    model.train(was_training)
    return packed([(p, trim_at_stop(r, stop)) for p, r in zip(prompts, rows, strict=True)])


def answer_logits(model, batch: PairBatch, autocast: torch.dtype | None = None) -> torch.Tensor:
    """The logits (tokens, V) at the positions that predict an answer token, in batch order."""
    dev = batch.ids.device.type
    with torch.autocast(dev, dtype=autocast or torch.float32, enabled=autocast is not None):
        h = model.model(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False).last_hidden_state
        h_sel = h[:, :-1][batch.answer[:, 1:].bool()]  # (tokens, d)
        return F.linear(h_sel, model.lm_head.weight)[:, : model.config.vocab_size]


def on_policy_loss(student, teacher, batch: PairBatch, kind: str, beta: float = 0.5, autocast=None):
    """(mean divergence over the answer tokens, number of tokens) with the teacher scoring `batch`."""
    with torch.no_grad():
        t = answer_logits(teacher, batch, autocast)
    s = answer_logits(student, batch, autocast)
    d = divergence(s, t, kind, beta)
    return d.mean(), d.shape[0]


def uses_student(step: int, seed: int, fraction: float) -> bool:
    """Whether step `step` samples from the student (else the teacher): GKD's λ, drawn per step
    from a generator seeded by (seed, step), so that a resumed run makes the same choices."""
    if fraction >= 1:
        return True
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand(1, generator=g).item() < fraction)
