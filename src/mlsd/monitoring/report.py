"""The monitoring run as one self-contained HTML page (drift table, plots, alerts) and JSON.

Plots are matplotlib PNGs embedded as data URIs by the offline report's helper
(:mod:`mlsd.evaluation.report`), so the page is a single file that opens anywhere. It shows
the alerts first (what fired and why), then the drift table sorted by PSI (with each
feature's live missing share, and why drift was not judged when the window had too few
requests), the reference vs live histograms of the most drifted features (the bins PSI is
computed on, the ``missing`` one included, so what you see is what was measured), and the
prediction's distribution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from mlsd.evaluation.report import format_number, png_data_uri
from mlsd.monitoring.drift import FeatureDrift
from mlsd.monitoring.monitor import MonitorResult

TEMPLATE = "monitor.html.j2"
N_PLOTTED = 6
"""Histograms drawn for the most drifted features."""


def plot_histogram(row: FeatureDrift) -> str:
    """Reference vs live share of each bin of one feature, as a PNG data URI."""
    figure, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(row.bins) + 1.5), 3.0))
    x = np.arange(len(row.bins))
    ax.bar(x - 0.2, row.reference_shares, width=0.4, label="reference", color="#8aa")
    ax.bar(x + 0.2, row.live_shares, width=0.4, label="live", color="#d64")
    ax.set_xticks(x, row.bins, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of rows")
    ax.set_title(f"{row.name}: PSI {format_number(row.psi)}", fontsize=9)
    ax.legend(fontsize=7)
    return png_data_uri(figure)


def has_live_rows(row: FeatureDrift) -> bool:
    """Whether the window had rows for ``row``, finite or missing (a histogram to draw)."""
    return sum(row.live_shares) > 0


def render_html(result: MonitorResult) -> str:
    """The report page as one HTML string."""
    env = Environment(
        loader=PackageLoader("mlsd.monitoring", "templates"),
        autoescape=select_autoescape(default=True),
    )
    drift = result.drift
    ranked = drift.ranked() if drift is not None else []
    plots = [(row.name, plot_histogram(row)) for row in ranked[:N_PLOTTED] if has_live_rows(row)]
    prediction = None
    if drift is not None and drift.prediction is not None and has_live_rows(drift.prediction):
        prediction = plot_histogram(drift.prediction)
    return env.get_template(TEMPLATE).render(
        r=result, ranked=ranked, plots=plots, prediction_plot=prediction, fmt=format_number
    )


def write_report(
    result: MonitorResult, out_dir: Path, *, document: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``out_dir/monitor.json`` (``document``, by default ``result.to_dict()``; the CLI
    adds notes to it) and ``out_dir/monitor.html``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "monitor.json"
    json_path.write_text(json.dumps(result.to_dict() if document is None else document, indent=2))
    html_path = out / "monitor.html"
    html_path.write_text(render_html(result))
    return json_path, html_path
