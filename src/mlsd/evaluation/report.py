"""The offline evaluation as one self-contained HTML page (tables + plots) and ``metrics.json``.

Plots are matplotlib PNGs embedded as data URIs, so the page is a single file that opens
anywhere (no server, no network). A few lines of script mark ``<body data-images-ok=N>`` once
the images have decoded, which the report's browser test reads.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, select_autoescape  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mlsd.evaluation.offline import OfflineReport  # noqa: E402

METRICS = ("ndcg", "recall", "precision", "map")

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mlsd offline evaluation — {{ r.dataset }} ({{ r.protocol_name }})</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.pipeline td { font-weight: bold; background: #eef6ff; }
.protocol { background: #f6f6f6; padding: 0.75rem 1rem; border-left: 4px solid #888; }
img { max-width: 100%; }
.small { color: #666; font-size: 0.8rem; }
</style></head>
<body data-images-ok="0">
<h1>Offline evaluation: {{ r.dataset }}</h1>
<h2>Protocol: {{ r.protocol_name }}</h2>
<p class="protocol">{{ r.protocol }}</p>
<p class="small">{% for k, v in r.cut_points.items() %}{{ k }} = {{ v }}; {% endfor %}
{% for k, v in r.counts.items() %}{{ k }} = {{ v }}; {% endfor %}</p>

<h2>All methods, all test users</h2>
<table id="methods"><tr><th>method</th><th>kind</th>
{% for m in metrics %}{% for k in r.ks %}<th>{{ m }}@{{ k }}</th>{% endfor %}{% endfor %}</tr>
{% for row in r.methods %}<tr class="{{ row.kind }}"><td>{{ row.name }}</td><td>{{ row.kind }}</td>
{% for m in metrics %}{% for k in r.ks %}<td>{{ cell(row, "all", m ~ "@" ~ k, ci=(m == "ndcg" and k == r.ks[0])) }}</td>{% endfor %}{% endfor %}</tr>
{% endfor %}</table>

<h2>Metrics vs k</h2>
<img alt="metrics vs k" src="{{ plots.vs_k }}">

<h2>Warm and cold users</h2>
<table id="segments"><tr><th>method</th>{% for s in ("all", "warm", "cold") %}
<th>ndcg@{{ r.ks[0] }} {{ s }}</th><th>recall@{{ r.ks[-1] }} {{ s }}</th>{% endfor %}</tr>
{% for row in r.methods %}<tr class="{{ row.kind }}"><td>{{ row.name }}</td>
{% for s in ("all", "warm", "cold") %}<td>{{ cell(row, s, "ndcg@" ~ r.ks[0], ci=True) }}</td>
<td>{{ cell(row, s, "recall@" ~ r.ks[-1]) }}</td>{% endfor %}</tr>{% endfor %}</table>

<h2>By user activity (events before the cutoff; cold users apart)</h2>
<img alt="ndcg by activity decile" src="{{ plots.deciles }}">

<h2>Rankers on their held-out users</h2>
<table id="rankers"><tr><th>ranker</th><th>NDCG@10</th><th>AUC</th><th>grouped AUC</th><th>log loss</th>
<th>fit s</th><th>predict s / 1k rows</th></tr>
{% for x in r.rankers %}<tr><td>{{ x.name }}</td><td>{{ fmt(x.valid_ndcg) }}</td><td>{{ fmt(x.valid_auc) }}</td>
<td>{{ fmt(x.valid_grouped_auc) }}</td><td>{{ fmt(x.valid_log_loss) }}</td>
<td>{{ fmt(x.fit_seconds, 2) }}</td><td>{{ fmt(x.predict_seconds_per_1k, 5) }}</td></tr>{% endfor %}
</table>

<h2>Calibration of the pipeline's ranker (test candidates)</h2>
<p>Expected calibration error after calibration: {{ fmt(r.calibration.ece_calibrated, 4) }}
(base rate {{ fmt(r.calibration.base_rate, 4) }}, {{ r.calibration.n }} candidates).</p>
<img alt="calibration curve" src="{{ plots.calibration }}">

<h2>Re-ranking: what each stage costs and gains</h2>
<table id="rerank"><tr>{% for key in r.rerank[0].keys() %}<th>{{ key }}</th>{% endfor %}</tr>
{% for v in r.rerank %}<tr>{% for value in v.values() %}<td>{{ fmt(value) }}</td>{% endfor %}</tr>{% endfor %}
</table>

<h2>Beyond accuracy</h2>
<table id="beyond"><tr><th>method</th>{% for key in r.methods[0].beyond.keys() %}<th>{{ key }}</th>{% endfor %}</tr>
{% for row in r.methods %}<tr class="{{ row.kind }}"><td>{{ row.name }}</td>{% for v in row.beyond.values() %}<td>{{ fmt(v) }}</td>{% endfor %}</tr>{% endfor %}
</table>

{% if r.feature_importance %}<h2>Feature importance (pipeline ranker, gain)</h2>
<table id="importance"><tr><th>feature</th><th>gain share</th></tr>
{% for name, value in r.feature_importance.items() %}<tr><td>{{ name }}</td><td>{{ fmt(value) }}</td></tr>{% endfor %}
</table>{% endif %}

<h2>Merge quotas</h2>
<p>{% for name, q in r.quotas.items() %}{{ name }} = {{ q }}; {% endfor %}</p>

<h2>Time per stage (seconds)</h2>
<table id="timings"><tr><th>stage</th><th>seconds</th></tr>
{% for name, s in r.timings.items() %}<tr><td>{{ name }}</td><td>{{ fmt(s, 2) }}</td></tr>{% endfor %}
</table>
<script>
Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth > 0, () => false)))
  .then(ok => { document.body.dataset.imagesOk = String(ok.filter(Boolean).length); });
</script>
</body></html>
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(row: Any, segment: str, metric: str, *, ci: bool = False) -> str:
    estimate = row.metrics.get(segment, {}).get(metric)
    if estimate is None:
        return "—"
    text = _fmt(estimate.mean, 4)
    return f"{text} [{estimate.low:.3f}, {estimate.high:.3f}]" if ci else text


def _png(figure: Figure) -> str:
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
    return _png(figure)


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
    return _png(figure)


def _plot_calibration(report: OfflineReport) -> str:
    curve = report.calibration["curve"]
    figure, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    keys = list(curve)
    ax.plot(curve[keys[0]], curve[keys[1]], marker="o", label="calibrated ranker")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.legend(fontsize=7)
    return _png(figure)


def render_html(report: OfflineReport) -> str:
    """The report page as one HTML string."""
    env = Environment(autoescape=select_autoescape(default=True))
    template = env.from_string(_TEMPLATE)
    plots = {
        "vs_k": _plot_vs_k(report),
        "deciles": _plot_deciles(report),
        "calibration": _plot_calibration(report),
    }
    return template.render(r=report, plots=plots, metrics=METRICS, cell=_cell, fmt=_fmt)


def write_report(report: OfflineReport, out: Path) -> tuple[Path, Path]:
    """Write ``out/metrics.json`` and ``out/report.html``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(report.to_dict(), indent=2))
    html_path = out / "report.html"
    html_path.write_text(render_html(report))
    return metrics_path, html_path
