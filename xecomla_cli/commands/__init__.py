"""Commands of the later stages, each in its own module, registered on the Typer app."""

from __future__ import annotations

import importlib

# (module, function, command name); each module holds one thin command function.
COMMANDS: list[tuple[str, str, str]] = [
    ("eval_cmd", "eval_command", "eval"),
    ("distill_cmd", "distill_command", "distill"),
    ("export_cmd", "export_command", "export"),
]


def register_all(app) -> None:
    for module, func, name in COMMANDS:
        app.command(name)(getattr(importlib.import_module(f"{__name__}.{module}"), func))
