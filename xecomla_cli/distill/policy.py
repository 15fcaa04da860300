"""DPO (``--dpo``) and on-policy distillation (``--on-policy``) as objectives of the one loop: the
stages after KD. One process (no torchrun): these stages are short next to KD.

    prepare_items      DPO: pairs + the reference's log-probs; on-policy: teacher-written prompts;
                       made once and kept in OUT.run/items.safetensors (a resumed run reads them)
    DPOObjective       batches of pairs (`BlockSampler` over them); the DPO loss (dpo.py)
    OnPolicyObjective  batches of prompts answered by the student (or, with probability 1 − λ, the
                       teacher), seeded per step; the teacher's divergence on them (on_policy.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import console
from ..text.packing import BlockSampler
from .dist import Dist
from .dpo import PairBatch, answer_logps, dpo_loss, pair_batch, reference_logps
from .metrics import TrainHistory, train_records
from .objective import Objective, Stats
from .on_policy import on_policy_loss, sample_answers, uses_student
from .policy_config import ResolvedPolicyConfig
from .preferences import Pairs, load_pairs, teacher_prompts

ITEM_KEYS = ("mode", "teacher", "prefs", "prompts", "max_prompt", "max_length", "temperature", "seed", "micro_batch")


class PolicyObjective(Objective):
    """What DPO and on-policy share: the student is the trained module, one process, a line a step."""

    def __init__(self, student, teacher, cfg: ResolvedPolicyConfig, items: dict[str, Any], tokenizer, dist: Dist):
        self.cfg, self.dist, self.items, self.tokenizer = cfg, dist, items, tokenizer
        self.student, self.teacher = student.train(), teacher
        self.trained_module = self.parallel = student
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.sampler = BlockSampler(n_items(cfg, items), cfg.batch_size, cfg.seed)

    def record(self) -> dict[str, Any]:
        return {**self.cfg.to_dict(), "items": n_items(self.cfg, self.items)}

    def summary(self, history: TrainHistory, final_val: dict[str, float] | None, metrics: Path) -> dict[str, Any]:
        """First and last losses (the mean of the last quarter of the steps; DPO: its reward accuracy
        too), from metrics.jsonl."""
        train = train_records(metrics)
        tail = train[-max(1, len(train) // 4) :]
        section = self.cfg.section
        out = {f"{section}_loss_first": train[0]["loss"], f"{section}_loss": sum(x["loss"] for x in tail) / len(tail)}
        if self.cfg.mode == "dpo":
            out["dpo_reward_accuracy"] = sum(x["reward_accuracy"] for x in tail) / len(tail)
        return out

    def final_line(self, metrics: dict[str, Any], history: TrainHistory) -> str:
        section = self.cfg.section
        return f"{self.cfg.mode}: loss {metrics[f'{section}_loss_first']:.4f} -> {metrics[f'{section}_loss']:.4f}"


class DPOObjective(PolicyObjective):
    """Sigmoid DPO against the frozen input checkpoint, whose log-probs were computed once."""

    label = "DPO loss"

    def batch(self, step: int) -> list[int]:
        return self.sampler.indices(step).tolist()

    def micro_batches(self, batch: list[int]) -> list[tuple[list[int], float]]:
        m = self.cfg.micro_batch
        return [(batch[s : s + m], len(batch[s : s + m]) / len(batch)) for s in range(0, len(batch), m)]

    def loss(self, micro: list[int]) -> tuple[torch.Tensor, Stats]:
        cfg, device, ref = self.cfg, self.dist.device, self.items["ref_logps"]
        b = pair_batch(self.items["pairs"], micro, cfg.max_prompt, cfg.max_length)
        b = PairBatch(b.ids.to(device), b.attention.to(device), b.answer.to(device))
        policy = answer_logps(self.student, b, self.autocast)
        st = dpo_loss(policy, torch.cat([ref[micro, 0], ref[micro, 1]]).to(device), cfg.beta)
        n = len(micro)
        parts = (st.loss, st.chosen_reward, st.rejected_reward, st.accuracy)
        names = ("loss", "reward_chosen", "reward_rejected", "reward_accuracy")
        return st.loss, {k: v.detach().double() * n for k, v in zip(names, parts, strict=True)}

    def step_stats(self, sums: Stats, batch: list[int]) -> Stats:
        return {k: v / len(batch) for k, v in sums.items()}

    def describe(self, ckpt: Path) -> str:
        cfg = self.cfg
        what = f"{len(self.items['pairs'])} pairs, β {cfg.beta:g}"
        return f"dpo on {ckpt}: {cfg.total_steps} steps x {cfg.batch_size} ({what}), lr {cfg.lr:g}"


class OnPolicyObjective(PolicyObjective):
    """GKD: the student answers teacher-written prompts; the teacher scores every answer token."""

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.cfg.divergence} divergence"

    def batch(self, step: int) -> tuple[PairBatch, bool]:
        """The step's prompts answered by the student (or the teacher: GKD's λ), the same on resume."""
        cfg = self.cfg
        student_samples = uses_student(step, cfg.seed, cfg.student_fraction)
        writer = self.student if student_samples else self.teacher
        prompts = [self.items["prompts"][i] for i in self.sampler.indices(step).tolist()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            batch = sample_answers(writer, prompts, self.tokenizer, cfg.new_tokens, cfg.temperature)
        return batch, student_samples

    def micro_batches(self, batch: tuple[PairBatch, bool]) -> list[tuple[PairBatch, float]]:
        """Micro batches with answer tokens, each weighted by its share of the step's answer tokens."""
        answers, m = batch[0], self.cfg.micro_batch
        total = max(int(answers.answer[:, 1:].sum()), 1)
        out = []
        for s in range(0, answers.ids.shape[0], m):
            mb = PairBatch(
                *(t[s : s + m].to(self.dist.device) for t in (answers.ids, answers.attention, answers.answer))
            )
            n = int(mb.answer[:, 1:].sum())
            if n:
                out.append((mb, n / total))
        return out

    def loss(self, micro: PairBatch) -> tuple[torch.Tensor, Stats]:
        cfg = self.cfg
        d, n = on_policy_loss(self.student, self.teacher, micro, cfg.divergence, cfg.jsd_beta, self.autocast)
        return d, {"loss": d.detach().double() * n, "answer_tokens": torch.tensor(n, dtype=torch.float64)}

    def step_stats(self, sums: Stats, batch: tuple[PairBatch, bool]) -> Stats:
        answers, student_samples = batch
        total = int(answers.answer[:, 1:].sum())
        loss = sums.get("loss", torch.zeros((), dtype=torch.float64)) / max(total, 1)
        return {
            "loss": loss,
            "answer_tokens": torch.tensor(float(total)),
            "student_samples": torch.tensor(float(student_samples)),
        }

    def describe(self, ckpt: Path) -> str:
        cfg = self.cfg
        what = f"{len(self.items['prompts'])} prompts"
        return f"on-policy on {ckpt}: {cfg.total_steps} steps x {cfg.batch_size} ({what}), lr {cfg.lr:g}"


def objective_for(student, teacher, cfg: ResolvedPolicyConfig, items, tokenizer, dist: Dist) -> PolicyObjective:
    kind = DPOObjective if cfg.mode == "dpo" else OnPolicyObjective
    return kind(student, teacher, cfg, items, tokenizer, dist)


def n_items(cfg: ResolvedPolicyConfig, items: dict[str, Any]) -> int:
    """Pairs (DPO) or prompts (on-policy): what an epoch passes over."""
    return len(items["pairs"]) if cfg.mode == "dpo" else len(items["prompts"])


def prepare_items(cfg: ResolvedPolicyConfig, student, teacher, cache: Path) -> dict[str, Any]:
    """DPO: the pairs and the reference's log-probs; on-policy: the prompts. Read back from `cache`."""
    key = json.dumps({k: cfg.to_dict()[k] for k in ITEM_KEYS} | {"student": str(student.source)})
    if cache.is_file() and _cache_key(cache) == key:  # made by an unfinished run with these settings
        t = load_file(cache)
        if cfg.mode == "dpo":
            return {"pairs": Pairs.from_tensors(t), "ref_logps": t["ref_logps"]}
        return {"prompts": Pairs.from_tensors(t).prompt}
    tok = student.tokenizer
    if cfg.mode == "dpo":
        with console.status(f"preference pairs from {cfg.prefs}"):
            kw = dict(teacher=teacher.model, student=student.model, n=cfg.prompts, seed=cfg.seed) if teacher else {}
            pairs = load_pairs(cfg.prefs, tok, **kw)
        with console.status(f"reference log-probs of {len(pairs)} pairs"):
            ref = reference_logps(student.model, pairs, cfg.micro_batch, cfg.max_prompt, cfg.max_length)
        items, tensors = {"pairs": pairs, "ref_logps": ref}, {**pairs.to_tensors(), "ref_logps": ref}
    else:
        with console.status(f"{cfg.prompts} prompts written by the teacher"), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            prompts: list[list[int]] = []
            while len(prompts) < cfg.prompts:
                prompts += teacher_prompts(teacher.model, tok, min(16, cfg.prompts - len(prompts)), cfg.temperature)
        items, tensors = {"prompts": prompts}, Pairs(prompts, prompts, prompts).to_tensors()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file(tensors, tmp, metadata={"key": key})
    tmp.replace(cache)
    return items


def _cache_key(cache: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(cache, "pt") as f:
        return (f.metadata() or {}).get("key")
