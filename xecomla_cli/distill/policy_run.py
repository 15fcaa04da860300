"""`xecomla distill --dpo` and `--on-policy` as one recipe: the stages after KD.

    claim_output    check the student checkpoint, resolve the options, claim OUT   plan.py, policy_config.py
    load            the student (fp32 master weights) and, when needed, the teacher
    prepare         DPO: pairs + the reference's log-probs; on-policy: teacher-written prompts;
                    made once and kept in OUT.run/items.safetensors (a resumed run reads them)
    PolicyTrainer   optimizer steps: the DPO loss (dpo.py) or the on-policy divergence (on_policy.py)
    train           steps, metrics lines, progress bar, resumable states (state.py)
    save_distilled  the stage checkpoint OUT, its xecomla.json recording the run       output.py

One process (no torchrun): these stages are short next to KD.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import console
from ..checkpoint import read_meta, recorded_source
from ..errors import XecomlaError
from ..outputs import claim
from ..sources import input_paths
from ..text.packing import BlockSampler
from .dist import Dist, setup_distributed
from .dpo import answer_logps, dpo_loss, pair_batch, reference_logps
from .metrics import MetricsLog, round_floats
from .models import check_same_tokenizer
from .on_policy import on_policy_loss, sample_answers, uses_student
from .output import save_distilled
from .plan import RunPaths, RunPlan, claim_output, data_paths
from .policy_config import RESUME_KEYS, PolicyConfig, ResolvedPolicyConfig, resolve_policy_config
from .preferences import Pairs, load_pairs, teacher_prompts
from .progress import TrainProgress
from .state import check_fingerprint, load_state, read_state_info, save_state
from .trainer import Trainer, lr_lambda


class PolicyTrainer:
    """AdamW steps on the student for DPO or on-policy distillation (no I/O of its own).

    Its state (module, optimizer, scheduler, step) is saved and restored by state.py as KD's is."""

    full_state = Trainer.full_state
    load_full_state = Trainer.load_full_state

    def __init__(self, student, teacher, cfg: ResolvedPolicyConfig, items: dict[str, Any], tokenizer, dist: Dist):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.student, self.teacher, self.items, self.tokenizer = student.train(), teacher, items, tokenizer
        self.module = student
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        schedule = lr_lambda(cfg.total_steps, cfg.warmup_steps, 0.0)  # cosine to 0, as TRL's "cosine"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.autocast = torch.bfloat16 if cfg.precision == "bf16" else None
        self.step = 0
        n = len(items["pairs"]) if cfg.mode == "dpo" else len(items["prompts"])
        self.sampler = BlockSampler(n, cfg.batch_size, cfg.seed)

    def train_step(self) -> dict[str, float]:
        idx = self.sampler.indices(self.step).tolist()
        stats = self._dpo_step(idx) if self.cfg.mode == "dpo" else self._on_policy_step(idx)
        params = [p for p in self.student.parameters() if p.requires_grad]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip or float("inf")))
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    def _dpo_step(self, idx: list[int]) -> dict[str, float]:
        cfg, pairs, ref = self.cfg, self.items["pairs"], self.items["ref_logps"]
        sums = torch.zeros(4, dtype=torch.float64)
        for s in range(0, len(idx), cfg.micro_batch):
            mi = idx[s : s + cfg.micro_batch]
            b = pair_batch(pairs, mi, cfg.max_prompt, cfg.max_length)
            b = type(b)(b.ids.to(self.device), b.attention.to(self.device), b.answer.to(self.device))
            policy = answer_logps(self.student, b, self.autocast)
            st = dpo_loss(policy, torch.cat([ref[mi, 0], ref[mi, 1]]).to(self.device), cfg.beta)
            (st.loss * (len(mi) / len(idx))).backward()
            stack = torch.stack([st.loss, st.chosen_reward, st.rejected_reward, st.accuracy]).detach().double().cpu()
            sums += stack * len(mi)
        loss, chosen, rejected, acc = (sums / len(idx)).tolist()
        return {"loss": loss, "reward_chosen": chosen, "reward_rejected": rejected, "reward_accuracy": acc}

    def _on_policy_step(self, idx: list[int]) -> dict[str, float]:
        cfg = self.cfg
        student_samples = uses_student(self.step, cfg.seed, cfg.student_fraction)
        writer = self.student if student_samples else self.teacher
        prompts = [self.items["prompts"][i] for i in idx]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # the same samples on resume
            batch = sample_answers(writer, prompts, self.tokenizer, cfg.new_tokens, cfg.temperature)
        total = int(batch.answer[:, 1:].sum())
        div_sum = 0.0
        for s in range(0, len(idx), cfg.micro_batch):
            sl = slice(s, s + cfg.micro_batch)
            mb = type(batch)(*(t[sl].to(self.device) for t in (batch.ids, batch.attention, batch.answer)))
            if int(mb.answer[:, 1:].sum()) == 0:
                continue
            d, n = on_policy_loss(self.student, self.teacher, mb, cfg.divergence, cfg.jsd_beta, self.autocast)
            (d * (n / max(total, 1))).backward()
            div_sum += float(d.detach()) * n
        return {"loss": div_sum / max(total, 1), "answer_tokens": total, "student_samples": float(student_samples)}


def default_output(ckpt: Path, mode: str) -> Path:
    return ckpt.resolve().parent / f"{ckpt.resolve().name}-{mode}"


def run_policy(
    ckpt: str | Path,
    options: PolicyConfig,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    on_step=None,
) -> tuple[Path, dict[str, Any]]:
    """Train the student checkpoint `ckpt` with DPO or on-policy distillation; (output dir, metrics)."""
    dist = setup_distributed(options.device)
    if dist.distributed:
        raise XecomlaError("--dpo and --on-policy run on one process: start them without torchrun")
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    cfg = resolve_policy_config(options, student_source=recorded_source(ckpt, meta))
    paths = RunPaths(Path(output) if output else default_output(ckpt, cfg.mode))
    prefs = data_paths(cfg.prefs) if cfg.mode == "dpo" else []
    inputs = [ckpt, *input_paths(cfg.teacher), *prefs]
    with claim(paths.out, inputs=inputs, force=True, also=[paths.run_dir]):  # one writer, inputs never written
        resume = claim_output(paths, dist, resume=resume, force=force, log=console.log)
        return _train(ckpt, cfg, paths, dist, resume, force, on_step)


def _train(ckpt: Path, cfg: ResolvedPolicyConfig, paths: RunPaths, dist, resume: bool, force: bool, on_step):
    student, teacher = load(ckpt, cfg, dist.device)
    items = prepare(cfg, student, teacher, paths.run_dir / "items.safetensors", dist.device)
    cfg = cfg.with_steps(len(items["pairs"]) if cfg.mode == "dpo" else len(items["prompts"]))
    plan = RunPlan(ckpt, cfg, paths, resume, force)
    trainer = PolicyTrainer(student.model, teacher.model if teacher else None, cfg, items, student.tokenizer, dist)
    what = f"{len(items['pairs'])} pairs, β {cfg.beta:g}" if cfg.mode == "dpo" else f"{len(items['prompts'])} prompts"
    console.log(f"{cfg.mode} on {ckpt}: {cfg.total_steps} steps x {cfg.batch_size} ({what}), lr {cfg.lr:g}")
    fingerprint = {**{k: v for k, v in cfg.to_dict().items() if k in RESUME_KEYS}, "student": str(ckpt.resolve())}
    metrics_log = MetricsLog(paths.metrics)
    seconds = 0.0
    if resume:
        info = read_state_info(paths.state_dir)
        check_fingerprint(info, fingerprint, paths.run_dir)
        load_state(trainer, paths.state_dir, info)
        metrics_log.truncate(trainer.step)
        seconds = float(info.get("seconds", 0.0))
        console.log(f"resumed at step {trainer.step} of {cfg.total_steps}")
    else:
        metrics_log.start()
    records, start = [], time.perf_counter() - seconds
    label = "DPO loss" if cfg.mode == "dpo" else f"{cfg.divergence} divergence"
    with TrainProgress(cfg.total_steps, trainer.step, disable=False, label=label, metric="loss") as progress:
        while trainer.step < cfg.total_steps:
            record = {"step": trainer.step + 1, **trainer.train_step(), "seconds": time.perf_counter() - start}
            metrics_log.write({"event": "train", **round_floats(record), "lr": record["lr"]})  # 5e-7 survives
            records.append(record)
            progress.update(trainer.step, record)
            if on_step is not None:
                on_step(trainer.step, record)
            if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.total_steps:
                save_state(trainer, paths.state_dir, {"fingerprint": fingerprint, "seconds": record["seconds"]})
    metrics = final_metrics(cfg, paths.metrics, time.perf_counter() - start)
    section = cfg.mode.replace("-", "_")
    record = {**cfg.to_dict(), "items": len(items["pairs"] if cfg.mode == "dpo" else items["prompts"])}
    save_distilled(plan, model=student.model, student=student, metrics=metrics, record=record, stage=cfg.mode,
                   section=section)  # fmt: skip
    console.log(f"{cfg.mode}: loss {metrics[f'{section}_loss_first']:.4f} -> {metrics[f'{section}_loss']:.4f}")
    console.log(f"[green]wrote[/] {paths.out}")
    return paths.out, metrics


def load(ckpt: Path, cfg: ResolvedPolicyConfig, device: torch.device):
    """The student in fp32 and the teacher (not needed for DPO on a preference file)."""
    from ..sources import load_model

    with console.status(f"loading student {ckpt}"):
        student = load_model(str(ckpt), dtype="float32", device=str(device))
    if cfg.mode == "dpo" and cfg.prefs != "teacher":
        return student, None
    with console.status(f"loading teacher {cfg.teacher}"):
        teacher = load_model(cfg.teacher, dtype="float32", device=str(device))
    teacher.model.eval().requires_grad_(False)
    check_same_tokenizer(student.tokenizer, teacher.tokenizer, cfg.teacher)
    return student, teacher


def prepare(cfg: ResolvedPolicyConfig, student, teacher, cache: Path, device) -> dict[str, Any]:
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
            prompts = []
            while len(prompts) < cfg.prompts:
                prompts += teacher_prompts(teacher.model, tok, min(16, cfg.prompts - len(prompts)), cfg.temperature)
        items, tensors = {"prompts": prompts}, Pairs(prompts, prompts, prompts).to_tensors()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file(tensors, tmp, metadata={"key": key})
    tmp.replace(cache)
    return items


ITEM_KEYS = ("mode", "teacher", "prefs", "prompts", "max_prompt", "max_length", "temperature", "seed", "micro_batch")


def _cache_key(cache: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(cache, "pt") as f:
        return (f.metadata() or {}).get("key")


def final_metrics(cfg: ResolvedPolicyConfig, metrics_path: Path, seconds: float) -> dict[str, Any]:
    """The run's summary for xecomla.json: first and last losses (mean of the last quarter of the steps)."""
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("event") == "train"]
    tail = train[-max(1, len(train) // 4) :]
    section = cfg.mode.replace("-", "_")
    out = {
        f"{section}_loss_first": train[0]["loss"],
        f"{section}_loss": sum(x["loss"] for x in tail) / len(tail),
        f"{section}_steps": cfg.total_steps,
        f"{section}_seconds": round(seconds, 1),
    }
    if cfg.mode == "dpo":
        out["dpo_reward_accuracy"] = sum(x["reward_accuracy"] for x in tail) / len(tail)
    return out
