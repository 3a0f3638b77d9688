"""The plan's CPU costs are one pipeline's: bench/serving.py records which, and the plan warns
when it plans for another (other sources or ranker, other settings) or cannot tell."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

from mlsd.plan.capacity import Measured, capacity_plan
from mlsd.plan.pipeline import Pipeline, pipeline_warnings
from tests.plan.test_capacity import DEMO, SMALL, bench_report, measured

REPO = Path(__file__).resolve().parents[2]
FEED = Pipeline(
    "feed.toml", "f" * 64, "0" * 64, ("popularity", "ease", "als", "two_tower"), "ensemble"
)


def test_costs_of_another_pipeline_are_a_warning_naming_both_and_what_differs() -> None:
    plan = capacity_plan(SMALL, measured(pipeline=DEMO), pipeline=FEED)
    [warning] = [w for w in plan.warnings if "measured on" in w]
    assert warning == (
        "CPU costs and p99 were measured on demo.toml (sources popularity, als; ranker auto, "
        "served lightgbm), not on the planned feed.toml (sources popularity, ease, als, "
        "two_tower; ranker ensemble): sources not measured: ease, two_tower; ranker auto "
        "measured, ensemble planned. A request's CPU and latency grow with its sources and "
        "ranker, so cores, replicas and the latency budget are of another system: re-run "
        "bench/serving.py --config feed.toml, or plan for the measured pipeline "
        "with --config demo.toml"
    )
    fewer = dataclasses.replace(FEED, sources=("popularity",), ranker="auto")
    [warning] = pipeline_warnings(DEMO, fewer, "run.json")
    assert "sources measured but not planned: als;" not in warning
    assert ": sources measured but not planned: als. A request's" in warning


def test_a_run_that_did_not_record_its_pipeline_is_a_warning() -> None:
    report = bench_report()
    del report["pipeline"]  # a run from before bench/serving.py recorded it
    costs = Measured.from_serving_bench(report, "old.json")
    assert costs.pipeline is None
    plan = capacity_plan(SMALL, costs, pipeline=FEED)
    assert (
        "old.json does not record which pipeline it measured (a bench/serving.py run from "
        "before it did): its CPU costs and p99 may be of another pipeline than feed.toml "
        "(sources popularity, ease, als, two_tower; ranker ensemble), with other sources and "
        "ranker; re-run bench/serving.py, which records its config, sources and ranker"
    ) in plan.warnings


def test_the_measured_pipeline_planned_for_is_no_warning() -> None:
    assert capacity_plan(SMALL, measured(), pipeline=DEMO).warnings == []
    renamed = dataclasses.replace(DEMO, config="copy-of-demo.toml", served_ranker=None)
    assert pipeline_warnings(DEMO, renamed, "run.json") == []  # the same settings elsewhere
    assert pipeline_warnings(DEMO, None, "run.json") == []  # a plan that does not say


def test_only_plan_or_comment_edits_keep_the_pipeline_and_other_settings_warn(
    tmp_path: Path,
) -> None:
    demo = (REPO / "configs" / "feed-demo.toml").read_text()
    (tmp_path / "demo.toml").write_text(demo)
    (tmp_path / "traffic.toml").write_text(f"# planned\n{demo}\n[plan]\nusers = 9_000_000\n")
    (tmp_path / "bigger.toml").write_text(demo.replace("factors = 32", "factors = 128"))
    names = ("demo.toml", "traffic.toml", "bigger.toml")
    ran, traffic, bigger = (Pipeline.of_config(tmp_path / name) for name in names)
    assert traffic.config_sha256 != ran.config_sha256  # another file ...
    assert traffic.settings_sha256 == ran.settings_sha256  # ... of the same pipeline
    assert pipeline_warnings(ran, traffic, "run.json") == []
    assert pipeline_warnings(ran, bigger, "run.json") == [
        f"CPU costs and p99 were measured on {tmp_path / 'demo.toml'}, whose settings outside "
        f"[plan] differ from the planned {tmp_path / 'bigger.toml'}'s (the same sources and "
        "ranker; e.g. a source's dimensions or the candidates ranked may cost differently): "
        f"re-run bench/serving.py --config {tmp_path / 'bigger.toml'}, or plan for "
        f"the measured pipeline with --config {tmp_path / 'demo.toml'}"
    ]


def test_a_config_is_read_as_the_commands_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    feed = Pipeline.of_config(None)  # configs/feed.toml, as load_feed_config(None)
    assert feed.config == "configs/feed.toml"
    assert (len(feed.sources), feed.ranker) == (7, "ensemble")
    demo = Pipeline.of_config(Path("configs/feed-demo.toml"))
    assert (demo.sources, demo.ranker) == (("popularity", "covisitation", "als"), "auto")
    assert Pipeline.of_config(Path("configs/feed-demo.toml")) == demo  # stable hashes
    assert Pipeline.from_dict(json.loads(json.dumps(demo.to_dict())), "run.json") == demo
    monkeypatch.chdir(tmp_path)  # no configs/feed.toml here: the built-in defaults
    defaults = Pipeline.of_config(None)
    assert (defaults.config, defaults.config_sha256) == ("built-in defaults", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sources": "als"}, "run.json: pipeline.sources should be a list of source names"),
        ({"ranker": None}, "run.json: pipeline.ranker should be a string, got None"),
        ({"settings_sha256": 3}, "run.json: pipeline.settings_sha256 should be a string"),
    ],
)
def test_a_malformed_pipeline_is_named(change: dict[str, Any], message: str) -> None:
    report = bench_report()
    report["pipeline"] |= change
    with pytest.raises(ValueError, match=message):
        Measured.from_serving_bench(report, "run.json")


def test_the_bench_records_the_pipeline_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = importlib.import_module("bench.serving")  # bench/ is scripts, not a package
    monkeypatch.chdir(REPO)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"ranker": "lightgbm"}))

    def build(args: argparse.Namespace) -> dict[str, Any]:
        return {"dir": str(tmp_path), "world": str(tmp_path / "world"), "model": str(model)}

    monkeypatch.setattr(serving, "build", build)
    monkeypatch.setattr(serving, "code_version", lambda: {})
    report = serving.run(serving.parse_args(["--build-only"]))
    recorded = Pipeline.from_dict(report["pipeline"], "run")
    assert recorded == dataclasses.replace(
        Pipeline.of_config(serving.CONFIG), served_ranker="lightgbm"
    )
    assert recorded.config == "configs/feed-demo.toml"
    assert pipeline_warnings(recorded, Pipeline.of_config(serving.CONFIG), "run") == []
    # --config measures another config: the build and the record are of that one
    built: list[Path] = []

    def build_config(args: argparse.Namespace) -> dict[str, Any]:
        built.append(args.config)
        return build(args)

    monkeypatch.setattr(serving, "build", build_config)
    report = serving.run(serving.parse_args(["--build-only", "--config", "configs/feed.toml"]))
    planned = Pipeline.of_config(Path("configs/feed.toml"))
    assert built == [Path("configs/feed.toml")]
    assert Pipeline.from_dict(report["pipeline"], "run").sources == planned.sources
    assert pipeline_warnings(Pipeline.from_dict(report["pipeline"], "run"), planned, "run") == []
