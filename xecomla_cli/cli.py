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
from .loaded import first_line
from .outputs import os_error_line

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
    _state["debug"] = debug or _state["debug"]
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


def _print_error(line: str) -> None:
    """One line on stderr, even under --quiet (which silences only progress and tables); the message
    is plain text (never rich markup) and is not wrapped."""
    from rich.console import Console
    from rich.text import Text

    line = " ".join(line.split("\n"))
    Console(stderr=True, highlight=False).print(Text.assemble(("error:", "bold red"), " ", line), soft_wrap=True)


DEBUG_ENV = "XECOMLA_DEBUG"
DEBUG_HINT = f"re-run with {DEBUG_ENV}=1 (or --debug) for the traceback"


def main() -> None:
    """Console-script entry: one line per error, non-zero exit, traceback only with --debug or XECOMLA_DEBUG=1."""
    import click
    from typer.exceptions import TyperException

    _state["debug"] = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        code = app(standalone_mode=False)
    except XecomlaError as exc:
        _fail(exc, str(exc))
    except (click.exceptions.Abort, typer.Abort):
        console.err.print("aborted")
        sys.exit(130)
    except (click.ClickException, TyperException) as exc:
        if _state["debug"]:
            raise
        _usage_error(exc)
    except KeyboardInterrupt:
        console.err.print("interrupted")
        sys.exit(130)
    except OSError as exc:  # permissions, disk full, ... met outside the places that name the output
        _fail(exc, os_error_line(exc, type(exc).__name__))
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        _fail(exc, f"{type(exc).__name__}: {first_line(exc)} ({DEBUG_HINT})")
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(exc: BaseException, line: str) -> None:
    if _state["debug"]:
        raise exc
    _print_error(line)
    sys.exit(1)


def _usage_error(exc) -> None:
    """A parameter error, one line naming the option as Typer does ("Invalid value for '--kv-rank': ...")."""
    from typer._click.exceptions import NoArgsIsHelpError

    if isinstance(exc, NoArgsIsHelpError) or not hasattr(exc, "format_message"):
        exc.show()
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = " ".join(exc.format_message().split())
    _print_error(message + hint)
    sys.exit(exc.exit_code)
