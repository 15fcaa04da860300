"""`xecomla eval`: perplexity, zero-shot benchmarks, KV memory and decode speed of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..evaluate.options import DEFAULT_PPL_TOKENS
from .args import AllowPickleOpt, DeviceOpt, DtypeOpt, JsonOpt, read_arg
from .display import emit, load, progress_bars

TASKS_HELP = (
    "Comma-separated zero-shot tasks: arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa, boolq, "
    "mmlu (or mmlu_<subject>), 'default' (the first six), or a .jsonl file of {context, choices, gold}."
)
PPL_DATA_HELP = (
    "Text for perplexity (repeatable): a .txt file, a .jsonl/.json, .parquet or .arrow file ('text' per record), "
    "or a directory of them. Default: LAMBADA test passages."
)


def eval_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A stage checkpoint, 'demo', a Hub id, a local HF directory, a .gguf file, or '-' (read from stdin)."
        ),
    ],
    tasks: Annotated[str | None, typer.Option("--tasks", help=TASKS_HELP)] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", help="First N examples of each task (MMLU: of each subject, as lm-evaluation-harness)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass when scoring.")] = 32,
    ppl_data: Annotated[list[Path] | None, typer.Option("--ppl-data", help=PPL_DATA_HELP)] = None,
    ppl_tokens: Annotated[
        int | None,
        typer.Option(
            "--ppl-tokens",
            help=f"Score at most N tokens (default: {DEFAULT_PPL_TOKENS} of LAMBADA; all of --ppl-data).",
        ),
    ] = None,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Perplexity window length in tokens.")] = 1024,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Perplexity window step (default: --seq-len, disjoint windows).")
    ] = None,
    no_kv: Annotated[bool, typer.Option("--no-kv", help="Skip the KV cache measurement.")] = False,
    context: Annotated[int, typer.Option("--context", help="Context length for the KV GB figure and --speed.")] = 8192,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for the KV GB figure and --speed.")] = 1,
    speed: Annotated[
        bool,
        typer.Option(
            "--speed",
            help="Time prefill and decode (tokens/s, attention ms/step) for the model and its original/--teacher.",
        ),
    ] = False,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Decode steps timed by --speed.")] = 32,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="Evaluate this source too and print teacher, model and delta side by side."),
    ] = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Evaluate a model offline: perplexity, zero-shot accuracy (lm-evaluation-harness scoring), KV memory, speed.

    With no options: perplexity on 8,192 tokens of held-out LAMBADA text, and the KV cache measured after generating. A stage checkpoint's results are also written into its xecomla.json metrics ("eval").
    """  # noqa: E501
    from ..evaluate.options import eval_options
    from ..evaluate.record import record_eval
    from ..evaluate.report import comparison_table
    from ..evaluate.run import run_eval

    model = read_arg(model)
    opts = eval_options(
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        ppl_data=ppl_data,
        ppl_tokens=ppl_tokens,
        ppl=not no_ppl,
        seq_len=seq_len,
        stride=stride,
        kv=not no_kv,
        context=context,
        batch=batch,
        speed=speed,
        new_tokens=new_tokens,
    )
    with progress_bars() as bar:
        result = run_eval(
            model,
            opts,
            teacher=teacher,
            dtype=dtype,
            device=device,
            load=lambda src: load(src, dtype=dtype, device=device, allow_pickle=allow_pickle),
            progress_factory=bar,
            log=console.log,
        )
    console.err.print(comparison_table(result, name=model))
    if result["checkpoint"]:
        path = record_eval(result)
        console.log(f"[green]recorded[/] the metrics in {path}")
    emit(result if as_json else result["model"])
