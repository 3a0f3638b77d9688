"""PSI, KS and chi-squared against hand-computed values and scipy; compare() on live frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from mlsd.monitoring.drift import categorical_test, compare, ks_test
from mlsd.monitoring.profile import PSI_EPSILON, CategoricalProfile, ReferenceProfile, psi


def test_psi_by_hand() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0


def test_psi_floors_empty_bins_at_epsilon() -> None:
    expected = -0.25 * math.log(0.5) + (0.25 - PSI_EPSILON) * math.log(0.25 / PSI_EPSILON)
    assert psi([0.5, 0.5, 0.0], [0.5, 0.25, 0.25]) == pytest.approx(expected)
    assert math.isfinite(psi([1.0, 0.0], [0.0, 1.0]))
    with pytest.raises(ValueError, match="bins"):
        psi([0.5, 0.5], [1.0])


def test_ks_matches_scipy() -> None:
    assert ks_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])[0] == 1.0  # disjoint: D = 1
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(0.3, size=800)
    expected = stats.ks_2samp(a, b)
    assert ks_test(a, b) == pytest.approx((expected.statistic, expected.pvalue))
    assert all(math.isnan(v) for v in ks_test([], [1.0]))


def test_chi2_by_hand_with_unseen_codes_pooled() -> None:
    reference = CategoricalProfile(counts={1: 50, 2: 50})
    result = categorical_test(reference, [1] * 30 + [2] * 10 + [7] * 6 + [9] * 4)
    # table [[50, 50, 0], [30, 10, 10]]: expected [[53.3, 40, 6.67], [26.7, 20, 3.33]]
    assert result.categories == ("1", "2", "other")
    assert result.live_shares == (0.6, 0.2, 0.2)
    assert result.chi2 == pytest.approx(28.125)
    assert result.p_value == pytest.approx(stats.chi2.sf(28.125, df=2))
    assert result.psi == pytest.approx(psi([0.5, 0.5, 0.0], [0.6, 0.2, 0.2]))
    assert result.n_live == 50


def test_chi2_of_the_same_shares_is_zero() -> None:
    result = categorical_test(CategoricalProfile(counts={1: 60, 2: 40}), [1] * 30 + [2] * 20)
    assert result.chi2 == pytest.approx(0.0)
    assert result.p_value == pytest.approx(1.0)
    assert result.psi == pytest.approx(0.0)


def reference(n: int = 20_000) -> ReferenceProfile:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"x": rng.normal(5.0, 1.0, n), "y": rng.exponential(2.0, n), "cat": rng.integers(1, 5, n)}
    )
    scores = 1 / (1 + np.exp(-rng.normal(-2.0, 1.0, n)))
    return ReferenceProfile.build(frame, scores, numeric=["x", "y"], categorical=["cat"])


def live(n: int, *, shift: float = 0.0, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "f_x": rng.normal(5.0 + shift, 1.0, n).astype(np.float32),
            "f_y": rng.exponential(2.0, n).astype(np.float32),
            "c_cat": rng.integers(1, 5 + (shift > 0) * 3, n).astype(np.int32),  # shift: new codes
            "score": (1 / (1 + np.exp(-rng.normal(-2.0 + shift, 1.0, n)))).astype(np.float32),
            "user_id": np.arange(n),
        }
    )


def test_identical_distributions_do_not_drift() -> None:
    report = compare(reference(), live(20_000))
    assert [r.name for r in report.features] == ["x", "y", "cat"]
    for row in [*report.features, report.prediction]:
        assert row is not None
        assert row.psi < 0.01, row.name
        assert not row.drifted
        assert row.n_live == 20_000
    assert report.metrics()["feature_psi_max"] < 0.01
    assert report.metrics()["ks_pvalue_min"] > 0.001
    assert report.missing == ()


def test_a_shifted_feature_and_prediction_drift() -> None:
    report = compare(reference(), live(5_000, shift=1.0))
    by_name = {r.name: r for r in report.features}
    assert by_name["x"].psi > 0.25
    assert by_name["x"].drifted
    assert by_name["x"].p_value < 1e-6
    assert by_name["y"].psi < 0.05  # untouched column
    assert by_name["cat"].drifted  # 3 of 7 codes unseen: "other" holds ~43%
    assert by_name["cat"].live_shares[-1] == pytest.approx(3 / 7, abs=0.03)
    assert report.prediction is not None
    assert report.prediction.drifted
    metrics = report.metrics()
    assert metrics["feature_psi_max"] == max(r.psi for r in report.features)
    assert metrics["n_drifted_features"] == 2
    assert report.ranked()[0].psi == metrics["feature_psi_max"]


def test_arrow_input_missing_columns_and_threshold() -> None:
    frame = live(2_000, shift=0.3)
    as_arrow = compare(reference(), pa.Table.from_pandas(frame.drop(columns=["f_y"])))
    assert as_arrow.missing == ("f_y",)
    as_pandas = compare(reference(), frame.drop(columns=["f_y"]))
    assert [r.psi for r in as_arrow.features] == [r.psi for r in as_pandas.features]
    strict = compare(reference(), frame, psi_threshold=0.01)
    assert {r.name for r in strict.features if r.drifted} >= {"x"}


def test_no_score_column_means_no_prediction_metric() -> None:
    report = compare(reference(), live(100).drop(columns=["score"]))
    assert report.prediction is None
    assert "prediction_psi" not in report.metrics()


def test_a_trending_feature_is_reported_but_neither_drifted_nor_alerting() -> None:
    """A feature that moved within the reference window itself (a clock) moves on after it:
    its PSI is reported as ``trending_psi_max``, not as ``feature_psi_max``."""
    rng = np.random.default_rng(3)
    n = 20_000
    times = np.sort(rng.uniform(0.0, 3.0, n))
    frame = pd.DataFrame({"age": 20.0 + times, "x": rng.normal(5.0, 1.0, n)})
    profile = ReferenceProfile.build(frame, rng.random(n), numeric=["age", "x"], times=times)
    later = pd.DataFrame(
        {"f_age": 24.0 + rng.uniform(0, 1, 5_000), "f_x": rng.normal(5.0, 1.0, 5_000)}
    )
    by_name = {r.name: r for r in compare(profile, later).features}
    assert by_name["age"].trending
    assert by_name["age"].psi > 5.0
    assert not by_name["age"].drifted
    assert not by_name["x"].trending
    metrics = compare(profile, later).metrics()
    assert metrics["trending_psi_max"] == by_name["age"].psi
    assert metrics["feature_psi_max"] == by_name["x"].psi < 0.05
    assert metrics["n_drifted_features"] == 0
    # A stationary feature that shifts still drifts and alerts.
    shifted = later.assign(f_x=later["f_x"] + 1.0)
    assert compare(profile, shifted).metrics()["feature_psi_max"] > 0.25
