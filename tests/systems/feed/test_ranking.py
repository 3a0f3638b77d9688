"""``mlsd feed train`` / ``mlsd feed evaluate``: artifacts on disk, and a report that renders."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.cli import run
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.serving.feed_model import FeedModel
from tests.browser import rendered_dom

FAST_CONFIG = """
[retrieval]
sources = ["popularity", "covisitation", "ease"]
n_bootstrap = 50

[retrieval.merge]
quota_step = 0.25

[ranking]
rankers = ["logistic", "lightgbm"]
baselines = ["popularity", "ease"]
n_candidates = 100
ranker_windows = 2

[ranking.lightgbm]
n_estimators = 60
"""

TABLES = ("methods", "segments", "rankers", "rerank", "beyond", "timings")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(
        WorldConfig(n_users=400, n_items=150, n_events=40_000, days=40, seed=8), out, progress=False
    )
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "feed.toml"
    path.write_text(FAST_CONFIG)
    return path


def _check_report(out: Path, dataset: str) -> dict[str, object]:
    metrics = json.loads((out / "metrics.json").read_text())
    names = [m["name"] for m in metrics["methods"]]
    assert names[-1] == "mlsd"
    assert {"popularity", "ease"} <= set(names)
    assert metrics["dataset"] == dataset
    html = (out / "report.html").read_text()
    assert "full ranking" in html  # the protocol is stated
    dom = rendered_dom((out / "report.html").as_uri())
    for table in TABLES:
        match = re.search(rf'<table id="{table}">(.*?)</table>', dom, re.S)
        assert match, f"table {table} missing from the rendered page"
        assert match.group(1).count("<tr") >= 2, f"table {table} has no data rows"
    images = re.search(r'<body[^>]*data-images-ok="(\d+)"', dom)
    assert images, "the page's script did not run"
    assert int(images.group(1)) == 3, "the three plots did not decode"
    result: dict[str, object] = metrics
    return result


def test_evaluate_writes_metrics_and_a_report_that_renders(
    world: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    code = run(
        ["feed", "evaluate", "--dataset", str(world), "--out", str(out), "--config", str(config)]
    )
    assert code == 0, capsys.readouterr().err
    _check_report(out, "synthetic")
    assert "mlsd" in capsys.readouterr().out


def test_train_writes_a_model_directory_serving_loads(
    world: Path, config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    args = ["feed", "train", "--dataset", str(world), "--out", str(out), "--config", str(config)]
    assert run(args) == 0
    bundle = RankingBundle.load(out / "ranking")
    assert bundle.ranker_name in ("logistic", "lightgbm")
    assert set(bundle.quotas) == {"popularity", "covisitation", "ease"}
    model = FeedModel.load(out)
    assert list(model.sources) == ["popularity", "covisitation", "ease"]
    assert model.n_candidates == 100
    assert not list(out.rglob("*.pkl"))
    assert not list(out.rglob("*.pickle"))


def test_bad_protocol_is_a_one_line_error(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        ["feed", "evaluate", "--dataset", str(world), "--out", str(tmp_path), "--protocol", "loo"]
    )
    assert code == 1
    assert "--protocol 'loo'" in capsys.readouterr().err


def test_splits_and_the_splits_protocol_go_together(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate = ["feed", "evaluate", "--dataset", str(world), "--out", str(tmp_path)]
    assert run([*evaluate, "--protocol", "splits"]) == 1
    assert "--splits PREFIX goes with --protocol splits" in capsys.readouterr().err
    assert run([*evaluate, "--splits", str(tmp_path / "p")]) == 1
    assert "--splits PREFIX goes with --protocol splits" in capsys.readouterr().err
    assert run([*evaluate, "--protocol", "splits", "--splits", "p", "--test-frac", "0.2"]) == 1
    assert "--test-frac does not apply to --protocol splits" in capsys.readouterr().err
    assert run([*evaluate, "--protocol", "leave-last-out", "--test-frac", "0.2"]) == 1
    assert "--test-frac does not apply to --protocol leave-last-out" in capsys.readouterr().err


@pytest.mark.dataset
def test_evaluate_on_recboles_splits(
    ml100k_dir: Path, recbole_ml100k_dir: Path, config: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "dataset"
    assert (
        run(
            ["data", "import", "movielens-100k", "--source", str(ml100k_dir), "--out", str(dataset)]
        )
        == 0
    )
    out = tmp_path / "eval"
    prefix = recbole_ml100k_dir / "protoB"
    args = ["--protocol", "splits", "--splits", str(prefix), "--config", str(config)]
    assert run(["feed", "evaluate", "--dataset", str(dataset), "--out", str(out), *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol_name"] == "splits"
    assert metrics["cut_points"]["test"] == str(prefix.parent / "protoB_test.tsv")
    counts = metrics["counts"]
    assert (counts["n_test_users"], counts["n_cold_users"], counts["events_in_no_split"]) == (
        943,
        0,
        0,
    )
    assert counts["n_train_events"] == counts["train_events"] == 80_808
    assert (
        metrics["cut_points"]["test_sha256"]
        == hashlib.sha256((prefix.parent / "protoB_test.tsv").read_bytes()).hexdigest()
    )
    html = (out / "report.html").read_text()
    assert "fit on the train split alone" in html
    # RecBole's own figures on these files sit beside this run's, without the MAP note of the
    # random-per-user table
    assert 'id="published"' in html
    assert "<td>EASE (published)</td>" in html
    assert "<td>0.1272</td>" in html
    assert "(protocol B)" in html
    assert "divided by #relevant" not in html


def test_evaluate_leave_last_out(world: Path, config: Path, tmp_path: Path) -> None:
    args = ["--protocol", "leave-last-out", "--config", str(config)]
    assert run(["feed", "evaluate", "--dataset", str(world), "--out", str(tmp_path), *args]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["protocol_name"] == "leave-last-out"
    assert metrics["counts"]["test_events"] == metrics["counts"]["valid_events"] > 0
    assert "Leave-last-one-out" in (tmp_path / "report.html").read_text()


def test_a_splits_run_on_other_files_shows_no_peer_table(
    world: Path, config: Path, tmp_path: Path
) -> None:
    events = pd.read_parquet(world / "events.parquet").drop_duplicates(["user_id", "item_id"])
    draw = np.random.default_rng(1).random(len(events))
    for name, part in (
        ("train", draw < 0.8),
        ("valid", (draw >= 0.8) & (draw < 0.9)),
        ("test", draw >= 0.9),
    ):
        events.loc[part, ["user_id", "item_id"]].to_csv(tmp_path / f"s_{name}.csv", index=False)
    out = tmp_path / "eval"
    args = ["--protocol", "splits", "--splits", str(tmp_path / "s"), "--config", str(config)]
    assert run(["feed", "evaluate", "--dataset", str(world), "--out", str(out), *args]) == 0
    html = (out / "report.html").read_text()
    assert "Given splits (train s_train.csv" in html
    assert 'id="published"' not in html


@pytest.mark.dataset
@pytest.mark.parametrize("source", ["movielens-100k", "movielens-latest-small"])
def test_evaluate_on_movielens(
    source: str, config: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fixture = "ml100k_dir" if source == "movielens-100k" else "ml_latest_small_dir"
    raw: Path = request.getfixturevalue(fixture)
    dataset = tmp_path / "dataset"
    assert run(["data", "import", source, "--source", str(raw), "--out", str(dataset)]) == 0
    out = tmp_path / "eval"
    assert (
        run(
            [
                "feed",
                "evaluate",
                "--dataset",
                str(dataset),
                "--out",
                str(out),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    metrics = _check_report(out, json.loads((dataset / "dataset.json").read_text())["name"])
    counts = metrics["counts"]
    assert isinstance(counts, dict)
    if source == "movielens-100k":  # DESIGN.md's figures for the last 20% as test
        assert (counts["n_test_users"], counts["n_warm_users"]) == (301, 109)
