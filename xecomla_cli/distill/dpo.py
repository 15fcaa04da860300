"""Direct preference optimisation (Rafailov et al., 2023), X-EcoMLA's stage after KD.

For a prompt x with a preferred answer y_w and a rejected one y_l, with the policy π (the student
being trained) and the reference π_ref (a frozen copy of the input checkpoint):

    log π(y | x) = Σ_t log π(y_t | x, y_<t)                      summed over the answer's tokens
    z            = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
    loss         = −log σ(z)                                     TRL's loss_type="sigmoid"

    ∂loss/∂θ = −β · σ(−z) · ∇θ [log π(y_w|x) − log π(y_l|x)]    (vanishes with β → 0)

The reference never changes, so its log-probabilities are computed once, before the first step,
and kept with the pairs (TRL's ``precompute_ref_log_probs``): no second model in memory, and a
resumed run reads the same numbers. ``dpo_loss_reference`` is the formula on full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .preferences import Pairs


@dataclass
class PairBatch:
    """2n right-padded sequences [chosen rows; rejected rows] with masks of their answer tokens."""

    ids: torch.Tensor  # (2n, L)
    attention: torch.Tensor  # (2n, L) 1 = a real token
    answer: torch.Tensor  # (2n, L) 1 = an answer token (its log-prob counts)

    @property
    def n(self) -> int:
        return self.ids.shape[0] // 2


def truncate(prompt: list[int], answer: list[int], max_prompt: int, max_length: int) -> tuple[list[int], list[int]]:
    """A prompt keeps its last `max_prompt` tokens; the answer is cut so both fit in `max_length`."""
    prompt = prompt[-max_prompt:]
    return prompt, answer[: max(1, max_length - len(prompt))]


def pair_batch(pairs: Pairs, idx: list[int], max_prompt: int = 512, max_length: int = 1024) -> PairBatch:
    """The pairs `idx` as one batch: chosen sequences first, then rejected, right-padded with 0."""
    rows = []
    for field in ("chosen", "rejected"):
        for i in idx:
            p, a = truncate(pairs.prompt[i], getattr(pairs, field)[i], max_prompt, max_length)
            rows.append((p, a))
    return packed(rows)


def packed(rows: list[tuple[list[int], list[int]]]) -> PairBatch:
    """(prompt, answer) token rows as one right-padded batch (pad 0) with the answer positions marked."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    answer = torch.zeros_like(ids)
    for b, (p, a) in enumerate(rows):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        attention[b, : len(p) + len(a)] = 1
        answer[b, len(p) : len(p) + len(a)] = 1
    return PairBatch(ids, attention, answer)


def answer_logps(model, batch: PairBatch, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each sequence's answer tokens: (2n,).

    Logits are made only at the positions that predict an answer token: (tokens, V), not (2n, L, V)."""
    dev = batch.ids.device.type
    with torch.autocast(dev, dtype=autocast or torch.float32, enabled=autocast is not None):
        h = model.model(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False).last_hidden_state
        where = batch.answer[:, 1:].bool()  # position t predicts token t + 1
        h_sel = h[:, :-1][where]  # (tokens, d)
        logits = F.linear(h_sel, model.lm_head.weight).float()  # (tokens, V)
    vocab = model.config.vocab_size
    target = batch.ids[:, 1:][where]
    lp = torch.log_softmax(logits[:, :vocab], dim=-1).gather(1, target[:, None]).squeeze(1)  # (tokens,)
    row = torch.arange(batch.ids.shape[0], device=h.device)[:, None].expand_as(where)[where]
    return torch.zeros(batch.ids.shape[0], device=h.device, dtype=lp.dtype).index_add(0, row, lp)


@dataclass
class DPOStats:
    loss: torch.Tensor  # mean over pairs
    chosen_reward: torch.Tensor  # β (log π − log π_ref) of y_w, mean
    rejected_reward: torch.Tensor  # same for y_l
    accuracy: torch.Tensor  # fraction of pairs with chosen reward > rejected reward


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> DPOStats:
    """The sigmoid DPO loss from sequence log-probs (2n,) of [chosen; rejected], policy and reference."""
    pc, pr = policy.chunk(2)
    rc, rr = reference.to(policy.dtype).chunk(2)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    z = chosen - rejected
    return DPOStats(-F.logsigmoid(z).mean(), chosen.mean(), rejected.mean(), (z > 0).float().mean())


def dpo_loss_reference(policy_logits, ref_logits, ids, answer, beta: float) -> torch.Tensor:
    """The loss from full logits (2n, L, V) and answer masks, token by token (tests)."""

    def seq_logp(logits):
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(2, ids[:, 1:, None]).squeeze(2)
        return (lp * answer[:, 1:]).sum(1)

    pc, pr = seq_logp(policy_logits).chunk(2)
    rc, rr = seq_logp(ref_logits).chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


@torch.no_grad()
def reference_logps(model, pairs: Pairs, micro: int, max_prompt: int, max_length: int) -> torch.Tensor:
    """log π_ref of every pair's [chosen, rejected] answers, (N, 2), from the model as it is now."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(pairs), micro):
        idx = list(range(s, min(s + micro, len(pairs))))
        b = pair_batch(pairs, idx, max_prompt, max_length)
        lp = answer_logps(model, PairBatch(b.ids.to(dev), b.attention.to(dev), b.answer.to(dev)))
        out.append(torch.stack(lp.double().cpu().chunk(2), dim=1))
    model.train(was_training)
    return torch.cat(out)
