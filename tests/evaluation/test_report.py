"""The HTML report: every section present, published numbers beside the random protocol."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from markupsafe import escape

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.offline import OfflineReport, evaluate_pipeline
from mlsd.evaluation.pipeline import PipelineConfig
from mlsd.evaluation.report import render_html, write_report
from mlsd.evaluation.retrieval import ProtocolConfig
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.retrieval.popularity import PopularityRetriever


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> OfflineReport:
    world = tmp_path_factory.mktemp("world")
    synthesize(
        WorldConfig(n_users=200, n_items=80, n_events=15_000, days=30, seed=2),
        world,
        progress=False,
    )
    return evaluate_pipeline(
        world,
        {"popularity": PopularityRetriever},
        {"logistic": LogisticRanker},
        protocol=ProtocolConfig(n_bootstrap=20),
        pipeline=PipelineConfig(
            n_candidates=100, ranker="logistic", baselines=("popularity",), ranker_windows=1
        ),
    )


def test_report_has_every_section(report: OfflineReport, tmp_path: Path) -> None:
    metrics, html_path = write_report(report, tmp_path)
    html = html_path.read_text()
    for table in ("methods", "segments", "rankers", "rerank", "beyond", "timings"):
        assert f'<table id="{table}">' in html
    assert html.count("data:image/png;base64,") == 3
    assert str(escape(report.protocol)) in html  # as Jinja escapes it
    assert metrics.read_text().startswith("{")
    assert 'id="published"' not in html  # only beside the random protocol on ML-100K


def test_published_numbers_sit_beside_the_random_protocol(report: OfflineReport) -> None:
    random = dataclasses.replace(report, dataset="movielens-100k", protocol_name="random-per-user")
    html = render_html(random)
    assert 'id="published"' in html
    assert "BiVAE (published)" in html
    assert "0.4751" in html
