"""`xecomla eval`: perplexity, zero-shot benchmarks, KV memory and decode speed of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import XecomlaError

DEFAULT_PPL_TOKENS = 8192  # of the built-in LAMBADA slice: a quick default run


def eval_command(
    model: Annotated[str, typer.Argument(help="A stage checkpoint, 'demo', a Hub id, a local HF directory, a .gguf file, or '-' (read from stdin).")],
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated zero-shot tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa, boolq, mmlu (or mmlu_<subject>), 'default' (the first six), or a .jsonl file of {context, choices, gold}.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N examples of each task (MMLU: of each subject, as lm-evaluation-harness).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass when scoring.")] = 32,
    ppl_data: Annotated[Optional[list[Path]], typer.Option("--ppl-data", help="Text file or directory of .txt files for perplexity (repeatable). Default: LAMBADA test passages.")] = None,
    ppl_tokens: Annotated[Optional[int], typer.Option("--ppl-tokens", help=f"Score at most N tokens (default: {DEFAULT_PPL_TOKENS} of LAMBADA; all of --ppl-data).")] = None,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window length in tokens.")] = 1024,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Perplexity window step (default: --seq-len, disjoint windows).")] = None,
    no_kv: Annotated[bool, typer.Option("--no-kv", help="Skip the KV cache measurement.")] = False,
    context: Annotated[int, typer.Option("--context", help="Context length for the KV GB figure and --speed.")] = 8192,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for the KV GB figure and --speed.")] = 1,
    speed: Annotated[bool, typer.Option("--speed", help="Time prefill and decode (tokens/s, attention ms/step) for the model and its original/--teacher.")] = False,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Decode steps timed by --speed.")] = 32,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Evaluate this source too and print teacher, model and delta side by side.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (default: the model path).")] = False,
) -> None:
    """Evaluate a model offline: perplexity, zero-shot accuracy (lm-evaluation-harness scoring), KV memory, speed.

    With no options: perplexity on 8,192 tokens of held-out LAMBADA text, and the KV cache measured after generating. A stage checkpoint's results are also written into its xecomla.json metrics ("eval").
    """
    from .. import console, evaluate
    from ..checkpoint import read_meta, record_metrics
    from .common import emit, load, read_arg
    from ..eval_tasks import DEFAULT_TASKS, lambada_passages, resolve_tasks, text_documents

    model = read_arg(model)
    for name, value, least in (("--limit", limit, 1), ("--batch-size", batch_size, 1), ("--ppl-tokens", ppl_tokens, 1),
                               ("--seq-len", seq_len, 2), ("--stride", stride, 1), ("--context", context, 1),
                               ("--batch", batch, 1), ("--new-tokens", new_tokens, 1)):  # fmt: skip
        if value is not None and value < least:
            raise XecomlaError(f"{name} must be at least {least} (got {value})")
    if stride is not None and stride > seq_len:
        raise XecomlaError(f"--stride ({stride}) cannot exceed --seq-len ({seq_len})")
    task_list = []
    if tasks:
        task_list = resolve_tasks(",".join(DEFAULT_TASKS) if tasks.strip() == "default" else tasks)
    opts = evaluate.EvalOptions(tasks=task_list, limit=limit, batch_size=batch_size, ppl=not no_ppl, seq_len=seq_len,
                                stride=stride, kv=not no_kv, context=context, batch=batch, speed=speed,
                                new_tokens=new_tokens)  # fmt: skip
    if opts.ppl:
        if ppl_data:
            docs = text_documents(ppl_data)
            opts.ppl_name = ", ".join(Path(n).name for n, _ in docs[:3]) + (f" +{len(docs) - 3}" if len(docs) > 3 else "")
            opts.ppl_documents = [text for _, text in docs]
            opts.ppl_tokens = ppl_tokens
        else:
            opts.ppl_name = "lambada"
            opts.ppl_documents = lambada_passages()
            opts.ppl_tokens = ppl_tokens or DEFAULT_PPL_TOKENS
    if not (opts.ppl or opts.tasks or opts.kv or opts.speed):
        raise XecomlaError("nothing to evaluate: drop --no-ppl/--no-kv, or add --tasks or --speed")

    with console.make_progress() as progress:

        def bar(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        result = evaluate.run_eval(model, opts, teacher=teacher, dtype=dtype, device=device,
                                   load=lambda src: load(src, dtype=dtype, device=device),
                                   progress_factory=bar, log=console.log)  # fmt: skip
    console.err.print(_table(result, name=model))
    if result["checkpoint"]:
        existing = read_meta(result["checkpoint"]).get("metrics", {}).get("eval")
        record_metrics(result["checkpoint"], {"eval": evaluate.metrics_for_checkpoint(result, existing)})
        console.log(f"[green]recorded[/] the metrics in {Path(result['checkpoint']) / 'xecomla.json'}")
    emit(result if as_json else result["model"])


def _table(result, name: str | None = None):
    from rich.table import Table

    from ..evaluate import comparison_rows

    has_teacher = result["results"].get("teacher") is not None
    spec_original = not has_teacher and result["mla"] and "kv_cache" in result["results"]["model"]
    title = f"eval: {name or result['model']}" + (f"  vs  {result['teacher']} ({result['teacher_role']})" if has_teacher else "")
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    if has_teacher or spec_original:
        t.add_column("teacher" if result["teacher_role"] == "teacher" else "original", justify="right")
    t.add_column("model", justify="right")
    if has_teacher or spec_original:
        t.add_column("delta", justify="right")
    for metric, ref, value in comparison_rows(result):
        cells = [metric]
        if has_teacher or spec_original:
            cells.append(_fmt(ref))
        cells.append(_fmt(value))
        if has_teacher or spec_original:
            cells.append(_fmt(value - ref, signed=True) if ref is not None and value is not None else "")
        t.add_row(*cells)
    return t


def _fmt(x, signed: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) < 1 and not float(x).is_integer():
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    if isinstance(x, float) and abs(x) < 1000:
        return f"{x:+,.2f}" if signed else f"{x:,.2f}"
    return f"{x:+,.0f}" if signed else f"{x:,.0f}"
