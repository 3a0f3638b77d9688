"""``mlsd feed promote|rollback|alias|versions``: the champion model in the MLflow registry.

``promote`` gates on the versions' stored NDCG@10 (each on its own training data's validation
window), and refuses versions trained on different datasets or scored under different
evaluation settings; ``mlsd feed retrain`` gates head to head on the newest window instead.
``alias`` sets any other alias (an experiment's ``challenger``), without a gate.

Settings are :class:`~mlsd.serving.registry.RegistryConfig` defaults, with the tracking URI taken
from ``--registry-uri``, else the environment variable ``MLSD_TRACKING_URI``, else
``sqlite:///mlflow.db`` (relative paths resolve against ``--base-dir``, default the current
directory). These commands read an existing registry: where there is none (a wrong
``--base-dir``), they say so and exit 2, creating nothing; registering (``mlsd feed train
--register``, ``mlsd feed retrain``) creates one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mlsd.serving.registry import (
    ModelRegistry,
    Promotion,
    RegistryConfig,
    RegistryNotFoundError,
)
from mlsd.systems.feed.commands import app, console, err_console

RegistryUri = Annotated[
    str | None,
    typer.Option(
        "--registry-uri",
        envvar="MLSD_TRACKING_URI",
        help="MLflow tracking URI, e.g. http://mlflow:5000 (default: sqlite:///mlflow.db).",
    ),
]
BaseDir = Annotated[
    Path,
    typer.Option("--base-dir", help="Directory that relative registry paths resolve against."),
]


def open_registry(uri: str | None, base_dir: Path, *, must_exist: bool = False) -> ModelRegistry:
    """The registry at ``uri`` (default ``sqlite:///mlflow.db``) against ``base_dir``.

    ``must_exist``: raise :class:`~mlsd.serving.registry.RegistryNotFoundError` when its local
    store is missing, instead of letting MLflow create an empty one (for readers)."""
    config = RegistryConfig()
    if uri is not None:
        config = dataclasses.replace(config, tracking_uri=uri)
    registry = ModelRegistry(config, base_dir)
    return registry.require_existing() if must_exist else registry


def existing_registry(uri: str | None, base_dir: Path) -> ModelRegistry:
    """:func:`open_registry` for a command that reads it: a missing registry is bad input,
    printed as one line naming where it looked, exit 2 (and nothing is created)."""
    try:
        return open_registry(uri, base_dir, must_exist=True)
    except RegistryNotFoundError as exc:
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from exc


@app.command("promote")
def promote(
    version: Annotated[int, typer.Option("--version", help="Model version to promote.")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the gate refuses it.")
    ] = False,
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
) -> None:
    """Make a version the champion if its gate metric is no worse than the champion's.

    Compares the stored values: each version's NDCG@10 on the validation window of its own
    training data. That is a fair test only while the data has not moved; after a drift the
    champion's value describes the old world, and ``mlsd feed retrain`` (which scores both
    models head to head on the new data's window) is the command to gate with. So the gate
    refuses (``--force`` overrides, and says so) when the two versions were trained on
    different datasets (``dataset_hash`` tags) or scored under different evaluation settings
    (``mlsd.protocol.*`` tags).
    """
    registry = existing_registry(registry_uri, base_dir)
    report_promotion(registry.promote(version, force=force), "--force overrides")


def report_promotion(result: Promotion, override: str) -> None:
    """Print the gate's verdict on ``result``; exit 1 when it refused the version.

    ``override`` ends the refusal line: how to promote anyway (e.g. ``--force overrides``).
    """
    version = result.version
    if result.forced:
        console.print(
            f"[yellow]accepted (forced)[/]: version {version} is the champion; "
            f"the gate was overridden ({escape(result.reason)})"
        )
    elif result.accepted:
        console.print(
            f"[green]accepted[/]: version {version} is the champion ({escape(result.reason)})"
        )
    else:
        console.print(
            f"[red]refused[/]: version {version} stays out; champion remains "
            f"v{result.previous_champion} ({escape(result.reason)}); {override}"
        )
        raise typer.Exit(1)


@app.command("alias")
def alias(
    name: Annotated[
        str, typer.Option("--name", help="The alias to set, e.g. challenger (not champion).")
    ],
    version: Annotated[int, typer.Option("--version", help="Model version it points at.")],
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
) -> None:
    """Point an alias other than the champion at a version (e.g. an experiment's challenger
    arm). The champion moves only through the gate: ``mlsd feed promote``."""
    registry = existing_registry(registry_uri, base_dir)
    before = registry.alias_version(name)
    registry.set_alias(name, version)
    was = "" if before is None or before == version else f" (was v{before})"
    console.print(f"alias {name!r} -> version {version}{was}", highlight=False)


@app.command("rollback")
def rollback(registry_uri: RegistryUri = None, base_dir: BaseDir = Path()) -> None:
    """Move the champion alias back to the previous champion."""
    registry = existing_registry(registry_uri, base_dir)
    current = registry.champion()
    previous = registry.rollback()
    console.print(f"champion rolled back: v{current} -> v{previous}")


@app.command("versions")
def versions(registry_uri: RegistryUri = None, base_dir: BaseDir = Path()) -> None:
    """List the registered versions with their gate metric and aliases."""
    registry = existing_registry(registry_uri, base_dir)
    infos = registry.versions()
    name, where = registry.config.model_name, registry.tracking_uri
    if not infos:
        console.print(f"no versions of {name!r} in {where}")
        return
    table = Table(title=f"{name} in {where}", title_justify="left")
    for column in ("version", registry.config.gate_metric, "aliases", "created (UTC)"):
        table.add_column(column, justify="right" if column != "aliases" else "left")
    for info in infos:
        value = "" if info.gate_value is None else f"{info.gate_value:.4f}"
        created = info.created.strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(info.version), value, ", ".join(info.aliases), created)
    console.print(table)
