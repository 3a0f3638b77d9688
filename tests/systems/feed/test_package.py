"""The packaged model directory carries the reference profile that monitoring compares with."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from datetime import timedelta
from pathlib import Path

from mlsd.config import load_feed_config
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.monitoring.alerts import DEFAULT_RULES
from mlsd.monitoring.profile import LABEL_METRICS, ReferenceProfile
from mlsd.serving.feed import MODEL_JSON, REFERENCE_PROFILE, FeedModel
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
    registry = monitor_settings(feed, None)
    assert registry is not None
    assert registry.profile_path is None  # the serving model's own, found on each pass
    off = dataclasses.replace(
        feed, service_log=dataclasses.replace(feed.service_log, monitor_interval_s=0.0)
    )
    assert monitor_settings(off, served[1]) is None
