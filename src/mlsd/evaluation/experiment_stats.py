"""The statistics of an A/B experiment: tests, intervals, sample-ratio mismatch, sizing, Holm.

Every two-sample function takes the control first and reports treatment − control. Why the
report decides on the delta-method ratio test over users (and not the per-exposure z-test), how
:func:`sample_size` sizes that test, and how :func:`holm` adjusts several arms: see
:mod:`mlsd.evaluation.experiments`, which uses these over the service log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from mlsd.evaluation.experiment_log import EmptyLogError, read_units
from mlsd.monitoring.log_reader import DEFAULT_ATTRIBUTION_WINDOW_S

SRM_THRESHOLD = 0.001
"""p-value below which the sample-ratio-mismatch check flags the split."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """Treatment vs control: the difference, its CI, the test statistic and the p-value."""

    control: float
    treatment: float
    difference: float
    low: float
    high: float
    statistic: float
    p_value: float
    alpha: float

    @property
    def relative_lift(self) -> float:
        """``difference / control`` (NaN when the control is 0)."""
        return self.difference / self.control if self.control else math.nan

    @property
    def significant(self) -> bool:
        return bool(self.p_value < self.alpha)


_NORMAL = NormalDist()  # the stdlib's is exact to ~1e-15 and far cheaper per call than scipy's


def _z(alpha: float, *, two_sided: bool = True) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return _NORMAL.inv_cdf(1 - alpha / 2 if two_sided else 1 - alpha)


def _normal_comparison(
    control: float, treatment: float, se_test: float, se_ci: float, alpha: float
) -> Comparison:
    difference = treatment - control
    statistic = difference / se_test if se_test > 0 else math.nan
    p_value = 2 * _NORMAL.cdf(-abs(statistic)) if se_test > 0 else math.nan
    half = _z(alpha) * se_ci
    return Comparison(
        control, treatment, difference, difference - half, difference + half,
        statistic, p_value, alpha,
    )  # fmt: skip


def two_proportion_ztest(
    successes_control: int,
    trials_control: int,
    successes_treatment: int,
    trials_treatment: int,
    *,
    alpha: float = 0.05,
) -> Comparison:
    """Two-sided z-test of two proportions: pooled SE for the test, unpooled (Wald) for the CI."""
    if min(trials_control, trials_treatment) <= 0:
        raise ValueError("two_proportion_ztest needs at least one trial in each group")
    _check_counts(successes_control, trials_control, "control")
    _check_counts(successes_treatment, trials_treatment, "treatment")
    p_c, p_t = successes_control / trials_control, successes_treatment / trials_treatment
    pooled = (successes_control + successes_treatment) / (trials_control + trials_treatment)
    inv_n = 1 / trials_control + 1 / trials_treatment
    se_test = math.sqrt(pooled * (1 - pooled) * inv_n)
    se_ci = math.sqrt(p_c * (1 - p_c) / trials_control + p_t * (1 - p_t) / trials_treatment)
    return _normal_comparison(p_c, p_t, se_test, se_ci, alpha)


def _check_counts(successes: float, trials: float, group: str) -> None:
    """A ValueError naming ``group`` unless ``0 <= successes <= trials`` (a success is a trial
    that succeeded: a click is on an exposure)."""
    if not 0 <= successes <= trials:
        raise ValueError(
            f"{group}: {successes} successes of {trials} trials; successes must be between 0 "
            "and the trials (clicked exposures, not click events)"
        )


def welch_ttest(
    x_control: npt.ArrayLike, x_treatment: npt.ArrayLike, *, alpha: float = 0.05
) -> Comparison:
    """Welch's unequal-variance t-test of two means, with the Welch–Satterthwaite CI."""
    a = np.asarray(x_control, dtype=np.float64).reshape(-1)
    b = np.asarray(x_treatment, dtype=np.float64).reshape(-1)
    if min(a.size, b.size) < 2:
        raise ValueError("welch_ttest needs at least 2 values in each group")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    difference = float(b.mean() - a.mean())
    if se == 0:  # both groups constant: no test
        nan = math.nan
        return Comparison(float(a.mean()), float(b.mean()), difference, nan, nan, nan, nan, alpha)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    statistic = difference / se
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    p_value = float(2 * stats.t.sf(abs(statistic), df))
    return Comparison(
        float(a.mean()), float(b.mean()), difference, difference - half, difference + half,
        statistic, p_value, alpha,
    )  # fmt: skip


def _ratio_mean_var(numerators: npt.ArrayLike, denominators: npt.ArrayLike) -> tuple[float, float]:
    """``sum(num) / sum(den)`` over units and its delta-method variance."""
    c = np.asarray(numerators, dtype=np.float64).reshape(-1)
    e = np.asarray(denominators, dtype=np.float64).reshape(-1)
    if c.size != e.size or c.size < 2 or e.sum() <= 0:
        raise ValueError("a ratio metric needs >= 2 units with matching arrays and exposures")
    ratio = c.sum() / e.sum()
    cov = np.cov(c, e, ddof=1)
    var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (c.size * e.mean() ** 2)
    return float(ratio), float(max(var, 0.0))


def ratio_ci(
    numerators: npt.ArrayLike, denominators: npt.ArrayLike, *, alpha: float = 0.05
) -> Estimate:
    """A ratio metric over units (e.g. CTR = clicks / exposures per user) with its delta CI."""
    ratio, var = _ratio_mean_var(numerators, denominators)
    half = _z(alpha) * math.sqrt(var)
    return Estimate(ratio, ratio - half, ratio + half)


def ratio_delta_test(
    numerators_control: npt.ArrayLike,
    denominators_control: npt.ArrayLike,
    numerators_treatment: npt.ArrayLike,
    denominators_treatment: npt.ArrayLike,
    *,
    alpha: float = 0.05,
) -> Comparison:
    """z-test of a ratio metric between arms, its variance by the delta method over units.

    Args:
        numerators_control: (n_control,) per-unit numerators, e.g. clicks.
        denominators_control: (n_control,) per-unit denominators, e.g. exposures.
        numerators_treatment, denominators_treatment: the same for the treatment arm.
    """
    r_c, v_c = _ratio_mean_var(numerators_control, denominators_control)
    r_t, v_t = _ratio_mean_var(numerators_treatment, denominators_treatment)
    se = math.sqrt(v_c + v_t)
    return _normal_comparison(r_c, r_t, se, se, alpha)


def mean_ci(values: npt.ArrayLike, *, alpha: float = 0.05) -> Estimate:
    """Mean with its Student-t confidence interval."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size < 2:
        mean = float(x.mean()) if x.size else math.nan
        return Estimate(mean, math.nan, math.nan)
    half = float(stats.t.ppf(1 - alpha / 2, x.size - 1)) * x.std(ddof=1) / math.sqrt(x.size)
    return Estimate(float(x.mean()), float(x.mean() - half), float(x.mean() + half))


def wilson_ci(successes: int, trials: int, *, alpha: float = 0.05) -> Estimate:
    """A proportion with its Wilson score interval (sound for small counts and p near 0)."""
    if trials <= 0:
        return Estimate(math.nan, math.nan, math.nan)
    _check_counts(successes, trials, "wilson_ci")
    z, p = _z(alpha), successes / trials
    centre = (p + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z**2 / (4 * trials**2)) / (1 + z**2 / trials)
    return Estimate(p, centre - half, centre + half)


@dataclass(frozen=True)
class SRMResult:
    """Sample-ratio mismatch: observed vs expected units per arm, chi-squared test."""

    observed: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    p_value: float
    threshold: float

    @property
    def flagged(self) -> bool:
        return bool(self.p_value < self.threshold)


def srm_test(
    counts: npt.ArrayLike, weights: npt.ArrayLike, *, threshold: float = SRM_THRESHOLD
) -> SRMResult:
    """Chi-squared goodness of fit of units per arm to the configured weights."""
    observed = np.asarray(counts, dtype=np.float64).reshape(-1)
    shares = np.asarray(weights, dtype=np.float64).reshape(-1)
    if observed.size != shares.size or observed.size < 2 or (shares <= 0).any():
        raise ValueError("srm_test needs >= 2 arms, one positive weight per count")
    expected = observed.sum() * shares / shares.sum()
    if observed.sum() == 0:
        statistic, p_value = math.nan, math.nan
    else:
        statistic = float(((observed - expected) ** 2 / expected).sum())
        p_value = float(stats.chi2.sf(statistic, observed.size - 1))
    return SRMResult(
        tuple(int(c) for c in observed), tuple(float(e) for e in expected),
        statistic, p_value, threshold,
    )  # fmt: skip


def _rates(baseline_ctr: float, mde: float) -> tuple[float, float]:
    treated = baseline_ctr * (1 + mde)
    if not 0 < baseline_ctr < 1 or not 0 < treated < 1 or mde == 0:
        raise ValueError(
            f"need 0 < baseline_ctr < 1 and a non-zero relative mde keeping the treated rate "
            f"in (0, 1); got baseline_ctr={baseline_ctr}, mde={mde}"
        )
    return baseline_ctr, treated


def design_effect(exposures_per_user: float, icc: float) -> float:
    """``1 + (m - 1) ρ``: the variance of a CTR over users who see ``m`` items each, over the
    variance of the same number of independent exposures.

    A user clicks each of their ``m`` exposures with a rate of their own, spread around the CTR
    ``p`` with variance ``ρ p (1 - p)``; ``ρ`` (``icc``) is the correlation of two clicks of
    one user. The user's clicks then vary ``1 + (m - 1) ρ`` times as much as ``m`` independent
    clicks, and so does the delta-method CTR of the report. ``ρ = 0`` (independent clicks)
    gives 1. When users see different numbers of items, ``m`` here is ``E[e²] / E[e]`` of the
    exposures ``e`` per user, more than their mean; :func:`sample_size` still converts
    exposures to users by the mean, so size such users with ``exposures_per_user`` = the mean
    and ``design_effect=design_effect(E[e²] / E[e], ρ)``, or a :class:`Pilot`'s measured
    design effect (passing ``E[e²] / E[e]`` as ``exposures_per_user`` with ``icc`` would give
    too few users: 12,213 instead of 23,204 for ``e`` geometric with mean 10, ρ = 0.05, a CTR
    of 0.05 and a 5% lift).
    """
    if not (exposures_per_user >= 1 and math.isfinite(exposures_per_user)):
        raise ValueError(
            f"exposures_per_user must be a finite number >= 1, got {exposures_per_user}"
        )
    if not 0.0 <= icc <= 1.0:
        raise ValueError(f"icc (intra-user correlation of clicks) must be in [0, 1], got {icc}")
    return 1.0 + (exposures_per_user - 1.0) * icc


def _effect_per_user(
    exposures_per_user: float, icc: float | None, measured: float | None
) -> tuple[float, float]:
    """(m, design effect): ``measured`` (a :class:`Pilot`'s) or ``1 + (m - 1) icc``."""
    if measured is None:
        return exposures_per_user, design_effect(exposures_per_user, icc or 0.0)
    if icc is not None:
        raise ValueError("pass icc or a measured design_effect, not both")
    if not (measured > 0 and math.isfinite(measured)):
        raise ValueError(f"design_effect must be a positive finite number, got {measured}")
    if not (exposures_per_user > 0 and math.isfinite(exposures_per_user)):
        raise ValueError(f"exposures_per_user must be a positive number, got {exposures_per_user}")
    return exposures_per_user, measured


def sample_size(
    baseline_ctr: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    two_sided: bool = True,
    exposures_per_user: float = 1.0,
    icc: float | None = None,
    design_effect: float | None = None,
) -> int:
    """Users per arm for the report's decision test (the delta-method CTR over users, see the
    module) to detect a relative lift ``mde`` of the CTR.

    First the independent exposures the two-proportion z-test needs, by the normal
    approximation ``n = (z_α √(2 p̄ q̄) + z_β √(p₁q₁ + p₂q₂))² / (p₂ − p₁)²`` with
    ``p₂ = p₁ (1 + mde)``; then the users whose exposures carry as much information::

        users = ceil(n · (1 + (m − 1) ρ) / m)

    **The assumption**: each user sees ``m`` (``exposures_per_user``) items and clicks them with
    an intra-user correlation ``ρ`` (``icc``, :func:`design_effect`). With the defaults (one
    exposure per user) this is ``n`` itself, the count of independent exposures. ``icc``
    defaults to 0, independent clicks: the fewest users, and so a lower bound whenever users
    differ in how much they click, as they do in a feed (ρ = 0.05 with 11 exposures a user
    needs 1.5 times the users of ρ = 0). Measure ``m`` and the design effect on a pilot's log
    (:func:`read_pilot`) and pass ``design_effect`` (in place of ``icc``) with
    ``exposures_per_user`` = the pilot's mean exposures per user: that also covers users who
    see different numbers of items.

    >>> sample_size(0.05, 0.05, alpha=0.05, power=0.8)
    122124
    >>> sample_size(0.05, 0.05, exposures_per_user=10, icc=0.05)
    17708
    """
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    m, effect = _effect_per_user(exposures_per_user, icc, design_effect)
    p1, p2 = _rates(baseline_ctr, mde)
    pooled = (p1 + p2) / 2
    z_alpha, z_beta = _z(alpha, two_sided=two_sided), _NORMAL.inv_cdf(power)
    spread = z_alpha * math.sqrt(2 * pooled * (1 - pooled)) + z_beta * math.sqrt(
        p1 * (1 - p1) + p2 * (1 - p2)
    )
    exposures = math.ceil(spread**2 / (p2 - p1) ** 2)
    # the 1e-9 keeps a product that is an integer in exact arithmetic from rounding up
    return math.ceil(exposures * effect / m - 1e-9)


def power(
    baseline_ctr: float,
    mde: float,
    *,
    n_per_arm: int,
    alpha: float = 0.05,
    two_sided: bool = True,
    exposures_per_user: float = 1.0,
    icc: float | None = None,
    design_effect: float | None = None,
) -> float:
    """Power of the decision test with ``n_per_arm`` users (inverse of :func:`sample_size`,
    under the same assumption): the two-proportion z-test over the
    ``n_per_arm · m / (1 + (m − 1) ρ)`` independent exposures they are worth."""
    if n_per_arm < 1:
        raise ValueError(f"n_per_arm must be >= 1, got {n_per_arm}")
    m, effect = _effect_per_user(exposures_per_user, icc, design_effect)
    n = n_per_arm * m / effect
    p1, p2 = _rates(baseline_ctr, mde)
    pooled = (p1 + p2) / 2
    se_null = math.sqrt(2 * pooled * (1 - pooled) / n)
    se_alt = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    z_alpha, delta = _z(alpha, two_sided=two_sided), abs(p2 - p1)
    result = _NORMAL.cdf((delta - z_alpha * se_null) / se_alt)
    if two_sided:  # rejecting in the wrong direction also counts as a rejection
        result += _NORMAL.cdf((-delta - z_alpha * se_null) / se_alt)
    return float(result)


@dataclass(frozen=True)
class Pilot:
    """What a pilot's service log says about the units an experiment would see.

    ``design_effect`` is the delta-method variance of the pilot's CTR over units (the report's
    decision statistic) over the binomial variance of as many independent exposures; it holds
    both the correlation of a user's clicks and the spread of exposures per user, so
    :func:`sample_size` with it and ``exposures_per_user`` needs no ``icc``.
    """

    units: int
    exposures_per_user: float
    """Mean exposures per unit (units without exposures count: they are randomised too)."""
    ctr: float
    design_effect: float
    exposures_per_exposure: float
    """``E[e²] / E[e]``: the exposures of the unit an exposure belongs to, averaged over
    exposures; the ``m`` of :func:`design_effect` (the mean when every unit sees as many)."""

    @property
    def icc(self) -> float:
        """The intra-user correlation of clicks that gives this design effect:
        ``(design_effect - 1) / (E[e²] / E[e] - 1)`` (NaN when no unit sees more than one item:
        nothing to correlate)."""
        if self.exposures_per_exposure <= 1:
            return math.nan
        return (self.design_effect - 1) / (self.exposures_per_exposure - 1)

    @classmethod
    def from_units(cls, units: pd.DataFrame) -> Pilot:
        """From :func:`read_units`' rows; a unit logged in several arms counts once, summed."""
        per_unit = units.groupby(["user_id", "anonymous_request"])[["exposures", "clicks"]].sum()
        clicks = per_unit["clicks"].to_numpy(np.float64)
        exposures = per_unit["exposures"].to_numpy(np.float64)
        if len(per_unit) < 2 or exposures.sum() <= 0:
            raise ValueError(
                f"the pilot has {len(per_unit)} unit(s) and {int(exposures.sum())} exposure(s): "
                "too few to measure a variance; use a longer window"
            )
        ctr, var = _ratio_mean_var(clicks, exposures)
        if not 0 < ctr < 1:
            raise ValueError(
                f"the pilot's CTR is {ctr:g} over {int(exposures.sum()):,} exposures: no design "
                "effect to measure; size with exposures_per_user and icc (--exposures-per-user, "
                "--icc) instead"
            )
        effect = var * exposures.sum() / (ctr * (1 - ctr))
        weighted = float((exposures**2).sum() / exposures.sum())
        return cls(len(per_unit), float(exposures.mean()), ctr, float(effect), weighted)


def read_pilot(
    log_dir: Path | str,
    experiment_name: str = "",
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
) -> Pilot:
    """The :class:`Pilot` of the service log's traffic in ``[start, end)``: of the experiment
    ``experiment_name``, all arms pooled (an A/A run), or by default of the requests outside any
    experiment (logged with experiment ``""``).

    Give the window the experiment's planned duration: users come back, so the exposures per
    user, and with them the design effect, grow with the window.

    Raises:
        EmptyLogError: no such traffic in the window.
    """
    units = read_units(
        log_dir, experiment_name, start=start, end=end, attribution_window_s=attribution_window_s
    )
    if units.empty:
        what = f"experiment {experiment_name!r}" if experiment_name else "outside any experiment"
        window = f" between {start or 'the start'} and {end or 'the end'}"
        raise EmptyLogError(
            f"{log_dir}: no requests {what}{window} for a pilot; check the log directory, "
            "the experiment name and the window"
        )
    return Pilot.from_units(units)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1),
    made non-decreasing in that order and capped at 1; a hypothesis is rejected at ``alpha``
    when its adjusted p-value is below it. It controls the chance of any false rejection
    among the m at ``alpha``, without assuming the tests independent (arms compared with one
    control are not). NaN p-values stay NaN and do not count in m.

    >>> holm([0.25, 0.01, 0.5])
    [0.5, 0.03, 0.5]
    """
    values = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(values), math.nan)
    finite = np.flatnonzero(~np.isnan(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    m = len(order)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(values[index])))
        out[index] = running
    return [float(v) for v in out]
