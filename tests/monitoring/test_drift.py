"""PSI, KS and chi-squared against hand-computed values and scipy; compare() on live frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from mlsd.monitoring.drift import categorical_test, compare, ks_test
from mlsd.monitoring.profile import (
    PSI_EPSILON,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    bin_shares,
    psi,
)


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
    for bad in (math.nan, -1.0):  # NaN flagged nothing, a negative PSI everything
        with pytest.raises(ValueError, match="psi_threshold"):
            compare(reference(), frame, psi_threshold=bad)


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
    assert metrics["ks_pvalue_min"] == by_name["x"].p_value  # the clock's p = 0 left out
    # A stationary feature that shifts still drifts and alerts.
    shifted = later.assign(f_x=later["f_x"] + 1.0)
    assert compare(profile, shifted).metrics()["feature_psi_max"] > 0.25


def test_a_mass_point_at_the_top_drifts_like_one_at_the_bottom() -> None:
    """A flag at 95% ones moving to 50% ones is as large a shift as 95% zeros moving to 50%:
    (0.5 - 0.05) ln(0.5 / 0.05) + (0.5 - 0.95) ln(0.5 / 0.95) in both directions."""
    expected = 0.45 * math.log(10.0) + 0.45 * math.log(0.95 / 0.5)  # 1.325
    half = pd.DataFrame({"f_flag": [0.0, 1.0] * 500, "request_id": np.arange(1_000)})
    for ones in (950, 50):
        frame = pd.DataFrame({"flag": [1.0] * ones + [0.0] * (1_000 - ones)})
        profile = ReferenceProfile.build(frame, np.zeros(1_000), numeric=["flag"])
        (row,) = compare(profile, half).features
        assert row.psi == pytest.approx(expected), ones
        assert row.drifted


def by_hand(edges: tuple[float, ...], shares: tuple[float, ...], **kw: float) -> ReferenceProfile:
    """A profile of one numeric feature ``x`` with the given bins (and a flat prediction)."""
    x = NumericProfile(
        edges=edges, shares=shares, n=100, mean=0.0, std=1.0, min=-1.0, max=1.0,
        sample=(-1.0, 1.0), **kw,
    )  # fmt: skip
    return ReferenceProfile(numeric={"x": x}, categorical={}, prediction=x, n_rows=100)


def window(x: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"f_x": x, "request_id": np.arange(len(x))})


def test_missing_live_values_are_a_bin_of_their_own() -> None:
    """Half the live rows NaN: the reference's bins (no missing values) against the live
    rows' bins over every row, the NaN ones in the "missing" bin."""
    profile = by_hand((0.0,), (0.5, 0.5))
    report = compare(profile, window([-1.0] * 5 + [1.0] * 5 + [math.nan] * 10), min_requests=1)
    (row,) = report.features
    # reference [0.5, 0.5, 0], live [0.25, 0.25, 0.5]
    expected = 2 * (0.25 - 0.5) * math.log(0.5) + (0.5 - PSI_EPSILON) * math.log(0.5 / PSI_EPSILON)
    assert row.psi == pytest.approx(expected)
    assert row.drifted
    assert row.bins == ("≤ 0", "> 0", "missing")
    assert row.reference_shares == (0.5, 0.5, 0.0)
    assert row.live_shares == (0.25, 0.25, 0.5)
    assert row.missing_share == 0.5
    assert row.n_live == 10  # rows with a finite value
    assert row.p_value == pytest.approx(ks_test([-1.0, 1.0], [-1.0] * 5 + [1.0] * 5)[1])
    assert row.to_dict()["missing_share"] == 0.5
    # +inf is as missing as NaN
    inf = compare(profile, window([-1.0] * 5 + [1.0] * 5 + [math.inf] * 10), min_requests=1)
    assert inf.features[0].psi == pytest.approx(expected)


def test_the_reference_missing_share_scales_its_bins() -> None:
    profile = by_hand((0.0,), (0.5, 0.5), missing_share=0.2)  # reference [0.4, 0.4, 0.2]
    same = compare(profile, window([-1.0] * 4 + [1.0] * 4 + [math.nan] * 2), min_requests=1)
    assert same.features[0].psi == pytest.approx(0.0, abs=1e-12)
    assert same.features[0].reference_shares == pytest.approx((0.4, 0.4, 0.2))
    filled = compare(profile, window([-1.0] * 5 + [1.0] * 5), min_requests=1)
    (row,) = filled.features
    expected = 2 * 0.1 * math.log(0.5 / 0.4) + (PSI_EPSILON - 0.2) * math.log(PSI_EPSILON / 0.2)
    assert row.psi == pytest.approx(expected)
    assert row.bins[-1] == "missing"  # shown: the reference had missing values
    assert row.missing_share == 0.0


def test_without_missing_values_psi_is_over_the_reference_bins_alone() -> None:
    profile = reference()
    frame = live(2_000, shift=0.3)
    row = next(r for r in compare(profile, frame).features if r.name == "x")
    x = profile.numeric["x"]
    assert row.psi == psi(x.shares, bin_shares(x.edges, frame["f_x"].to_numpy(np.float64)))
    assert "missing" not in row.bins
    assert row.missing_share == 0.0


def test_a_feature_that_stops_being_filled_drifts() -> None:
    """Every live row NaN: the reference's bins are all empty live and the missing bin holds
    everything, a large finite PSI; a window without rows is still no data."""
    profile = by_hand((0.0,), (0.5, 0.5))
    (row,) = compare(profile, window([math.nan] * 200), min_requests=1).features
    emptied = 2 * (PSI_EPSILON - 0.5) * math.log(PSI_EPSILON / 0.5)  # the reference's bins
    filled = (1 - PSI_EPSILON) * math.log(1 / PSI_EPSILON)  # the missing bin
    assert row.psi == pytest.approx(emptied + filled)  # 17.7
    assert row.drifted
    assert row.n_live == 0
    assert row.missing_share == 1.0
    assert math.isnan(row.p_value)  # KS needs finite values on both sides
    (empty,) = compare(profile, window([]), min_requests=1).features
    assert math.isnan(empty.psi)
    assert not empty.drifted


def test_missing_codes_are_a_category_of_their_own() -> None:
    reference = CategoricalProfile(counts={1: 50, 2: 50})
    result = categorical_test(reference, [1] * 30 + [math.nan] * 20)
    # table [[50, 50, 0], [30, 0, 20]] (the empty "other" column dropped)
    assert result.categories == ("1", "2", "other", "missing")
    assert result.live_shares == (0.6, 0.0, 0.0, 0.4)
    assert result.chi2 == pytest.approx(65.625)
    assert result.p_value == pytest.approx(stats.chi2.sf(65.625, df=2))
    assert result.psi == pytest.approx(psi([0.5, 0.5, 0.0, 0.0], [0.6, 0.0, 0.0, 0.4]))
    assert result.n_live == 30
    assert result.missing_share == 0.4
    everything = categorical_test(reference, [math.nan] * 10)
    assert everything.psi == pytest.approx(psi([0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]))
    assert everything.p_value < 1e-6
    with_missing = CategoricalProfile(counts={1: 40, 2: 40}, n_missing=20)
    same = categorical_test(with_missing, [1] * 4 + [2] * 4 + [math.nan] * 2)
    assert same.reference_shares == (0.4, 0.4, 0.0, 0.2)
    assert same.psi == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(categorical_test(with_missing, []).psi)  # no rows: no data


def test_missing_columns_are_counted() -> None:
    frame = live(2_000)
    assert compare(reference(), frame).metrics()["n_missing_features"] == 0
    metrics = compare(reference(), frame.drop(columns=["f_y", "c_cat"])).metrics()
    assert metrics["n_missing_features"] == 2


def requests(n_requests: int, *, shift: float, rows_per_request: int = 50) -> pd.DataFrame:
    """``n_requests`` requests whose candidates share the request's (shifted) values."""
    frame = live(n_requests, shift=shift).loc[np.repeat(np.arange(n_requests), rows_per_request)]
    return frame.assign(request_id=[f"r{i}" for i in frame.index]).reset_index(drop=True)


def test_too_few_requests_are_not_judged() -> None:
    """Five requests are five samples, however many candidate rows they have: their PSI is
    reported, nothing is drifted and the PSI/KS metrics are left out (no data)."""
    few = requests(5, shift=3.0)
    report = compare(reference(), few)
    assert (report.n_requests, report.min_requests) == (5, 100)
    assert not report.judged
    assert report.note is not None
    assert "5 sampled requests" in report.note
    assert "100" in report.note
    assert max(r.psi for r in report.features) > 0.25
    assert not any(r.drifted for r in report.features)
    assert report.prediction is not None
    assert not report.prediction.drifted
    assert report.metrics() == {"n_missing_features": 0.0}
    assert report.to_dict()["n_requests"] == 5
    enough = compare(reference(), few, min_requests=5)
    assert enough.judged
    assert enough.note is None
    assert enough.metrics()["feature_psi_max"] > 0.25
    assert enough.metrics()["n_drifted_features"] >= 1
    # Without a request_id column every row counts as a request.
    assert compare(reference(), few.drop(columns=["request_id"])).n_requests == 250
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="min_requests"):
            compare(reference(), few, min_requests=bad)  # type: ignore[arg-type]
