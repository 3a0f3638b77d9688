"""``mlsd feed train`` and ``mlsd feed evaluate``: the ranking stage and the whole-pipeline report.

Thin commands: read the config, build the sources and rankers it names, call
:func:`mlsd.evaluation.offline.train_pipeline` / :func:`~mlsd.evaluation.offline.evaluate_pipeline`,
print a summary, write the artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast, get_args

import typer
from rich.table import Table

from mlsd.serving.registry import DATASET_TAG, PROTOCOL_TAG_PREFIX
from mlsd.systems.feed.commands import ConfigFile, DatasetDir, app, console, load_config
from mlsd.systems.feed.registry_commands import (
    BaseDir,
    RegistryUri,
    open_registry,
    report_promotion,
)

if TYPE_CHECKING:
    from mlsd.evaluation.offline import OfflineReport, RankerScores, TrainedRankers
    from mlsd.evaluation.retrieval import ProtocolConfig
    from mlsd.serving.registry import ModelRegistry

ProtocolName = Literal["temporal", "random-per-user", "splits", "leave-last-out"]


@app.command("train")
def train(
    dataset: DatasetDir,
    out: Annotated[Path, typer.Option("--out", help="The model directory to write.")],
    config: ConfigFile = None,
    register: Annotated[
        bool, typer.Option("--register", help="Log the model to the MLflow registry.")
    ] = False,
    promote: Annotated[
        bool,
        typer.Option("--promote", help="With --register: promote it if the gate accepts it."),
    ] = False,
    registry_uri: RegistryUri = None,
    base_dir: BaseDir = Path(),
) -> None:
    """Steps 4-6: train the feed on all the data; write the model directory serving loads.

    With ``--register --promote``, exits 1 when the gate refuses the new version (it stays
    registered; ``mlsd feed promote --version N --force`` overrides), like ``mlsd feed promote``.
    """
    from mlsd.systems.feed.package import package_model

    feed = load_config(config)
    path, trained = package_model(dataset, out, feed, progress=True)
    console.print(scores_table(trained))
    console.print(f"model written to {path}")
    if register:
        version = register_model(path, trained, open_registry(registry_uri, base_dir))
        console.print(f"registered as version {version}")
        if promote:
            result = open_registry(registry_uri, base_dir).promote(version)
            override = f"`mlsd feed promote --version {version} --force` overrides"
            report_promotion(result, override)  # exits 1 on a refusal, as `feed promote` does
        else:
            console.print(f"promote it with: mlsd feed promote --version {version}")


def scores_table(trained: TrainedRankers) -> Table:
    """Each ranker's held-out scores (the chosen one marked): the offline evaluation of a run."""
    from mlsd.evaluation.report import format_number

    table = Table(title="rankers on held-out users of the label windows", title_justify="left")
    for column in ("ranker", "ndcg@10", "AUC", "grouped AUC", "log loss", "fit s"):
        table.add_column(column, justify="left" if column == "ranker" else "right")
    for score in trained.scores:
        mark = " (chosen)" if score.name == trained.chosen else ""
        table.add_row(
            score.name + mark,
            format_number(score.valid_ndcg, 4),
            format_number(score.valid_auc, 4),
            format_number(score.valid_grouped_auc, 4),
            format_number(score.valid_log_loss, 4),  # "—" for a score that is no probability
            format_number(score.fit_seconds, 2),
        )
    return table


def register_model(path: Path, trained: TrainedRankers, registry: ModelRegistry) -> int:
    """Log a packaged model directory with its chosen ranker's held-out scores; return the version.

    The gate metric (``ndcg@10``) is the chosen ranker's NDCG@10 on the held-out users of the
    last label window only (:meth:`~mlsd.evaluation.offline.TrainedRankers.gate_rows`; the
    scores table covers the held-out users of every window), which is what
    :meth:`ModelRegistry.promote` compares with the champion's; ``auc`` is of the same rows.
    """
    from mlsd.evaluation.offline import gate_scores

    return register_scores(path, gate_scores(trained), registry)


def register_scores(path: Path, chosen: RankerScores, registry: ModelRegistry) -> int:
    """:func:`register_model` given the gate's scores of the chosen ranker (``chosen``)."""
    meta = json.loads((path / "model.json").read_text())
    settings = {name: str(value) for name, value in meta.get("evaluation", {}).items()}
    return registry.register(
        path,
        params={
            "ranker": chosen.name,
            "sources": ",".join(meta["sources"]),
            "n_candidates": meta["n_candidates"],
            "dataset": meta["dataset"]["name"],
            **{f"protocol.{name}": value for name, value in settings.items()},
        },
        metrics={"ndcg@10": chosen.valid_ndcg, "auc": chosen.valid_auc},
        tags={
            "model_version": meta["version"],
            DATASET_TAG: meta["dataset"]["content_hash"],
            **{PROTOCOL_TAG_PREFIX + name: value for name, value in settings.items()},
        },
    )


@app.command("evaluate")
def evaluate(
    dataset: DatasetDir,
    out: Annotated[Path, typer.Option("--out", help="Directory for metrics.json + report.html.")],
    config: ConfigFile = None,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="temporal (default, DESIGN.md); random-per-user, leave-last-out or splits, "
            "only to compare with published numbers (splits reads a peer's split files, "
            "--splits).",
        ),
    ] = "temporal",
    splits: Annotated[
        Path | None,
        typer.Option(
            "--splits",
            help="With --protocol splits: the split files' common prefix, e.g. "
            "DIR/protoA for DIR/protoA_train.tsv, DIR/protoA_valid.tsv and DIR/protoA_test.tsv "
            "(user and item columns, the dataset's ids).",
        ),
    ] = None,
    test_frac: Annotated[
        float | None,
        typer.Option(
            "--test-frac",
            help="Override the test share (default: [retrieval].test_frac for temporal, 0.25 "
            "for random-per-user, the published tables' 75/25 split).",
        ),
    ] = None,
) -> None:
    """Step 5: the whole pipeline next to its baselines under one protocol; writes
    OUT/metrics.json and OUT/report.html."""
    from mlsd.evaluation.offline import evaluate_pipeline
    from mlsd.evaluation.report import write_report
    from mlsd.features.batch import feature_config_for

    if protocol not in get_args(ProtocolName):
        raise ValueError(
            f"--protocol {protocol!r}: use temporal, random-per-user, leave-last-out or splits"
        )
    if (protocol == "splits") != (splits is not None):
        raise ValueError("--splits PREFIX goes with --protocol splits, and only with it")
    if protocol in ("splits", "leave-last-out") and test_frac is not None:
        raise ValueError(f"--test-frac does not apply to --protocol {protocol}: it fixes the split")
    feed = load_config(config)
    settings = evaluation_protocol(feed.retrieval.protocol, protocol, test_frac)
    report = evaluate_pipeline(
        dataset,
        feed.retrieval.factories(),
        feed.ranking.factories(),
        protocol=settings,
        pipeline=feed.ranking.pipeline(feed.retrieval.merge),
        feature_config=feature_config_for(dataset, **vars(feed.features)),
        protocol_name=cast(ProtocolName, protocol),
        splits=splits,
        progress=True,
    )
    console.print(summary_table(report))
    metrics_path, html_path = write_report(report, out)
    console.print(f"metrics: {metrics_path}\nreport:  {html_path}")


def evaluation_protocol(
    settings: ProtocolConfig, protocol: str, test_frac: float | None
) -> ProtocolConfig:
    """``settings`` with the test share ``evaluate`` uses: ``test_frac`` when given, else the
    configured one for the temporal protocol and :data:`RANDOM_TEST_FRAC` (0.25, the published
    tables' 75/25 split) for random-per-user, whose only use is that comparison."""
    from mlsd.evaluation.offline import RANDOM_TEST_FRAC

    if test_frac is None and protocol == "random-per-user":
        test_frac = RANDOM_TEST_FRAC
    if test_frac is None:
        return settings
    return dataclasses.replace(settings, test_frac=test_frac)


def summary_table(report: OfflineReport) -> Table:
    """Every method at the smallest and largest k over all users, with the headline interval."""
    small, large = report.ks[0], report.ks[-1]
    title = (
        f"{report.dataset}, {report.protocol_name} protocol, {report.counts['n_test_users']:,} "
        f"test users: mean [95% bootstrap interval]"
    )
    table = Table(title=title, title_justify="left")
    columns = [f"ndcg@{small}", f"recall@{small}", f"map@{small}", f"recall@{large}"]
    for column in ("method", "kind", *columns, f"warm ndcg@{small}", f"cold ndcg@{small}"):
        table.add_column(column, justify="left" if column in ("method", "kind") else "right")
    for method in report.methods:
        cells = []
        for i, column in enumerate(columns):
            estimate = method.metrics["all"][column]
            if estimate is None:
                cells.append("-")
            elif i == 0:
                cells.append(f"{estimate.mean:.4f} [{estimate.low:.3f}, {estimate.high:.3f}]")
            else:
                cells.append(f"{estimate.mean:.4f}")
        for segment in ("warm", "cold"):
            estimate = method.metrics[segment][f"ndcg@{small}"]
            cells.append("-" if estimate is None else f"{estimate.mean:.4f}")
        table.add_row(method.name, method.kind, *cells)
    return table
