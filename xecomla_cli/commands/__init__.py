"""The five commands, one thin module each; `cli.py` registers them on the Typer app."""
