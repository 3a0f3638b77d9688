"""The reference profile: decile bins, samples, code counts and the JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.monitoring.profile import (
    MIN_TREND_MOMENTS,
    SAMPLE_SIZE,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    bin_index,
    bin_shares,
)


def rows(n: int = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "events_7d": rng.normal(5.0, 1.0, n),
            "seen_recently": (rng.random(n) < 0.3).astype(float),  # 70% zeros: a mass point
            "constant": np.full(n, 2.0),
            "category": rng.choice([1, 2, 3], size=n, p=[0.5, 0.3, 0.2]),
        }
    )
    return frame, rng.random(n) * 0.2


def build(seed: int = 0) -> ReferenceProfile:
    frame, scores = rows()
    return ReferenceProfile.build(
        frame,
        scores,
        numeric=["events_7d", "seen_recently", "constant"],
        categorical=["category"],
        label_metrics={"ctr": 0.05, "ndcg_at_10": 0.3, "ece": float("nan")},
        seed=seed,
    )


def test_decile_bins_hold_a_tenth_each() -> None:
    profile = build().numeric["events_7d"]
    assert len(profile.edges) == 9
    assert np.allclose(profile.shares, 0.1, atol=1e-3)
    assert profile.mean == pytest.approx(5.0, abs=0.05)
    assert profile.std == pytest.approx(1.0, abs=0.05)
    assert len(profile.sample) == SAMPLE_SIZE


def test_ties_and_constant_columns() -> None:
    profile = build()
    binary = profile.numeric["seen_recently"]
    assert binary.edges == (0.0, 1.0)  # every decile is 0 or 1: two edges after dedup
    assert binary.shares[0] == pytest.approx(0.7, abs=0.02)  # the zeros in (-inf, 0]
    assert binary.shares[2] == 0.0
    constant = profile.numeric["constant"]
    assert constant.edges == (2.0,)
    assert constant.shares == (1.0, 0.0)  # a larger live value would land in the empty bin


def test_bins_are_right_closed() -> None:
    edges = np.array([0.0, 1.0])
    assert bin_index(edges, np.array([-1.0, 0.0, 0.5, 1.0, 1.5])).tolist() == [0, 0, 1, 1, 2]
    assert bin_shares(edges, np.array([0.0, 0.0, 2.0, 2.0])).tolist() == [0.5, 0.0, 0.5]


def test_float32_rounding_keeps_values_on_their_edge() -> None:
    profile = NumericProfile.build([0.1] * 50 + [0.2] * 50)
    logged = np.array([0.1], dtype=np.float32).astype(np.float64)  # what the log hands back
    assert bin_index(profile.edges, logged).tolist() == [0]


def test_categorical_counts_and_label_metrics() -> None:
    profile = build()
    counts = profile.categorical["category"].counts
    assert set(counts) == {1, 2, 3}
    assert sum(counts.values()) == 20_000
    assert profile.categorical["category"].shares()[1] == pytest.approx(0.5, abs=0.02)
    assert profile.label_metrics == {"ctr": 0.05, "ndcg_at_10": 0.3}  # NaN ece is left out
    assert profile.prediction.max <= 0.2


def test_the_seed_fixes_the_sample() -> None:
    assert build(seed=1).numeric["events_7d"].sample == build(seed=1).numeric["events_7d"].sample
    assert build(seed=1).numeric["events_7d"].sample != build(seed=2).numeric["events_7d"].sample


def test_json_round_trip(tmp_path: Path) -> None:
    profile = build()
    path = profile.save(tmp_path / "profile.json")
    assert ReferenceProfile.load(path) == profile
    assert json.loads(path.read_text())["format"] == 1


def test_empty_column_profiles_to_one_bin() -> None:
    profile = NumericProfile.build([float("nan")] * 3)
    assert profile.n == 0
    assert profile.edges == ()
    assert profile.shares == (1.0,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"format": 99}', "format 99"),
        ('{"format": 1, "numeric": {}}', "missing key"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_profiles_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        ReferenceProfile.load(path)
    assert str(path) in str(info.value)


def test_missing_profile_and_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        ReferenceProfile.load(tmp_path / "absent.json")
    frame, scores = rows(100)
    with pytest.raises(ValueError, match="missing feature columns"):
        ReferenceProfile.build(frame, scores, numeric=["nope"])
    with pytest.raises(ValueError, match="100 rows but 3 scores"):
        ReferenceProfile.build(frame, scores[:3], numeric=["events_7d"])
    with pytest.raises(ValueError, match="unknown"):
        ReferenceProfile.build(frame, scores, numeric=["events_7d"], label_metrics={"auc": 0.7})


def clock_rows(n: int = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows over three days: ``age_days`` grows with the time (a clock), ``events_7d`` does not."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, 3.0, n))  # days
    frame = pd.DataFrame(
        {"age_days": 20.0 + times + rng.normal(0.0, 0.1, n), "events_7d": rng.normal(5, 1, n)}
    )
    return frame, rng.random(n), (times * 86_400e6).astype(np.int64)


def test_time_psi_marks_a_feature_that_follows_the_calendar(tmp_path: Path) -> None:
    frame, scores, times = clock_rows()
    profile = ReferenceProfile.build(frame, scores, numeric=["age_days", "events_7d"], times=times)
    age, events = profile.numeric["age_days"], profile.numeric["events_7d"]
    assert age.time_psi > 5.0  # the later half sits in the upper bins only
    assert age.trending
    assert events.time_psi < 0.01  # same distribution in both halves, up to noise
    assert not events.trending
    loaded = ReferenceProfile.load(profile.save(tmp_path / "p.json"))
    assert loaded.numeric["age_days"].time_psi == pytest.approx(age.time_psi)
    # Without times (or in a profile written before time PSI existed): unknown, not trending.
    untimed = ReferenceProfile.build(frame, scores, numeric=["age_days"])
    assert np.isnan(untimed.numeric["age_days"].time_psi)
    assert not untimed.numeric["age_days"].trending
    raw = json.loads((tmp_path / "p.json").read_text())
    del raw["numeric"]["age_days"]["time_psi"]
    assert not ReferenceProfile.from_dict(raw).numeric["age_days"].trending
    with pytest.raises(ValueError, match="times"):
        ReferenceProfile.build(frame, scores, numeric=["age_days"], times=times[:10])


def test_a_mass_point_at_the_top_gets_a_bin_of_its_own() -> None:
    """Every decile of a flag that is 1 in 95% of rows is 1.0; without an edge below the mass
    point the zeros would share its bin and a move to 50% ones would be invisible."""
    flag = NumericProfile.build([0.0] * 50 + [1.0] * 950)
    assert flag.edges == (0.0, 1.0)
    assert flag.shares == pytest.approx((0.05, 0.95, 0.0))
    # A ratio capped at 1.0 with 92% of rows at the cap: its spread gets (-inf, 0.875].
    capped = NumericProfile.build([i / 8 for i in range(8)] + [1.0] * 92)
    assert capped.edges == (0.875, 1.0)
    assert capped.shares == pytest.approx((0.08, 0.92, 0.0))
    # The mirrored flag (mass at the bottom) has nothing below it: one edge, as before.
    assert NumericProfile.build([0.0] * 950 + [1.0] * 50).edges == (0.0,)


def test_only_mass_points_get_an_extra_edge() -> None:
    """A mass point in the middle (20% of rows at 3.0, so two deciles) gets the bin
    ``(largest value below 3, 3]``; a continuous decile gets no extra edge."""
    values = np.r_[np.arange(1, 39) / 16, np.full(20, 3.0), 3.0 + np.arange(1, 43) / 16]
    profile = NumericProfile.build(values)
    below = 38 / 16  # the largest value under the mass point
    assert below in profile.edges
    assert 3.0 in profile.edges
    i = profile.edges.index(3.0)
    assert profile.edges[i - 1] == below
    assert profile.shares[i] == pytest.approx(0.2)  # the mass point alone in (below, 3]
    assert len(profile.edges) == len(set(np.quantile(values, np.arange(1, 10) / 10))) + 1


def test_old_profiles_keep_their_edges(tmp_path: Path) -> None:
    """A profile written before mass points got their bin (or before missing shares existed)
    loads as written: its edges are not recomputed, and nothing was missing."""
    raw = build().to_dict()
    raw["numeric"]["seen_recently"].update(edges=[1.0], shares=[1.0, 0.0])
    del raw["numeric"]["seen_recently"]["missing_share"]
    del raw["categorical"]["category"]["n_missing"]
    loaded = ReferenceProfile.from_dict(raw)
    assert loaded.numeric["seen_recently"].edges == (1.0,)
    assert loaded.numeric["seen_recently"].missing_share == 0.0
    assert loaded.categorical["category"].n_missing == 0


def test_the_missing_share_of_each_column(tmp_path: Path) -> None:
    """NaN and ±inf are missing numeric values, nulls missing codes; the share is over all
    reference values, and the finite ones alone are binned."""
    numeric = NumericProfile.build([1.0, 2.0, 3.0, np.nan, np.inf, -np.inf, 4.0, 5.0])
    assert numeric.n == 5
    assert numeric.missing_share == 3 / 8
    assert sum(numeric.shares) == pytest.approx(1.0)
    assert NumericProfile.build([np.nan] * 4).missing_share == 1.0
    assert NumericProfile.build([1.0, 2.0]).missing_share == 0.0
    codes = CategoricalProfile.build(np.array([1.0, 2.0, np.nan, 2.0]))
    assert codes.counts == {1: 1, 2: 2}
    assert codes.n_missing == 1
    assert codes.missing_share == 0.25
    frame = pd.DataFrame({"x": [1.0, np.nan, 3.0, 4.0], "c": [1.0, np.nan, np.nan, 2.0]})
    profile = ReferenceProfile.build(frame, np.zeros(4), numeric=["x"], categorical=["c"])
    loaded = ReferenceProfile.load(profile.save(tmp_path / "p.json"))
    assert loaded.numeric["x"].missing_share == 0.25
    assert loaded.categorical["c"].n_missing == 2
    assert loaded == profile
    raw = profile.to_dict()
    raw["numeric"]["x"]["missing_share"] = 1.5
    with pytest.raises(ValueError, match=r"missing_share 1\.5"):
        ReferenceProfile.from_dict(raw)


def test_time_psi_needs_enough_distinct_moments() -> None:
    """A trend measured on a few hundred request moments is noise: with fewer than
    MIN_TREND_MOMENTS distinct times in a half, the time PSI is unknown (not trending)."""
    rng = np.random.default_rng(0)

    def clock(n_moments: int) -> NumericProfile:
        times = np.repeat(np.arange(n_moments, dtype=float), 20)  # 20 candidates per moment
        return NumericProfile.build(times + rng.uniform(0, 1, len(times)), times=times)

    few = clock(2 * MIN_TREND_MOMENTS - 2)  # 249 moments in each half
    assert np.isnan(few.time_psi)
    assert not few.trending
    enough = clock(2 * MIN_TREND_MOMENTS)
    assert enough.time_psi > 5.0
    assert enough.trending
