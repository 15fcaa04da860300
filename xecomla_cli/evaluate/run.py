"""`xecomla eval` as one function: load the model (and its teacher or original), measure what the
options ask for, and return the result that ``--json`` prints. One model is on the device at a time."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import XecomlaError
from ..loaded import LoadedModel
from ..mla.rebuild import spec_shape_matches
from ..sources import load_model, resolve
from ..text.validate import text_documents_only
from .kv_memory import kv_cache_metrics
from .multiple_choice import average, score_examples
from .options import EvalOptions
from .perplexity import count_tokens, perplexity
from .scoring import ProgressFactory, device_of, noop
from .speed import measure_speed
from .tasks import Example


def evaluate_model(
    loaded: LoadedModel,
    opts: EvalOptions,
    examples: dict[str, list[Example]],
    *,
    label: str = "model",
    progress_factory: ProgressFactory | None = None,
    original_kv: dict | None = None,
) -> dict[str, Any]:
    """Every metric `opts` asks for, for one loaded model (`progress_factory(desc, total) -> advance`)."""
    model, tok = loaded.model, loaded.tokenizer
    bar = progress_factory or (lambda desc, total: noop)
    metrics: dict[str, Any] = {}
    if opts.ppl:
        if opts.ppl_name != "lambada":  # --ppl-data: drop documents that are mostly byte/unknown tokens
            opts.ppl_documents = text_documents_only(opts.ppl_documents, tok, f"--ppl-data {opts.ppl_name}")
        total = count_tokens(tok, opts.ppl_documents, opts.ppl_tokens)
        res = perplexity(
            model,
            tok,
            opts.ppl_documents,
            seq_len=opts.seq_len,
            stride=opts.stride,
            batch_tokens=256 * opts.batch_size,
            max_tokens=opts.ppl_tokens,
            progress=bar(f"{label}: perplexity", total),
        )
        metrics["perplexity"] = {"data": opts.ppl_name, **res}
    if opts.tasks:
        metrics["tasks"] = {}
        for task in opts.tasks:
            exs = examples[task.name]
            n_requests = sum(len(e.requests) for e in exs)
            advance = bar(f"{label}: {task.name}", n_requests)
            res = score_examples(model, tok, exs, batch_size=opts.batch_size, progress=advance)
            keep = {k: v for k, v in res.items() if k == "n" or k.split("_stderr")[0] in task.metrics}
            metrics["tasks"][task.name] = {**keep, "primary": task.primary, "split": task.split}
        metrics["average"] = average(metrics["tasks"])
    if opts.kv:
        metrics["kv_cache"] = kv_cache_metrics(loaded, context=opts.context, batch=opts.batch, original_kv=original_kv)
    if opts.speed:
        metrics["speed"] = measure_speed(
            model, batch=opts.batch, context=opts.speed_context or opts.context, new_tokens=opts.new_tokens
        )
    return metrics


def _evaluate_reference(
    student: LoadedModel,
    reference: str,
    role: str,
    opts: EvalOptions,
    examples: dict[str, list[Example]],
    load: Callable[[str], LoadedModel],
    progress_factory: ProgressFactory | None,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict | None]:
    """(metrics of the teacher or original, its measured KV cache when it is the student's original).

    The reference goes first so that the model's cache is compared with a measured one; the model
    is set aside (moved to CPU) meanwhile, so one model is on the device at a time."""
    ref_opts = opts if role == "teacher" else opts.for_original()
    on = device_of(student.model)
    if on.type != "cpu":
        student.model.to("cpu")
    ref = load(reference)
    log(f"[bold]{role}[/]: {reference}")
    ref_metrics = evaluate_model(ref, ref_opts, examples, label=role.split(" ")[0], progress_factory=progress_factory)
    ref_kv = None
    if student.is_mla and not ref.is_mla and spec_shape_matches(ref.config, student.spec):
        ref_kv = ref_metrics.get("kv_cache")  # the original's cache, measured: the compression reference
    del ref
    gc.collect()
    if on.type == "cuda":
        torch.cuda.empty_cache()
    student.model.to(on)
    return ref_metrics, ref_kv


def run_eval(
    model_source: str,
    opts: EvalOptions,
    *,
    teacher: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    load: Callable[[str], LoadedModel] | None = None,
    progress_factory: ProgressFactory | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Evaluate `model_source` (and `teacher`, or for --speed of an MLA model its original) and
    return the result dict printed by ``--json``. One model is in memory at a time."""
    load = load or (lambda src: load_model(src, dtype=dtype, device=device))
    resolved = resolve(model_source)  # fail early on a bad path, before any long run
    if teacher is not None:
        resolve(teacher)
    start = time.perf_counter()
    examples = {t.name: t.load(opts.limit) for t in opts.tasks}
    for name, exs in examples.items():
        if not exs:
            raise XecomlaError(f"task '{name}' has no examples")

    student = load(model_source)
    reference, role = teacher, "teacher" if teacher else None
    if reference is None and opts.speed and student.is_mla:
        reference, role = student.source, "original (speed and KV baseline)"
    ref_metrics = ref_kv = None
    if reference is not None:
        ref_metrics, ref_kv = _evaluate_reference(student, reference, role, opts, examples, load, progress_factory, log)
    log(f"[bold]model[/]: {model_source}")
    metrics = evaluate_model(
        student, opts, examples, label="model", progress_factory=progress_factory, original_kv=ref_kv
    )
    return {
        "model": str(resolved.directory) if resolved.is_checkpoint else model_source,
        "checkpoint": str(resolved.directory) if resolved.is_checkpoint else None,
        "stage": student.meta.get("stage") if resolved.is_checkpoint else None,
        "source": student.source,
        "mla": student.is_mla,
        "teacher": reference,
        "teacher_role": role,
        "settings": opts.settings(dtype=dtype, device=device),
        "results": {"model": metrics, "teacher": ref_metrics},
        "seconds": round(time.perf_counter() - start, 1),
    }
