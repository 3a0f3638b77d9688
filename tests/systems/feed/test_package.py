"""The packaged model directory carries the reference profile that monitoring compares with,
and packaging replaces only a previous model directory, never other files or the dataset."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.monitoring.alerts import DEFAULT_RULES
from mlsd.monitoring.profile import LABEL_METRICS, ReferenceProfile
from mlsd.serving.feed_model import MODEL_JSON, REFERENCE_PROFILE, FeedModel
from mlsd.systems.feed.package import package_model
from mlsd.systems.feed.serve import monitor_settings
from tests.serving.test_feed import served

__all__ = ["served"]  # the module fixture: a trained, packaged model on a synthetic world

Served = tuple[Path, Path, Path]


def test_the_profile_describes_the_rankers_features_and_loads(served: Served) -> None:
    model_dir = served[1]
    meta = json.loads((model_dir / MODEL_JSON).read_text())
    assert meta["reference_profile"] == REFERENCE_PROFILE
    profile = ReferenceProfile.load(model_dir / REFERENCE_PROFILE)

    layout = RankingBundle.load(model_dir / "ranking").layout
    assert tuple(profile.numeric) == layout.numeric  # the names the service logs as f_<name>
    assert tuple(profile.categorical) == layout.categorical  # ... and as c_<name>
    assert profile.n_rows > 0
    assert all(p.n == profile.n_rows for p in profile.numeric.values())
    assert all(c.n == profile.n_rows for c in profile.categorical.values())
    # the prediction is the calibrated probability the service serves
    assert 0.0 <= profile.prediction.min <= profile.prediction.max <= 1.0
    assert profile.prediction.n == profile.n_rows

    metrics = profile.label_metrics
    assert set(metrics) <= set(LABEL_METRICS)
    assert {"ctr", "ece"} <= set(metrics)
    assert 0.0 < metrics["ctr"] < 1.0
    assert 0.0 <= metrics["ece"] < 0.5
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 < metrics.get("ndcg_at_10", 0.5) <= 1.0


def test_the_model_finds_its_profile_and_serves_without_one(served: Served, tmp_path: Path) -> None:
    model_dir = served[1]
    assert FeedModel.load(model_dir).reference_profile == model_dir / REFERENCE_PROFILE

    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (copy / REFERENCE_PROFILE).unlink()
    assert FeedModel.load(copy).reference_profile is None  # it still loads: monitoring is off

    meta = json.loads((copy / MODEL_JSON).read_text())
    meta.pop("reference_profile")  # a model packaged before profiles existed
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    assert FeedModel.load(copy).reference_profile is None


def test_serve_monitors_with_the_configured_rules_and_the_models_profile(served: Served) -> None:
    feed = load_feed_config()  # configs/feed.toml
    settings = monitor_settings(feed, served[1])
    assert settings is not None
    assert settings.rules == DEFAULT_RULES  # written out in [[monitoring.alerts]]
    assert settings.window == timedelta(hours=1)
    assert settings.interval_s == feed.service_log.monitor_interval_s == 60.0
    assert settings.profile_path == served[1] / REFERENCE_PROFILE
    assert settings.label_delay_s == feed.monitoring.label_delay_s == 300.0
    prompt = dataclasses.replace(
        feed, monitoring=dataclasses.replace(feed.monitoring, label_delay_s=30.0)
    )
    assert (monitor_settings(prompt, served[1]) or settings).label_delay_s == 30.0
    registry = monitor_settings(feed, None)
    assert registry is not None
    assert registry.profile_path is None  # the serving model's own, found on each pass
    off = dataclasses.replace(
        feed, service_log=dataclasses.replace(feed.service_log, monitor_interval_s=0.0)
    )
    assert monitor_settings(off, served[1]) is None


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize("command", ["train", "retrain"])
def test_a_folder_that_is_not_a_model_directory_is_refused_and_kept(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    world, _, config = served
    out = tmp_path / "work"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "plan.md").write_text("keep me")
    (out / "model.json").write_text("[]")  # a model.json, but not one packaging wrote
    args = ["feed", command, "--dataset", str(world), "--out", str(out), "--config", str(config)]
    if command == "retrain":
        args += ["--base-dir", str(tmp_path)]
    assert run(args) == 1
    err = capsys.readouterr().err
    assert f"--out {out}" in err
    assert "not a previous model directory" in err
    assert (out / "notes" / "plan.md").read_text() == "keep me"
    assert (out / "model.json").read_text() == "[]"
    assert _files(tmp_path) == [out, out / "model.json", out / "notes", out / "notes" / "plan.md"]


@pytest.mark.parametrize("where", ["the dataset", "inside it", "its parent"])
def test_the_dataset_directory_is_refused_and_kept(served: Served, where: str) -> None:
    world, _, config = served
    out = {"the dataset": world, "inside it": world / "model", "its parent": world.parent}[where]
    before = _files(world.parent)
    with pytest.raises(ValueError, match="outside the dataset"):
        package_model(world, out, load_feed_config(config))
    assert _files(world.parent) == before


def test_a_previous_model_directory_is_replaced(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world, model_dir, config = served
    out = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (out / "stale.txt").write_text("from the previous model")
    args = ["feed", "train", "--dataset", str(world), "--out", str(out), "--config", str(config)]
    assert run(args) == 0, capsys.readouterr().err
    assert not (out / "stale.txt").exists()  # the folder was replaced, not written over
    assert FeedModel.load(out).version != FeedModel.load(model_dir).version == "v-test"
