"""The `tunelab` command line: one short function per command, no logic of its own.

Each command parses its options, calls a library function and prints the result. User
errors (`TunelabError`) are printed as one message without a traceback (exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tunelab.errors import TunelabError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="tunelab",
    help="Fine-tune language models on your own data: LoRA, DoRA, QLoRA or full fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate and show run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Validate, inspect, prepare and synthesise training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one clean message."""
    try:
        app(standalone_mode=False)
    except TunelabError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]aborted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
