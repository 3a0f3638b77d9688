"""``mlsd feed retrain``: train → evaluate → gated promotion → reload, the closed loop's last step.

One command a scheduler (or an alert handler) runs when the data has moved on::

    mlsd feed retrain --dataset data/world --config configs/feed-demo.toml --base-dir run \\
        --materialize --reload-url http://127.0.0.1:8000

Steps, each printed as it runs:

1. **features** (``--materialize``): load the online store with the dataset's features as of its
   last event, so the service reads fresh user and item features (the Feast repository is
   generated and applied first only when the dataset has none yet; re-applying it under a
   running service is not needed to refresh values).
2. **train**: :func:`mlsd.systems.feed.package.package_model`, the same function
   ``mlsd feed train`` calls, writes a new model directory (``--out``, default
   ``<base-dir>/models/retrain-<UTC time>``).
3. **evaluate + register**: the chosen ranker's held-out NDCG@10 (the last label window of the
   temporal protocol) is logged with the model in the MLflow registry
   (:func:`mlsd.systems.feed.ranking.register_model`).
4. **gate**, head to head: the champion is downloaded from the registry and both rankers score
   the *same* rows, the new model's held-out users of its last label window (the newest data),
   with the same metric (:func:`head_to_head`); :meth:`ModelRegistry.promote
   <mlsd.serving.registry.ModelRegistry.promote>` makes the new version the champion only if
   its NDCG@10 there is no worse than the champion's (within the registry's tolerance), and
   records both values on the version (tag ``mlsd.head_to_head``). ``--force`` overrides a
   refusal, as ``mlsd feed promote --force`` does. Why not the stored values: each version's
   stored NDCG@10 is measured on the validation window of its own training data, so after a
   drift the champion's describes a world that no longer exists. What the head-to-head holds
   fixed is the candidate rows (the new model's candidate sources as of the window's start),
   so it compares the rankers; a champion trained on part of that window (its
   ``trained_until`` after the window's start) would be favoured, which the reason line says.
5. **reload** (``--reload-url``): ``POST <url>/admin/reload`` with ``Authorization: Bearer
   $MLSD_ADMIN_TOKEN``; a service started with ``--registry`` (the default) swaps the new
   champion in without a restart. Skipped when the gate refused.

Exit codes: 0 the new version is the champion (and the service reloaded it, if asked); 1 the
gate refused it (the champion and the service are unchanged; the version stays registered);
2 the reload failed or could not be attempted (no token, service unreachable, a 4xx/5xx).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import pandas as pd
import typer
from rich.markup import escape

from mlsd.config import FeedConfig
from mlsd.serving.registry import HeadToHead, ModelRegistry
from mlsd.systems.feed.commands import ConfigFile, DatasetDir, app, console, load_config
from mlsd.systems.feed.registry_commands import (
    BaseDir,
    RegistryUri,
    open_registry,
    report_promotion,
)

if TYPE_CHECKING:
    from mlsd.evaluation.offline import TrainedRankers
    from mlsd.models.ranking.base import FloatArray, IntArray
    from mlsd.models.ranking.bundle import RankingBundle

ADMIN_TOKEN_ENV = "MLSD_ADMIN_TOKEN"
EXIT_RELOAD_FAILED = 2


class ReloadError(RuntimeError):
    """``POST /admin/reload`` could not be made or did not succeed; the message says why."""


@dataclass(frozen=True)
class Reloaded:
    """What ``/admin/reload`` answered: the version served before and after."""

    old_version: str | None
    new_version: str


@app.command("retrain")
def retrain(
    dataset: DatasetDir,
    config: ConfigFile = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Model directory to write (default: BASE/models/retrain-…)."),
    ] = None,
    materialize: Annotated[
        bool,
        typer.Option("--materialize", help="Load the online store from the dataset first."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the gate refuses the new version.")
    ] = False,
    reload_url: Annotated[
        str | None,
        typer.Option(
            "--reload-url",
            help="Base URL of a running service to reload (POST /admin/reload, bearer token "
            f"from ${ADMIN_TOKEN_ENV}).",
        ),
    ] = None,
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
) -> None:
    """Retrain on the dataset, register, promote through the quality gate, reload the service.

    Exits 0 when promoted (and reloaded), 1 when the gate refuses, 2 when the reload fails.
    """
    from mlsd.models.ranking.bundle import RankingBundle
    from mlsd.systems.feed.package import check_model_out, package_model
    from mlsd.systems.feed.ranking import register_model, scores_table

    feed = load_config(config)
    if reload_url is not None and not os.environ.get(ADMIN_TOKEN_ENV):
        # Checked before minutes of training, not after.
        raise ValueError(
            f"--reload-url needs the service's admin token in ${ADMIN_TOKEN_ENV}; export it "
            "(the value the service was started with) or drop --reload-url"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    model_dir = out if out is not None else base_dir / "models" / f"retrain-{stamp}"
    check_model_out(model_dir, dataset)  # also before materializing and training
    if materialize:
        console.rule("[bold]1/5 features")
        refresh_features(dataset, config, feed)
    console.rule("[bold]2/5 train")
    path, trained = package_model(dataset, model_dir, feed, progress=True)
    console.print(f"model written to {path}")
    console.rule("[bold]3/5 evaluate + register")
    console.print(scores_table(trained))
    registry = open_registry(registry_uri, base_dir)
    version = register_model(path, trained, registry)
    console.print(f"registered as version {version} in {registry.tracking_uri}")
    console.rule("[bold]4/5 gate")
    try:
        comparison = head_to_head(registry, trained, RankingBundle.load(path / "ranking"))
    except ValueError as exc:
        if not force:
            raise
        console.print(f"[yellow]no head-to-head[/] ({escape(str(exc))}); --force promotes")
        comparison = None
    if comparison is not None:
        console.print(
            f"head to head on {escape(comparison.data)}: {registry.config.gate_metric} "
            f"v{version} {comparison.candidate_value:.4f} vs champion "
            f"v{comparison.champion_version} {comparison.champion_value:.4f}"
        )
    result = registry.promote(version, force=force, head_to_head=comparison)
    report_promotion(result, "--force overrides")  # exits 1 on a refusal
    if reload_url is None:
        console.print("no --reload-url: a running service picks it up on POST /admin/reload")
        return
    console.rule("[bold]5/5 reload")
    try:
        reloaded = reload_service(reload_url, os.environ[ADMIN_TOKEN_ENV])
    except ReloadError as exc:
        console.print(f"[red]reload failed[/]: {escape(str(exc))}")
        raise typer.Exit(EXIT_RELOAD_FAILED) from exc
    console.print(
        f"[green]reloaded[/] {reload_url}: {reloaded.old_version} -> {reloaded.new_version}"
    )


def _ndcg_at_10(labels: FloatArray, scores: FloatArray, groups: IntArray) -> float:
    from mlsd.evaluation.scoring import group_ndcg

    return group_ndcg(labels, scores, groups, k=10)


GATE_SCORERS: dict[str, Callable[[FloatArray, FloatArray, IntArray], float]] = {
    "ndcg@10": _ndcg_at_10,
}
"""Gate metric → how to compute it on held-out rows (labels, ranker scores, user groups), the
way training scores its rankers (:func:`mlsd.evaluation.offline.train_pipeline`)."""


def head_to_head(
    registry: ModelRegistry, trained: TrainedRankers, candidate: RankingBundle
) -> HeadToHead | None:
    """The champion's ranker and ``candidate`` scored on ``trained``'s held-out rows.

    ``trained`` is the candidate's training (:func:`~mlsd.systems.feed.package.package_model`):
    its held-out users of the last label window, with their candidates, features as of the
    window's start and clicks in the window. Each ranker reads the rows through its own
    layout and vocabulary; the gate metric is computed the same way for both. ``None`` when
    there is no champion.

    Raises:
        ValueError: the gate metric has no scorer here, there are no held-out rows, or the
            champion reads a column the rows lack (another set of candidate sources).
    """
    from mlsd.models.ranking.bundle import RankingBundle
    from mlsd.models.ranking.candidates import ranker_frame

    champion = registry.champion()
    if champion is None:
        return None
    metric = registry.config.gate_metric
    if metric not in GATE_SCORERS:
        raise ValueError(f"no head-to-head scorer for the gate metric {metric!r}; "
                         f"known: {sorted(GATE_SCORERS)}")  # fmt: skip
    # the last label window's held-out users only, as the registered value (register_model)
    pairs, valid = trained.gate_rows()
    with tempfile.TemporaryDirectory(prefix="mlsd-champion-") as tmp:
        model_dir = registry.download(champion, Path(tmp) / "champion")
        incumbent = RankingBundle.load(model_dir / "ranking")
        trained_until = json.loads((model_dir / "model.json").read_text()).get("trained_until")
    score = GATE_SCORERS[metric]
    values = []
    for bundle in (candidate, incumbent):
        missing = [c for c in bundle.layout.numeric + bundle.layout.categorical
                   if c not in pairs.columns and not c.startswith("affinity_mean_")]  # fmt: skip
        if missing:
            raise ValueError(
                f"the champion v{champion} reads columns the new rows lack ({missing[:5]}): "
                "its candidate sources differ, so the rankers cannot score the same rows; "
                "--force promotes without the gate"
            )
        features, _ = ranker_frame(pairs, bundle.layout, bundle.vocabulary, bundle.feature_config)
        values.append(score(valid.label, bundle.ranker.predict(features), valid.groups))
    start = trained.validation.train.cutoff
    end = candidate.metadata.get("label_window", [None, None])[1]
    data = f"the new model's held-out users of [{start.isoformat()}, {end})"
    if trained_until is not None and pd.Timestamp(trained_until) > start:
        data += f" (the champion trained until {trained_until}, on part of it)"
    return HeadToHead(champion, values[0], values[1], data)


def refresh_features(dataset: Path, config: Path | None, feed: FeedConfig) -> None:
    """Materialize the dataset's features as of its last event (apply the repo if it is new)."""
    from mlsd.features.store import STORE_YAML
    from mlsd.systems.feed.commands import features_apply, features_materialize

    if not (feed.feature_store.repo_path(dataset) / STORE_YAML).is_file():
        features_apply(dataset=dataset, config=config, repo=None, online_store=None)
    features_materialize(dataset=dataset, config=config, repo=None, as_of=None, online_store=None)


def reload_service(base_url: str, token: str, *, timeout_s: float = 300.0) -> Reloaded:
    """``POST <base_url>/admin/reload`` with the bearer ``token``; the versions before and after.

    The timeout is generous: the service downloads, verifies and warms up the model in the call.

    Raises:
        ReloadError: the service is unreachable or answered anything but 200.
    """
    import httpx

    url = base_url.rstrip("/") + "/admin/reload"
    try:
        response = httpx.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ReloadError(f"POST {url}: {type(exc).__name__}: {exc}; is the service up?") from exc
    if response.status_code != 200:
        raise ReloadError(f"POST {url} answered {response.status_code}: {response.text[:500]}")
    body = response.json()
    return Reloaded(old_version=body.get("old_version"), new_version=str(body["new_version"]))
