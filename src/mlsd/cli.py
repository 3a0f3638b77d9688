"""The ``mlsd`` command: ``mlsd <group> <command>``. Parse, call, print; no logic here.

User errors (bad input files, bad options) print one line and exit 1, never a traceback;
``MLSD_DEBUG=1`` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
import typer
from rich.console import Console

from mlsd import __version__
from mlsd.data.commands import app as data_app
from mlsd.systems.feed.commands import app as feed_app

app = typer.Typer(
    name="mlsd",
    help="mlsd: the machine learning system design framework as running software.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(feed_app, name="feed")

err_console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print the mlsd version."""
    print(__version__)


def run(args: Sequence[str] | None = None) -> int:
    """Run the CLI on ``args`` and return its exit code (for tests and :func:`main`)."""
    try:
        result = app(args=list(args) if args is not None else None, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except (ValueError, OSError) as exc:
        # ContractError, LeakageError and config errors are ValueErrors written for people.
        if os.environ.get("MLSD_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    except Exception as exc:
        if os.environ.get("MLSD_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
            "(re-run with MLSD_DEBUG=1 for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
