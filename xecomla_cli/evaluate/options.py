"""What an eval measures: `EvalOptions`, and `eval_options`, which checks the command's options and
gathers the tasks and the perplexity text before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import XecomlaError
from .tasks import DEFAULT_TASKS, TaskInfo, lambada_passages, resolve_tasks, text_documents

DEFAULT_PPL_TOKENS = 8192  # of the built-in LAMBADA slice: a quick default run


@dataclass
class EvalOptions:
    tasks: list[TaskInfo] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 32
    ppl: bool = True
    ppl_name: str = "lambada"
    ppl_documents: list[str] = field(default_factory=list)
    ppl_tokens: int | None = None
    seq_len: int = 1024
    stride: int | None = None
    kv: bool = True
    context: int = 8192
    batch: int = 1
    speed: bool = False
    new_tokens: int = 32
    speed_context: int | None = None  # None: `context`

    def for_original(self) -> EvalOptions:
        """What the original of an MLA model is measured for: its KV cache and its speed."""
        return EvalOptions(
            ppl=False,
            kv=self.kv,
            context=self.context,
            batch=self.batch,
            speed=True,
            new_tokens=self.new_tokens,
            speed_context=self.speed_context,
        )

    def settings(self, **extra) -> dict[str, Any]:
        """The ``settings`` of a result: `extra` (dtype, device) and every option that was used."""
        s: dict[str, Any] = {**extra, "batch_size": self.batch_size}
        if self.tasks:
            s.update(tasks=[t.name for t in self.tasks], limit=self.limit, num_fewshot=0)
        if self.ppl:
            s.update(
                ppl_data=self.ppl_name,
                ppl_tokens=self.ppl_tokens,
                seq_len=self.seq_len,
                stride=self.stride or self.seq_len,
            )
        if self.kv:
            s.update(context=self.context, batch=self.batch)
        if self.speed:
            s.update(speed_context=self.speed_context or self.context, batch=self.batch, new_tokens=self.new_tokens)
        return s


def eval_options(
    *,
    tasks: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    ppl_data: list[Path] | None = None,
    ppl_tokens: int | None = None,
    ppl: bool = True,
    seq_len: int = 1024,
    stride: int | None = None,
    kv: bool = True,
    context: int = 8192,
    batch: int = 1,
    speed: bool = False,
    new_tokens: int = 32,
) -> EvalOptions:
    """`xecomla eval`'s options, checked, with the tasks resolved ('default': the first six) and the
    perplexity documents read (--ppl-data, else the first DEFAULT_PPL_TOKENS tokens of LAMBADA)."""
    for name, value, least in (
        ("--limit", limit, 1),
        ("--batch-size", batch_size, 1),
        ("--ppl-tokens", ppl_tokens, 1),
        ("--seq-len", seq_len, 2),
        ("--stride", stride, 1),
        ("--context", context, 1),
        ("--batch", batch, 1),
        ("--new-tokens", new_tokens, 1),
    ):
        if value is not None and value < least:
            raise XecomlaError(f"{name} must be at least {least} (got {value})")
    if stride is not None and stride > seq_len:
        raise XecomlaError(f"--stride ({stride}) cannot exceed --seq-len ({seq_len})")
    task_list = []
    if tasks:
        task_list = resolve_tasks(",".join(DEFAULT_TASKS) if tasks.strip() == "default" else tasks)
    opts = EvalOptions(
        tasks=task_list,
        limit=limit,
        batch_size=batch_size,
        ppl=ppl,
        seq_len=seq_len,
        stride=stride,
        kv=kv,
        context=context,
        batch=batch,
        speed=speed,
        new_tokens=new_tokens,
    )
    if opts.ppl:
        if ppl_data:
            files = text_documents(ppl_data)
            more = f" +{len(files) - 3}" if len(files) > 3 else ""
            opts.ppl_name = ", ".join(Path(name).name for name, _ in files[:3]) + more
            opts.ppl_documents = [doc for _, docs in files for doc in docs]
            opts.ppl_tokens = ppl_tokens
        else:
            opts.ppl_name = "lambada"
            opts.ppl_documents = lambada_passages()
            opts.ppl_tokens = ppl_tokens or DEFAULT_PPL_TOKENS
    if not (opts.ppl or opts.tasks or opts.kv or opts.speed):
        raise XecomlaError("nothing to evaluate: drop --no-ppl/--no-kv, or add --tasks or --speed")
    return opts
