"""``mlsd plan capacity``: the requirements from the config and --set, the costs from a bench
run's JSON, one line per error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.plan.capacity import (
    CovisitationTable,
    EASEWeights,
    PopularityList,
    SegmentLists,
    VectorSource,
)
from mlsd.plan.commands import memory_sources
from mlsd.plan.pipeline import Pipeline
from tests.plan.test_capacity import bench_report

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text("[plan]\ndaily_active_users = 864_000\nprecomputed_share = 0.5\n")
    return path


def test_capacity_prints_the_plan_as_json(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = tmp_path / "serving.json"
    measured.write_text(json.dumps(bench_report()))
    args = ["--config", str(config), "--measured", str(measured), "--set", "min_replicas=1"]
    code = run(["plan", "capacity", *args, "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    lines = {line["name"]: line["value"] for line in plan["lines"]}
    assert lines["peak requests/s"] == pytest.approx(300.0)  # 100/s mean x 3
    online_ms = (
        0.978 / 199.9 * 1000
    )  # the replicas' CPU; Redis's and nginx's have lines of their own
    pre_ms = 0.236 / 200.0 * 1000
    assert lines["service cores at peak"] == pytest.approx(
        (150 * online_ms + 150 * pre_ms) / 1000 / 0.6
    )
    assert plan["measured"]["source"] == str(measured)


def test_capacity_prints_a_table_and_says_what_is_missing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["plan", "capacity", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "peak requests/s" in out.out
    assert "precomputed store" in out.out
    assert "--measured" in out.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "users"], "--set 'users': expected KEY=VALUE"),
        (["--set", "users=0"], "with --set: [plan]: users must be > 0, got 0"),
        (["--set", "userz=1"], "with --set: [plan] has unknown key 'userz'"),
        (["--measured", "nope.json"], "nope.json: file not found"),
    ],
)
def test_capacity_errors_are_one_line_naming_the_key(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run(["plan", "capacity", "--config", str(config), *args]) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split())  # the console may wrap a long line
    assert err.startswith(f"config: {config}\nerror: ")  # which config, then the one error
    assert "Traceback" not in err


def test_every_configured_source_has_its_memory_model(tmp_path: Path) -> None:
    path = tmp_path / "feed.toml"
    path.write_text(
        '[retrieval]\nsources = ["popularity", "als", "two_tower", "ease", "covisitation", '
        '"bpr", "segment_popularity"]\n[retrieval.als]\nfactors = 32\n'
        "[retrieval.two_tower]\ndim = 48\n[retrieval.ease]\nmax_items = 20_000\n"
        "[retrieval.covisitation]\nmax_neighbours = 50\n"
    )
    sources = memory_sources(load_feed_config(path))
    assert sources == {
        "popularity": PopularityList(),
        "als": VectorSource(32, user_vectors=True, fold_in=True),
        "two_tower": VectorSource(48, history_embeddings=True),
        "ease": EASEWeights(20_000),
        "covisitation": CovisitationTable(50),
        "bpr": VectorSource(64, user_vectors=True, item_bias=True),
        "segment_popularity": SegmentLists(),
    }
    assert list(sources) == list(load_feed_config(path).retrieval.sources)


def test_costs_measured_on_the_demo_pipeline_warn_when_planning_the_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # the configs, by the relative paths bench/serving.py records
    report = bench_report()
    report["pipeline"] = Pipeline.of_config(Path("configs/feed-demo.toml")).to_dict()
    measured = tmp_path / "serving.json"
    measured.write_text(json.dumps(report))
    assert run(["plan", "capacity", "--measured", str(measured), "--json"]) == 0  # feed.toml
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    [warning] = [w for w in warnings if "were measured on" in w]
    assert warning.startswith(
        "CPU costs and p99 were measured on configs/feed-demo.toml (sources popularity, "
        "covisitation, als; ranker auto), not on the planned configs/feed.toml (sources "
        "popularity, segment_popularity, covisitation, als, bpr, ease, two_tower; ranker "
        "ensemble): sources not measured: segment_popularity, bpr, ease, two_tower; ranker "
        "auto measured, ensemble planned."
    )
    assert warning.endswith(  # EASE cannot be built at the 1M items planned: say so
        "re-run bench/serving.py --config configs/feed.toml once ease is out of its "
        "[retrieval].sources (it cannot be built at this catalog: see its warning), or plan "
        "for the measured pipeline with --config configs/feed-demo.toml"
    )
    args = ["--config", "configs/feed-demo.toml", "--measured", str(measured), "--json"]
    assert run(["plan", "capacity", *args]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert not [w for w in warnings if "pipeline" in w or "were measured on" in w]


def test_the_feeds_plan_counts_every_sources_memory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert run(["plan", "capacity", "--json"]) == 0  # configs/feed.toml: seven sources
    plan = json.loads(capsys.readouterr().out)
    lines = {line["name"]: line["value"] for line in plan["lines"]}
    sources = load_feed_config(None).retrieval.sources
    parts = [v for k, v in lines.items() if k.split()[0] in sources]
    assert lines["memory per replica"] == pytest.approx(sum(parts))
    assert lines["ease weights"] == pytest.approx((4 * 50_000**2 + 8 * 50_000 + 28e6) / 1e9)
    assert lines["covisitation neighbours"] > 1.6  # 200 neighbours x 8 B a million items
    assert {k.split()[0] for k in lines if k.split()[0] in sources} == set(sources)
    assert any(w.startswith("[retrieval.ease] max_items is 50,000") for w in plan["warnings"])
    assert any(w.startswith("segment_popularity: its score tables") for w in plan["warnings"])
