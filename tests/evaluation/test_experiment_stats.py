"""The A/B statistics against closed forms, scipy, a bootstrap and simulation."""

from __future__ import annotations

import doctest
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from mlsd.evaluation import experiment_stats
from mlsd.evaluation.experiment_stats import (
    design_effect,
    holm,
    mean_ci,
    power,
    ratio_ci,
    ratio_delta_test,
    sample_size,
    srm_test,
    two_proportion_ztest,
    welch_ttest,
    wilson_ci,
)
from mlsd.evaluation.experiments import Arm, Experiment
from tests.evaluation.test_experiments import AB


def test_two_proportion_ztest_hand_computed() -> None:
    result = two_proportion_ztest(200, 1000, 250, 1000)
    # pooled p = 0.225, SE = sqrt(0.225 * 0.775 * 2 / 1000) = 0.0186749; z = 0.05 / SE
    assert result.statistic == pytest.approx(0.05 / 0.0186749, rel=1e-5)
    assert result.statistic == pytest.approx(2.67740, abs=1e-4)
    assert result.p_value == pytest.approx(math.erfc(2.67740 / math.sqrt(2)), rel=1e-4)
    # CI of the difference with the unpooled SE sqrt(.2*.8/1000 + .25*.75/1000) = 0.0186414
    half = 1.959964 * 0.0186414
    assert (result.low, result.high) == pytest.approx((0.05 - half, 0.05 + half), abs=1e-6)
    assert result.relative_lift == pytest.approx(0.25)
    assert result.significant
    assert not two_proportion_ztest(200, 1000, 210, 1000).significant
    # impossible counts were a bare "math domain error"
    with pytest.raises(ValueError, match=r"^treatment: 1200 successes of 1000 trials"):
        two_proportion_ztest(200, 1000, 1200, 1000)
    with pytest.raises(ValueError, match=r"^control: -5 successes of 100 trials"):
        two_proportion_ztest(-5, 100, 5, 100)


def test_welch_ttest_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    control, treated = rng.normal(1.0, 1.0, 80), rng.normal(1.4, 2.5, 45)
    result = welch_ttest(control, treated, alpha=0.1)
    reference = stats.ttest_ind(treated, control, equal_var=False)
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)
    low, high = reference.confidence_interval(confidence_level=0.9)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-10)
    assert result.difference == pytest.approx(treated.mean() - control.mean())


def test_delta_method_hand_computed_and_binomial_special_case() -> None:
    # c = [1, 0, 2], e = [2, 1, 3]: R = 0.5, var c = var e = cov = 1, mean e = 2
    # Var(R) = (1 - 2 * 0.5 * 1 + 0.25 * 1) / (3 * 2**2) = 0.25 / 12
    ci = ratio_ci([1, 0, 2], [2, 1, 3])
    assert ci.value == 0.5
    assert ci.high - ci.value == pytest.approx(1.959964 * math.sqrt(0.25 / 12), rel=1e-6)
    # one exposure per user: the delta variance is the binomial p(1 - p) / (n - 1)
    clicks = np.r_[np.ones(30), np.zeros(70)]
    ci = ratio_ci(clicks, np.ones(100))
    assert ci.high - ci.value == pytest.approx(1.959964 * math.sqrt(0.3 * 0.7 / 99), rel=1e-6)


def test_delta_method_matches_a_bootstrap_over_users() -> None:
    rng = np.random.default_rng(3)
    exposures = 1 + rng.poisson(8, 3000)
    clicks = rng.binomial(exposures, rng.beta(1, 9, 3000))
    rows = rng.integers(0, 3000, (400, 3000))
    boot = clicks[rows].sum(axis=1) / exposures[rows].sum(axis=1)
    ci = ratio_ci(clicks, exposures)
    assert (ci.high - ci.value) / 1.959964 == pytest.approx(boot.std(), rel=0.1)
    test = ratio_delta_test(clicks, exposures, clicks * 2, exposures * 2)
    assert test.difference == 0
    assert test.p_value == pytest.approx(1.0)


def test_mean_and_wilson_intervals() -> None:
    ci = mean_ci([1.0, 2.0, 3.0, 6.0])
    reference = stats.t.interval(0.95, 3, loc=3.0, scale=stats.sem([1.0, 2.0, 3.0, 6.0]))
    assert (ci.low, ci.high) == pytest.approx(reference)
    wilson = wilson_ci(3, 40)
    reference = stats.binomtest(3, 40).proportion_ci(confidence_level=0.95, method="wilson")
    assert (wilson.low, wilson.high) == pytest.approx((reference.low, reference.high))
    with pytest.raises(ValueError, match="wilson_ci: 41 successes of 40 trials"):
        wilson_ci(41, 40)


def test_srm_matches_scipy_and_flags_a_skewed_split() -> None:
    result = srm_test([480, 520, 1000], [1, 1, 2])
    reference = stats.chisquare([480, 520, 1000], [500, 500, 1000])
    assert (result.statistic, result.p_value) == pytest.approx(tuple(reference))

    users = np.arange(20_000)
    skewed = Experiment("srm", "s", (Arm("a", "x", 0.55), Arm("b", "y", 0.45))).assign_many(users)
    fair = AB.assign_many(users)
    counts = [int(np.sum(skewed == "a")), int(np.sum(skewed == "b"))]
    assert srm_test(counts, AB.weights).flagged  # a 55/45 split checked against 50/50
    assert srm_test(counts, AB.weights).p_value < 1e-20
    assert not srm_test([int(np.sum(fair == a.name)) for a in AB.arms], AB.weights).flagged


def test_sample_size_hand_computed_and_inverse_of_power() -> None:
    # p1 = 0.05, p2 = 0.0525, pooled 0.05125; n = (1.959964 sqrt(2 p q) + 0.841621
    # sqrt(p1 q1 + p2 q2))^2 / 0.0025^2
    spread = 1.959964 * math.sqrt(2 * 0.05125 * 0.94875) + 0.841621 * math.sqrt(
        0.05 * 0.95 + 0.0525 * 0.9475
    )
    n = sample_size(0.05, 0.05, alpha=0.05, power=0.8)
    assert n == math.ceil(spread**2 / 0.0025**2) == 122124
    assert power(0.05, 0.05, n_per_arm=n) >= 0.8 > power(0.05, 0.05, n_per_arm=n - 1)
    assert sample_size(0.05, 0.05, two_sided=False) < n  # one-sided needs fewer users
    assert sample_size(0.05, -0.05) > 0  # a drop is detected too
    with pytest.raises(ValueError, match="baseline_ctr"):
        sample_size(1.2, 0.05)


def test_sample_size_gives_the_target_power_by_simulation() -> None:
    n = sample_size(0.10, 0.20, alpha=0.05, power=0.8)
    rng = np.random.default_rng(11)
    control, treated = rng.binomial(n, 0.10, 4000), rng.binomial(n, 0.12, 4000)
    pooled = (control + treated) / (2 * n)
    z = (treated - control) / n / np.sqrt(pooled * (1 - pooled) * 2 / n)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.025)


def test_users_per_arm_divide_the_exposures_by_m_over_the_design_effect() -> None:
    exposures = sample_size(0.05, 0.1)  # 31,234 independent exposures
    assert design_effect(1, 0.3) == 1.0
    assert design_effect(11, 0.05) == pytest.approx(1.5)
    assert sample_size(0.05, 0.1, exposures_per_user=11) == math.ceil(exposures / 11) == 2840
    assert sample_size(0.05, 0.1, exposures_per_user=11, icc=0.05) == math.ceil(
        exposures * 1.5 / 11
    )
    # a measured design effect stands in for 1 + (m - 1) icc
    assert sample_size(0.05, 0.1, exposures_per_user=11, design_effect=1.5) == 4260
    assert sample_size(0.05, 0.1, exposures_per_user=11, icc=1.0) == exposures  # all alike
    for users, m, icc in ((2840, 11, 0.0), (4260, 11, 0.05)):
        achieved = power(0.05, 0.1, n_per_arm=users, exposures_per_user=m, icc=icc)
        assert (
            achieved >= 0.8 > power(0.05, 0.1, n_per_arm=users - 1, exposures_per_user=m, icc=icc)
        )
    bad_input: list[tuple[dict[str, Any], str]] = [
        ({"exposures_per_user": 0.5}, "exposures_per_user"),
        ({"exposures_per_user": 3, "icc": 1.5}, "icc"),
        ({"icc": 0.1, "design_effect": 1.2}, "not both"),
        ({"design_effect": 0.0}, "design_effect"),
    ]
    for bad, message in bad_input:
        with pytest.raises(ValueError, match=message):
            sample_size(0.05, 0.1, **bad)


def test_holm_hand_computed() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> kept rising
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.02, math.nan, 0.04])  # a NaN neither counts nor moves
    assert adjusted[0] == pytest.approx(0.04)
    assert math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.04)
    assert holm([0.9, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_docstring_examples_run() -> None:
    assert doctest.testmod(experiment_stats).failed == 0
