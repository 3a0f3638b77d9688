"""``mlsd feed features apply|materialize``: from a dataset to a filled online store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.cli import run
from mlsd.data.schema import read_info
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.features.batch import feature_config_for, stored_user_features
from mlsd.features.online import OnlineFeatures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    synthesize(WorldConfig(n_users=200, n_items=80, n_events=10_000, days=15, seed=3), out)
    return out


def _online_store_matches_batch(dataset: Path, repo: Path) -> None:
    config = feature_config_for(dataset)
    online = OnlineFeatures(repo, config)
    as_of = pd.Timestamp(read_info(dataset).ts_max) + pd.Timedelta(microseconds=1)
    batch = stored_user_features(dataset, pd.DataFrame({"user_id": [1, 2, 3], "ts": as_of}), config)
    for row in batch.itertuples():
        got = online.get_online_features(row.user_id, np.array([1, 2]), now=as_of)
        recent = got.user["recent_item_ids"][0]
        assert recent[recent >= 0].tolist() == list(row.recent_item_ids)
        assert int(got.user["last_event_ts"][0]) == row.last_event_ts
        assert got.derived["user_known"].tolist() == [1, 1]


def test_apply_then_materialize_fills_sqlite(world: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert run(["feed", "features", "apply", "--dataset", str(world), "--repo", str(repo)]) == 0
    assert (repo / "feature_store.yaml").is_file()
    assert (
        run(["feed", "features", "materialize", "--dataset", str(world), "--repo", str(repo)]) == 0
    )
    _online_store_matches_batch(world, repo)


@pytest.mark.integration
def test_config_file_selects_redis(world: Path, tmp_path: Path, redis_server: str) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(
        f'[feature_store]\nonline_store = "redis"\nredis_connection = "{redis_server}"\n'
        'project = "cli_test"\n'
    )
    repo = tmp_path / "repo"
    common = ["--dataset", str(world), "--repo", str(repo), "--config", str(config)]
    assert run(["feed", "features", "apply", *common]) == 0
    assert "redis" in (repo / "feature_store.yaml").read_text()
    assert run(["feed", "features", "materialize", *common]) == 0
    _online_store_matches_batch(world, repo)


def materialized(world: Path, repo: Path) -> list[str]:
    """``features apply`` and ``materialize`` of ``world`` into ``repo`` (the local default
    online store); the options naming them."""
    common = ["--dataset", str(world), "--repo", str(repo)]
    assert run(["feed", "features", "apply", *common]) == 0
    assert run(["feed", "features", "materialize", *common]) == 0
    return common


@pytest.mark.integration
def test_footprint_measures_a_materialized_repository(
    world: Path, tmp_path: Path, redis_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    common = materialized(world, repo)
    capsys.readouterr()
    args = ["feed", "features", "footprint", *common]
    assert run([*args, "--redis", redis_server, "--rows", "100", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    catalog = len(pd.read_parquet(repo / "data" / "items.parquet"))
    assert (measured["users"], measured["items"]) == (100, min(100, catalog))
    assert measured["bytes_per_user"] > measured["bytes_per_item"] > 0
    assert run([*args, "--redis", redis_server, "--rows", "1"]) == 2  # a usage error


def test_bad_online_store_is_a_one_line_error(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["feed", "features", "apply", "--dataset", str(world), "--online-store", "dynamo"]
    assert run([*args, "--repo", str(tmp_path / "r")]) == 1
    assert "expected one of 'sqlite', 'redis'" in capsys.readouterr().err


CHEAP_RETRIEVAL = """
[retrieval]
sources = ["covisitation", "als", "popularity"]
ks = [10, 20, 50]
n_bootstrap = 100
[retrieval.merge]
tune_k = 20
quota_step = 0.25
[retrieval.als]
factors = 8
iterations = 2
"""


@pytest.fixture(scope="module")
def retrieval_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retrieval-world")
    synthesize(WorldConfig(n_users=300, n_items=200, n_events=30_000, days=20), out)
    return out


def test_retrieve_eval_prints_the_protocol_and_writes_the_report(
    retrieval_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(CHEAP_RETRIEVAL)
    out = tmp_path / "reports" / "retrieval.json"
    args = ["feed", "retrieve-eval", "--dataset", str(retrieval_world), "--config", str(config)]
    assert run([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [m["name"] for m in report["methods"]] == ["covisitation", "als", "popularity", "merged"]
    counts = report["counts"]
    assert counts["n_warm_users"] + counts["n_cold_users"] == counts["n_test_users"] > 0
    assert report["validation"]["tune_k"] == 20
    assert sum(report["quotas"].values()) == pytest.approx(1.0)
    for method in report["methods"]:
        assert set(method["metrics"]["all"]) == {"recall@10", "recall@20", "recall@50", "ndcg@10"}
    # The printout states the protocol and shows every method and segment.
    for text in (report["t1"], report["t2"], "full ranking", "bootstrap", "merge quotas"):
        assert text.lower() in printed.lower()
    for text in ("covisitation", "als", "popularity", "merged", "warm users", "cold users"):
        assert text in printed
    assert f"{counts['n_test_users']:,} ({counts['n_warm_users']:,} warm" in printed
    recall = report["methods"][-1]["metrics"]["all"]["recall@20"]["mean"]
    assert f"{recall:.3f}" in printed
    assert f"report written to {out}" in printed.replace("\n", "")
    # The merged set against each source, paired over the same users, at every k.
    comparisons = report["comparisons"]
    assert {(c["baseline"], c["metric"]) for c in comparisons} == {
        (source, f"recall@{k}")
        for source in ("covisitation", "als", "popularity")
        for k in (10, 20, 50)
    }
    for c in comparisons:
        merged = report["methods"][-1]["metrics"]["all"][c["metric"]]["mean"]
        alone = next(m for m in report["methods"] if m["name"] == c["baseline"])
        paired = c["segments"]["all"]
        assert paired["ratio"] == pytest.approx(
            merged / alone["metrics"]["all"][c["metric"]]["mean"]
        )
        assert paired["ratio_low"] <= paired["ratio"] <= paired["ratio_high"]
    assert "merged / each source" in printed
    popularity = next(
        c["segments"]["all"]
        for c in comparisons
        if c["baseline"] == "popularity" and c["metric"] == "recall@20"
    )
    assert f"{popularity['ratio']:.3f} [{popularity['ratio_low']:.3f}" in printed


def test_retrieve_eval_names_a_fused_merge(
    retrieval_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "feed.toml"
    config.write_text(
        CHEAP_RETRIEVAL.replace("quota_step = 0.25", "quota_step = 0.25\nmethod = 'rrf'")
    )
    out = tmp_path / "retrieval.json"
    args = ["feed", "retrieve-eval", "--dataset", str(retrieval_world), "--config", str(config)]
    assert run([*args, "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    # The label wraps in its cell: "merge weights (reciprocal-rank" | "fusion, c = 60), ...".
    assert "merge weights (reciprocal-rank" in printed
    assert "fusion, c = 60), warm users" in printed
    assert json.loads(out.read_text())["fusion"] == {"method": "rrf", "rank_constant": 60.0}


def test_retrieve_eval_on_a_missing_dataset_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["feed", "retrieve-eval", "--dataset", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "events.parquet: not found" in err
    assert "Traceback" not in err


def test_commands_say_which_config_they_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """configs/feed.toml is relative to the working directory: run elsewhere, `feed evaluate`
    says it uses the built-in defaults (and where it looked) instead of doing so silently."""
    import mlsd.evaluation.offline as offline
    import mlsd.features.batch as batch
    import mlsd.systems.feed.ranking  # noqa: F401  (registers evaluate on the feed app)

    def stop(*args: object, **kwargs: object) -> None:
        raise ValueError("stopped before evaluating")

    monkeypatch.setattr(batch, "feature_config_for", lambda *args, **kwargs: None)
    monkeypatch.setattr(offline, "evaluate_pipeline", stop)
    monkeypatch.chdir(tmp_path)
    evaluate = ["feed", "evaluate", "--dataset", "world", "--out", "out"]

    assert run(evaluate) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"config: built-in defaults (configs/feed.toml not found in {tmp_path})" in err

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "feed.toml").write_text("[ranking]\nranker_windows = 2\n")
    assert run(evaluate) == 1
    assert "config: configs/feed.toml" in capsys.readouterr().err

    other = tmp_path / "other.toml"
    other.write_text("")
    assert run([*evaluate, "--config", str(other)]) == 1
    assert f"config: {other}" in " ".join(capsys.readouterr().err.split())


def test_features_get_names_a_bad_item_id(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["feed", "features", "get", "--dataset", str(world), "--repo", str(tmp_path / "r")]
    assert run([*args, "--user", "1", "--items", "1,x,3"]) == 2  # before the store is read
    said = " ".join(capsys.readouterr().err.split())
    assert "--items" in said
    assert "'x' in '1,x,3' is not an item id" in said
    assert "invalid literal" not in said


def test_footprint_on_an_unreachable_redis_names_it_and_is_not_an_internal_error(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlsd.serving.process import free_port

    common = materialized(world, tmp_path / "repo")
    capsys.readouterr()
    where = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert run(["feed", "features", "footprint", *common, "--redis", where]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"--redis {where}: cannot reach Redis" in said
    assert "start redis-server there" in said
    assert "internal error" not in said
    assert "report it" not in said
