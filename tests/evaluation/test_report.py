"""The HTML report: every section present, published numbers beside the random protocol."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from markupsafe import escape

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.offline import OfflineReport, evaluate_pipeline
from mlsd.evaluation.pipeline import PipelineConfig
from mlsd.evaluation.report import (
    PEER_SPLITS,
    PUBLISHED_TEST_FRAC,
    published_numbers,
    render_html,
    write_report,
)
from mlsd.evaluation.retrieval import ProtocolConfig
from mlsd.evaluation.retrieval_report import PairedEstimate
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.systems.feed.ranking import evaluation_protocol


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
    for table in ("methods", "paired", "segments", "rankers", "rerank", "beyond", "timings"):
        assert f'<table id="{table}">' in html
    assert html.count("data:image/png;base64,") == 3
    assert str(escape(report.protocol)) in html  # as Jinja escapes it
    assert metrics.read_text().startswith("{")
    assert 'id="published"' not in html  # only beside the random protocol on ML-100K
    assert "AUC over" not in html  # one draw of held-out users: no spread column


def test_the_rankers_table_shows_the_auc_over_draws(report: OfflineReport) -> None:
    (logistic,) = report.rankers
    drawn = dataclasses.replace(logistic, valid_auc_splits=(0.70, 0.74, 0.72))
    html = render_html(dataclasses.replace(report, rankers=[drawn]))
    assert "<th>AUC over 3 draws</th>" in html
    assert "0.720 ± 0.020" in html


def test_the_paired_table_gives_each_ratio_and_difference_with_its_interval(
    report: OfflineReport,
) -> None:
    (comparison,) = report.comparisons
    lifted = PairedEstimate(1.064, 1.012, 1.118, 0.025, 0.005, 0.046)
    empty = dataclasses.replace(comparison, segments={"all": lifted, "warm": None})
    html = re.sub(r">\s+<", "><", render_html(dataclasses.replace(report, comparisons=[empty])))
    assert "<td>popularity</td><td>1.064 [1.012, 1.118]</td><td>0.025 [0.005, 0.046]</td>" in html
    assert html.count("<td>—</td>") >= 4  # no warm estimate; no cold key at all
    assert 'id="paired"' not in render_html(dataclasses.replace(report, comparisons=[]))


@pytest.fixture(scope="module")
def random_report(tmp_path_factory: pytest.TempPathFactory) -> OfflineReport:
    world = tmp_path_factory.mktemp("world-random")
    synthesize(
        WorldConfig(n_users=120, n_items=200, n_events=15_000, days=20, seed=3),
        world,
        progress=False,
    )
    measured = evaluate_pipeline(
        world,
        {"popularity": PopularityRetriever},
        {"logistic": LogisticRanker},
        protocol=ProtocolConfig(n_bootstrap=20, test_frac=PUBLISHED_TEST_FRAC),
        pipeline=PipelineConfig(n_candidates=100, ranker="logistic", baselines=("popularity",)),
        protocol_name="random-per-user",
    )
    return dataclasses.replace(measured, dataset="movielens-100k")  # a dataset with a table


def test_published_numbers_sit_beside_the_random_protocol(
    random_report: OfflineReport, tmp_path: Path
) -> None:
    assert random_report.test_frac == 0.25
    metrics, html_path = write_report(random_report, tmp_path)
    html = html_path.read_text()
    assert 'id="published"' in html
    assert "BiVAE (published)" in html
    assert "0.4751" in html
    assert "÷ #relevant" in html
    # mlsd's methods beside them, with the published MAP definition, the same as metrics.json's
    raw = json.loads(metrics.read_text())
    for method in raw["methods"]:
        values = method["metrics"]["all"]
        published_map = values["map_relevant@10"]["mean"]
        assert published_map <= values["map@10"]["mean"] + 1e-12
        row = html.split(f"<td>{method['name']} (this run)</td>")[1].split("</tr>")[0]
        assert f"<td>{published_map:.4f}</td>" in row


def test_the_published_map_is_below_mlsds_for_users_with_many_relevant_items(
    random_report: OfflineReport,
) -> None:
    """map_relevant@10 divides by #relevant, map@10 by min(10, #relevant): smaller here."""
    pipeline = random_report.method("mlsd").metrics["all"]
    mlsd_map, published = pipeline["map@10"], pipeline["map_relevant@10"]
    assert mlsd_map is not None
    assert published is not None
    assert 0.0 < published.mean < mlsd_map.mean  # some users have more than 10 relevant items


def test_the_published_table_needs_the_published_test_share(report: OfflineReport) -> None:
    """An 80/20 random run is not set beside the 75/25 published table; a sentence says why."""
    for frac in (0.2, None):
        other = dataclasses.replace(
            report, dataset="movielens-100k", protocol_name="random-per-user", test_frac=frac
        )
        html = render_html(other)
        assert 'id="published"' not in html
        assert "BiVAE (published)" not in html
        assert 'id="published-note"' in html
        assert "not shown" in html
    assert "test share of 0.25 and this run&#39;s is 0.2" in render_html(
        dataclasses.replace(
            report, dataset="movielens-100k", protocol_name="random-per-user", test_frac=0.2
        )
    )
    shown, note = published_numbers(
        dataclasses.replace(
            report, dataset="movielens-100k", protocol_name="random-per-user", test_frac=0.25
        )
    )
    assert shown is not None
    assert note is None


def test_a_peers_table_needs_its_exact_files_and_every_test_item_relevant(
    report: OfflineReport,
) -> None:
    """RecBole's figures sit beside a splits run on the files they were measured on (by
    SHA-256), not beside other files, nor beside a run that counts only liked test items."""
    digests = next(iter(PEER_SPLITS))
    cut_points = {
        f"{name}_sha256": d for name, d in zip(("train", "valid", "test"), digests, strict=True)
    }
    on_those = dataclasses.replace(report, protocol_name="splits", cut_points=cut_points)
    html = render_html(on_those)
    assert "<td>EASE (published)</td>" in html
    assert "map@10 (÷ #relevant)" not in html  # the random-per-user table's MAP column
    other = {**cut_points, "test_sha256": "0" * 64}
    assert published_numbers(dataclasses.replace(on_those, cut_points=other)) == (None, None)
    shown, note = published_numbers(dataclasses.replace(on_those, min_value=4.0))
    assert shown is None
    assert note is not None
    assert "only those with value >= 4" in note
    random = dataclasses.replace(
        report, dataset="movielens-100k", protocol_name="random-per-user", test_frac=0.25
    )
    assert published_numbers(dataclasses.replace(random, min_value=4.0))[0] is None


def test_random_per_user_defaults_to_the_published_test_share() -> None:
    configured = ProtocolConfig(test_frac=0.2)
    assert evaluation_protocol(configured, "random-per-user", None).test_frac == 0.25
    assert evaluation_protocol(configured, "random-per-user", 0.3).test_frac == 0.3
    assert evaluation_protocol(configured, "temporal", None).test_frac == 0.2
    assert evaluation_protocol(configured, "temporal", 0.1).test_frac == 0.1
