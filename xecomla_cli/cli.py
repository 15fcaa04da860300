"""The `xecomla` command line: the Typer app, its global options and `main`; nothing else.

Each command lives in `commands/` (one thin module each): it parses options, calls one library
function and prints the result. stdout carries only results so that stages chain in pipes.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from . import console
from .commands import distill, eval, export, init_svd, inspect
from .errors import XecomlaError

app = typer.Typer(
    name="xecomla",
    help="Upcycle a pretrained LLM's attention into multi-head latent attention (X-EcoMLA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("inspect")(inspect.inspect_command)
app.command("init-svd")(init_svd.init_svd_command)
app.command("distill")(distill.distill_command)
app.command("eval")(eval.eval_command)
app.command("export")(export.export_command)

_state = {"debug": False}


@app.callback()
def _global(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, tables or logs on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    console.set_quiet(quiet)
    _state["debug"] = debug
    _quiet_libraries(quiet)


def _quiet_libraries(quiet: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # read when tqdm is imported: e.g. transformers' GGUF loader uses tqdm directly
        os.environ["TQDM_DISABLE"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _errors():
    """Errors are printed even under --quiet (which silences only progress and tables)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def main() -> None:
    """Console-script entry: one line per error, non-zero exit, traceback only with --debug."""
    import click

    try:
        app(standalone_mode=False)
    except XecomlaError as exc:
        if _state["debug"]:
            raise
        _errors().print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        console.err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if _state["debug"]:
            raise
        _errors().print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (re-run with --debug for the traceback)")
        sys.exit(1)
