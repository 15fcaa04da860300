"""The arguments and options several commands share, as ``Annotated`` types, and how a command reads
them: '-' from stdin, comma-separated integer lists.

A command's own options are declared inline in its signature (as in Typer's docs). Commands
import from here (never from ``cli``).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import XecomlaError

SourceArg = Annotated[
    str,
    typer.Argument(
        help="'demo', a Hub id, a local HF directory, a .gguf file, a checkpoint, or '-' (read from stdin)."
    ),
]
CkptArg = Annotated[str, typer.Argument(help="A stage checkpoint directory, or '-' (read the path from stdin).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16, float16 or auto.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing output directory (distill: and discard an unfinished run's state)."
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Also load a source whose only weights are pickle files (pytorch_model.bin), which is refused by "
        "default. They are read with torch.load(weights_only=True), which unpickles tensors and plain containers "
        "only and refuses anything else; pickle can still run code through a flaw in that loader, so use this only "
        "for files you trust.",
    ),
]
RopeDimOpt = Annotated[
    int | None, typer.Option("--rope-dim", help="Decoupled RoPE dims p (default: half the head dim).")
]


def read_arg(value: str) -> str:
    """'-' means: the path is the last non-empty line on stdin (the previous stage's output)."""
    if value != "-":
        return value
    if sys.stdin.isatty():
        raise XecomlaError("'-' reads the input path from stdin, but nothing was piped in")
    lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if not lines:
        raise XecomlaError("'-' reads the input path from stdin, but stdin was empty: did the previous stage fail?")
    return lines[-1]


def parse_ints(text: str, name: str) -> list[int]:
    """'64,128' -> [64, 128], with one clear error for anything else."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise XecomlaError(f"{name} '{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise XecomlaError(f"{name} '{text}' must list positive integers")
    return values
