"""bench/experiments.py on a tiny world built in tmp: the live A/B report and the SRM check.

The real CLI service in a subprocess, the real simulator and the real service log: the A/B
report of popularity vs a trained pipeline names both arms with their traffic, and a service
that assigns 75/25 is flagged when analysed as 50/50 and not when analysed as it is.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.config import load_feed_config
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.systems.feed.package import package_model

CONFIG = """
[retrieval]
sources = ["popularity", "covisitation"]
n_bootstrap = 20

[retrieval.merge]
quota_step = 0.25

[ranking]
rankers = ["logistic"]
n_candidates = 100
ranker_windows = 1
"""


@pytest.mark.slow
@pytest.mark.integration
def test_ab_report_and_srm_on_the_live_service(tmp_path: Path) -> None:
    bench = importlib.import_module("bench.experiments")  # bench/ is scripts, not a package
    world, config = tmp_path / "world", tmp_path / "feed.toml"
    synthesize(
        WorldConfig(n_users=300, n_items=120, n_events=30_000, days=30, seed=6),
        world,
        progress=False,
    )
    config.write_text(CONFIG)
    for step in ("apply", "materialize"):
        assert (
            run(["feed", "features", step, "--dataset", str(world), "--config", str(config)]) == 0
        )
    model, _ = package_model(world, tmp_path / "model", load_feed_config(config))
    sizes = bench.Sizes(
        pilot_requests=200, min_requests=400, max_requests=400,
        skew_requests=600, skew_requests_per_user=1.0,
    )  # fmt: skip
    cfg = bench.BenchConfig(
        dataset=world, model=model, out=tmp_path / "out", config=config, sizes=sizes,
        phases=("ab", "skew"), skew=0.75, progress=False,
    )  # fmt: skip

    result = bench.run(cfg)

    ab = result["ab"]
    assert list(ab["arms"]) == ["popular", "pipeline"]  # the control first
    for name, arm in ab["arms"].items():
        assert arm["alias"] == ("popular" if name == "popular" else "champion")
        assert arm["users"] > 10, arm
        assert arm["exposures"] > 0, arm
        assert arm["ctr_ci"][0] <= arm["ctr"] <= arm["ctr_ci"][1]
    assert sum(arm["requests"] for arm in ab["arms"].values()) == ab["plan"]["requests"] == 400
    assert 0.0 <= ab["p_value"] <= 1.0
    assert not ab["srm"]["flagged"]  # the service split 50/50 as declared
    report = json.loads(Path(ab["report"]).read_text())
    assert [arm["name"] for arm in report["arms"]] == ["popular", "pipeline"]
    assert report["comparisons"][0]["arm"] == "pipeline"

    skew = result["skew"]
    assert skew["declared_0.5"]["flagged"], skew
    assert not skew["declared_0.75"]["flagged"], skew
    assert skew["users"][0] > 2 * skew["users"][1]
    assert json.loads((tmp_path / "out" / "experiments.json").read_text())["checks"] == {
        "ab_significant_lift_for_the_pipeline": ab["pipeline_wins"],
        "srm_flagged_only_with_wrong_weights_skewed": True,
    }
