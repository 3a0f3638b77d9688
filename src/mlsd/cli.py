"""The ``mlsd`` command: ``mlsd <group> <command>``. Parse, call, print; no logic here.

User errors (bad input files, bad values) print one line and exit 1, never a traceback; a
usage mistake (an unknown or missing option) prints the usage and exits 2; ``MLSD_DEBUG=1``
shows the traceback of an unexpected error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
import typer
from rich.console import Console
from rich.markup import escape

from mlsd import HELP_MARKUP, __version__
from mlsd.data.commands import app as data_app
from mlsd.plan.commands import app as plan_app
from mlsd.serving.registry import quiet_mlflow_warnings
from mlsd.systems.feed.commands import app as feed_app

app = typer.Typer(
    rich_markup_mode=HELP_MARKUP,
    name="mlsd",
    help="mlsd: the machine learning system design framework as running software.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(plan_app, name="plan")
app.add_typer(data_app, name="data")
app.add_typer(feed_app, name="feed")

err_console = Console(stderr=True)


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception class ``name``, and the one of the copy of click that recent Typer
    releases bundle (``typer._click``), whose usage errors (an unknown option, a missing one)
    are not click's own classes."""
    modules: list[object] = [click.exceptions]
    try:
        from typer._click import exceptions as bundled  # Typer >= 0.20
    except ImportError:  # an older Typer uses click itself
        pass
    else:
        modules.append(bundled)
    return tuple(getattr(m, name) for m in modules if isinstance(getattr(m, name, None), type))


_EXIT = _click_exceptions("Exit")
_CLICK_ERROR = _click_exceptions("ClickException")
_ABORT = _click_exceptions("Abort")


@app.command()
def version() -> None:
    """Print the mlsd version."""
    print(__version__)


def run(args: Sequence[str] | None = None) -> int:
    """Run the CLI on ``args`` and return its exit code (for tests and :func:`main`)."""
    quiet_mlflow_warnings()  # one known third-party warning; every other warning still shows
    try:
        result = app(
            args=list(args) if args is not None else None, prog_name="mlsd", standalone_mode=False
        )
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 1))
    except _CLICK_ERROR as exc:  # a usage error: the usage, the message, exit 2
        getattr(exc, "show")()  # noqa: B009 (the two click copies share this method)
        return int(getattr(exc, "exit_code", 2))
    except _ABORT:
        err_console.print("aborted")
        return 130
    except (ValueError, OSError) as exc:
        # ContractError, LeakageError and config errors are ValueErrors written for people.
        if os.environ.get("MLSD_DEBUG"):
            raise
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        return 1
    except Exception as exc:
        if os.environ.get("MLSD_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(re-run with MLSD_DEBUG=1 for the traceback, and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
