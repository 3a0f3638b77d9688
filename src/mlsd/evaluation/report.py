"""The offline evaluation as one self-contained HTML page (tables + plots) and ``metrics.json``.

Plots are matplotlib PNGs embedded as data URIs, so the page is a single file that opens
anywhere (no server, no network). A few lines of script mark ``<body data-images-ok=N>`` at the
page's load event (images included), which the report's browser test reads.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from mlsd.evaluation.given_split import SPLITS
from mlsd.evaluation.offline import OfflineReport
from mlsd.evaluation.retrieval_report import PairedEstimate
from mlsd.evaluation.scoring import RELEVANT_MAP

METRICS = ("ndcg", "recall", "precision", "map")

TEMPLATE = "report.html.j2"

PUBLISHED_TEST_FRAC = 0.25
"""The published tables' test share (a 75/25 split): the only one they are shown beside."""

PUBLISHED = {
    "movielens-100k": {
        "source": "Microsoft Recommenders' ML-100K table (python_stratified_split 75/25, k = 10)",
        "test_frac": PUBLISHED_TEST_FRAC,
        "rows": {
            "BiVAE": {"map@10": 0.1461, "ndcg@10": 0.4751, "precision@10": 0.4118,
                      "recall@10": 0.2191},
            "BPR": {"ndcg@10": 0.4420},
        },
    }
}  # fmt: skip
"""Published numbers shown beside the random-per-user protocol, by dataset name, when the run's
test share is theirs. Their MAP divides by #relevant (mlsd's ``map_relevant@k``)."""

_RECBOLE = (
    "RecBole 1.2.1 on these exact files (CPU, default hyperparameters, early stopping on "
    "validation NDCG@10, fit on the train split only)"
)
PEER_SPLITS: dict[tuple[str, str, str], dict[str, Any]] = {
    (
        "78544dd085e532219b4fd30a1ee8be8d960eabd2b9b7f4a42253dcfa09d96cd4",
        "a0ab1165f1d46a2f9f7a15969faedea15c15fe05d3fca46ceaf90a1cec5b92c1",
        "cabcc042564b2df161ee442403055642d4155c8b2d4612fafbc487c1d06f7186",
    ): {
        "source": f"{_RECBOLE}: ML-100K, each user's ratings shuffled and split 8:1:1 (protocol A)",
        "rows": {
            "Pop": {"ndcg@10": 0.1005, "recall@10": 0.0838},
            "ItemKNN": {"ndcg@10": 0.2834, "recall@10": 0.2470},
            "BPR": {"ndcg@10": 0.2931, "recall@10": 0.2502},
            "EASE": {"ndcg@10": 0.3295, "recall@10": 0.2805},
            "LightGCN": {"ndcg@10": 0.3050, "recall@10": 0.2609},
            "MultiVAE": {"ndcg@10": 0.3001, "recall@10": 0.2598},
        },
    },
    (
        "74cdb41da78428ea687004f07ca29da9dbfcf443e74400e18142fa0208e5c036",
        "86e2b83bd2b14123b9745febe8db74cc66d997fd1c435dc5ff66693146bd034a",
        "ccdff097062f63c91a5a4110d0dbd1fff2f38b7f8d07a53397c8a1708982f764",
    ): {
        "source": f"{_RECBOLE}: ML-100K, each user's ratings by time, the last 10% test "
        "(protocol B)",
        "rows": {
            "Pop": {"ndcg@10": 0.0705, "recall@10": 0.0632},
            "ItemKNN": {"ndcg@10": 0.1136, "recall@10": 0.1089},
            "BPR": {"ndcg@10": 0.1146, "recall@10": 0.1053},
            "EASE": {"ndcg@10": 0.1272, "recall@10": 0.1208},
            "LightGCN": {"ndcg@10": 0.0910, "recall@10": 0.0861},
            "MultiVAE": {"ndcg@10": 0.0937, "recall@10": 0.0886},
        },
    },
}
"""A peer's figures on its own split files, by the files' SHA-256 (train, valid, test): shown
beside a ``splits`` run on exactly those files."""


def peer_numbers(cut_points: Mapping[str, str]) -> dict[str, Any] | None:
    """The peer's table measured on the split files of a ``splits`` run (``cut_points`` holds
    ``train_sha256``, ``valid_sha256``, ``test_sha256``), if one is known."""
    train, valid, test = (cut_points.get(f"{name}_sha256", "") for name in SPLITS)
    return PEER_SPLITS.get((train, valid, test))


def format_number(value: Any, digits: int = 3) -> str:
    """A float with ``digits`` decimals ("—" when not finite); anything else as ``str``."""
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(row: Any, segment: str, metric: str, *, ci: bool = False) -> str:
    estimate = row.metrics.get(segment, {}).get(metric)
    if estimate is None:
        return "—"
    text = format_number(estimate.mean, 4)
    return f"{text} [{estimate.low:.3f}, {estimate.high:.3f}]" if ci else text


def _paired_cell(estimate: PairedEstimate | None, part: str) -> str:
    """``part`` (``ratio`` or ``difference``) of a paired estimate with its interval."""
    if estimate is None:
        return "—"
    value, low, high = (getattr(estimate, f"{part}{end}") for end in ("", "_low", "_high"))
    if not math.isfinite(value):
        return "—"
    bounds = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{value:.3f}{bounds}"


def png_data_uri(figure: Figure) -> str:
    """The figure as a PNG ``data:`` URI for a self-contained HTML report; closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_vs_k(report: OfflineReport) -> str:
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for row in report.methods:
            values = [row.metrics["all"][f"{metric}@{k}"] for k in report.ks]
            ax.plot(
                report.ks,
                [v.mean if v else math.nan for v in values],
                marker="o",
                linewidth=2.5 if row.kind == "pipeline" else 1.2,
                label=row.name,
            )
        ax.set_xscale("log")
        ax.set_xticks(list(report.ks), [str(k) for k in report.ks])
        ax.set_title(f"{metric}@k")
        ax.set_xlabel("k")
    axes[0].legend(fontsize=7)
    return png_data_uri(figure)


def _plot_deciles(report: OfflineReport) -> str:
    figure, ax = plt.subplots(figsize=(8, 3.4))
    for row in report.methods:
        if row.kind == "ranker":
            continue
        buckets = list(row.deciles)
        ax.plot(buckets, list(row.deciles.values()), marker="o", label=row.name)
    ax.set_ylabel(f"ndcg@{report.ks[0]}")
    ax.set_xlabel("user activity bucket (d1 = least active warm users)")
    ax.legend(fontsize=7)
    return png_data_uri(figure)


def _plot_calibration(report: OfflineReport) -> str:
    curve = report.calibration["curve"]
    figure, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    keys = list(curve)
    ax.plot(curve[keys[0]], curve[keys[1]], marker="o", label="calibrated ranker")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.legend(fontsize=7)
    return png_data_uri(figure)


def render_html(report: OfflineReport) -> str:
    """The report page as one HTML string."""
    env = Environment(
        loader=PackageLoader("mlsd.evaluation", "templates"),
        autoescape=select_autoescape(default=True),
    )
    template = env.get_template(TEMPLATE)
    plots = {
        "vs_k": _plot_vs_k(report),
        "deciles": _plot_deciles(report),
        "calibration": _plot_calibration(report),
    }
    published, note = published_numbers(report)
    return template.render(
        r=report,
        plots=plots,
        metrics=METRICS,
        cell=_cell,
        paired=_paired_cell,
        fmt=format_number,
        draws=max((len(x.valid_auc_splits) for x in report.rankers), default=1),
        mean=statistics.fmean,
        sd=statistics.stdev,
        published=published,
        published_note=note,
        relevant_map=RELEVANT_MAP,
    )


def published_numbers(report: OfflineReport) -> tuple[dict[str, Any] | None, str | None]:
    """The published table to show beside ``report`` (random-per-user protocol on a dataset
    with one, at its test share; a peer's own split files), or ``None`` and, when a table
    exists but is not shown, the sentence saying why."""
    if report.protocol_name == "splits":
        published: dict[str, Any] | None = peer_numbers(report.cut_points)
    elif report.protocol_name == "random-per-user":
        published = PUBLISHED.get(report.dataset)
    else:
        return None, None
    if published is None:
        return None, None
    if report.min_value is not None:
        return None, (
            f"{published['source']} is not shown: it counts every test item as relevant, and "
            f"this run only those with value >= {report.min_value:g} ([retrieval] min_value), "
            "so the numbers are not comparable."
        )
    if report.protocol_name == "splits":
        return published, None
    frac = report.test_frac
    if frac is not None and math.isclose(frac, published["test_frac"]):
        return published, None
    share = "unknown" if frac is None else f"{frac:g}"
    return None, (
        f"{published['source']} is not shown: it was measured with a test share of "
        f"{published['test_frac']:g} and this run's is {share}, so the numbers are not "
        f"comparable; rerun with --test-frac {published['test_frac']:g} (the random-per-user "
        "default) to see them."
    )


def write_report(report: OfflineReport, out: Path) -> tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/report.html``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(report.to_dict(), indent=2))
    html_path = out / "report.html"
    html_path.write_text(render_html(report))
    return metrics_path, html_path
