"""Online A/B experiments: deterministic assignment, the statistics, and the report over the log.

**Assignment.** A unit (a user, or one request of an anonymous user) goes to an arm by hashing
``"{experiment}:{salt}:{user_id}"`` with BLAKE2b into [0, 1) and cutting that interval by the
arms' cumulative weights. The hash, unlike Python's ``hash``, is the same in every process and
on every replica, so a user sees one arm for the whole experiment; a new salt reshuffles users
independently of the old split (so consecutive experiments do not inherit each other's users).

**Unit of analysis.** Users are randomised, not exposures, and the exposures of one user are
correlated (a user who likes the feed clicks on many items). A per-exposure two-proportion
z-test treats them as independent, underestimates the variance of the CTR and rejects a true
null far more often than ``alpha`` once users see several items. The report therefore shows it
for completeness only; the **decision** uses the CTR as a ratio of per-user sums,
``sum(clicks) / sum(exposures)``, whose variance comes from the delta method over users
(Deng et al., "Applying the Delta Method in Metric Analytics", KDD 2018)::

    Var(R) ≈ (Var(c) - 2 R Cov(c, e) + R² Var(e)) / (n · mean(e)²)

with ``c``, ``e`` the per-user clicks and exposures. Per-user metrics (clicks per user, the
share of users with a click) are already at the randomisation unit, so Welch's t-test and the
two-proportion z-test on users are valid for them as they are.

**Sizing.** :func:`sample_size` sizes this decision test: the independent exposures of the
two-proportion formula, times the design effect ``1 + (m - 1) ρ`` of users who see ``m`` items
with an intra-user click correlation ``ρ``, over ``m``; or with ``m`` and the design effect
measured on a pilot's log (:func:`read_pilot`).

**Sample-ratio mismatch.** Users per arm are compared with the configured weights by a
chi-squared goodness-of-fit test; p < 0.001 flags a broken assignment or logging path, in which
case no other number of the report should be trusted. A log none of whose units is in exactly
one configured arm (arms renamed in the config) is an error, not a report of zero users.

**Several arms.** Each treatment arm is compared with the control, and the decision's
p-values are adjusted for the number of comparisons (Holm's step-down, :func:`holm`): three
arms each tested at 5% would call some arm of an A/A test significant about 12% of the time.

**Units in two arms.** A unit logged in more than one arm (the salt or the weights changed
in the window, or replicas ran different configurations) saw both: it is left out of every
figure and counted (``mixed_arm_units``); many of them mean the assignment broke. A request
whose arm's model failed stays in that arm: the service tags the fallback's answer with it
(intent to treat).

**The log.** :func:`experiment_report` reads the units of the service log with
:func:`mlsd.evaluation.experiment_log.read_units`, whose clicks are the log's click attribution
(:mod:`mlsd.monitoring.log_reader`): a ``click`` event with an exposure's request id and item,
or, without a request id, on the latest exposure of that item to that user at most
``attribution_window_s`` (1800 s) before the click.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from mlsd.evaluation.experiment_log import read_units
from mlsd.monitoring.log_reader import DEFAULT_ATTRIBUTION_WINDOW_S

__all__ = [
    "DECISION_BLOCKED",
    "Arm",
    "ArmComparison",
    "ArmSummary",
    "Comparison",
    "EmptyLogError",
    "Estimate",
    "Experiment",
    "ExperimentReport",
    "ExperimentsSection",
    "Pilot",
    "SRMResult",
    "analyse_units",
    "design_effect",
    "experiment_report",
    "holm",
    "mean_ci",
    "power",
    "ratio_ci",
    "ratio_delta_test",
    "read_pilot",
    "read_units",
    "sample_size",
    "srm_test",
    "two_proportion_ztest",
    "welch_ttest",
    "wilson_ci",
]

SRM_THRESHOLD = 0.001
"""p-value below which the sample-ratio-mismatch check flags the split."""


# --- Assignment --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One arm: its name in the log, the registry alias it serves, its share of the traffic."""

    name: str
    alias: str
    weight: float


@dataclass(frozen=True)
class Experiment:
    """A named experiment whose first arm is the control."""

    name: str
    salt: str
    arms: tuple[Arm, ...]

    def __post_init__(self) -> None:
        if len(self.arms) < 2:
            raise ValueError(
                f"experiment {self.name!r} needs at least 2 arms, has {len(self.arms)}"
            )
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r} has duplicate arm names {names}")
        bad = [arm.name for arm in self.arms if not (arm.weight > 0 and math.isfinite(arm.weight))]
        if bad:
            raise ValueError(f"experiment {self.name!r}: arm(s) {bad} need a positive weight")

    @property
    def weights(self) -> npt.NDArray[np.float64]:
        """(n_arms,) traffic shares, normalised to sum to 1."""
        weights = np.array([arm.weight for arm in self.arms], dtype=np.float64)
        shares: npt.NDArray[np.float64] = weights / weights.sum()
        return shares

    def assign(self, user_id: int | None, *, request_id: str | None = None) -> Arm:
        """The arm of a user; an anonymous user (``None`` or negative id) by its request id."""
        return self.arms[int(self._indices([_unit_key(user_id, request_id)])[0])]

    def assign_many(
        self, user_ids: npt.ArrayLike, *, request_ids: Sequence[str] | None = None
    ) -> npt.NDArray[np.object_]:
        """(n,) arm names of ``user_ids``; negative ids are anonymous and need ``request_ids``."""
        users = np.asarray(user_ids, dtype=np.int64).reshape(-1)
        if request_ids is not None and len(request_ids) != users.size:
            raise ValueError(f"{len(request_ids)} request ids for {users.size} user ids")
        requests: Sequence[str | None] = request_ids or [None] * users.size
        keys = [_unit_key(int(u), r) for u, r in zip(users.tolist(), requests, strict=True)]
        names = np.array([arm.name for arm in self.arms], dtype=object)
        return names[self._indices(keys)]

    def _indices(self, keys: Iterable[str]) -> npt.NDArray[np.intp]:
        prefix = f"{self.name}:{self.salt}:"
        unit = np.fromiter((_hash_unit(prefix + key) for key in keys), dtype=np.float64, count=-1)
        bounds = np.cumsum(self.weights)
        bounds[-1] = 1.0  # rounding must not leave a sliver of [0, 1) unassigned
        return np.searchsorted(bounds, unit, side="right")


def _unit_key(user_id: int | None, request_id: str | None) -> str:
    if user_id is not None and user_id >= 0:
        return str(user_id)
    if not request_id:
        raise ValueError("an anonymous user (no user id) is assigned by request id; pass one")
    return f"request:{request_id}"


def _hash_unit(key: str) -> float:
    """``key`` hashed to [0, 1): the top 53 bits of an 8-byte BLAKE2b, over 2**53.

    53 bits are what a float64 holds exactly; dividing all 64 would round the largest values
    up to 1.0, past the last arm.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2.0**53


@dataclass(frozen=True)
class ExperimentsSection:
    """``[experiments]`` of a system TOML: the defined experiments and the one the service runs.

    ```toml
    [experiments]
    active = "ranker-ab"          # omit to run none

    [[experiments.experiment]]
    name = "ranker-ab"
    salt = "2025-01"
    arms = [
      { name = "control", alias = "champion", weight = 0.5 },
      { name = "treatment", alias = "challenger", weight = 0.5 },
    ]
    ```
    """

    experiments: tuple[Experiment, ...] = ()
    active: str | None = None

    def __post_init__(self) -> None:
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment names must be unique, got {names}")
        if self.active is not None and self.active not in names:
            raise ValueError(f"active = {self.active!r} is not a defined experiment {names}")

    def get(self, name: str) -> Experiment:
        """The experiment called ``name``."""
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        known = [e.name for e in self.experiments]
        raise ValueError(f"no experiment {name!r}; defined: {known or 'none'}")

    @property
    def active_experiment(self) -> Experiment | None:
        return None if self.active is None else self.get(self.active)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, where: str) -> ExperimentsSection:
        """Parse the ``[experiments]`` table; errors name ``where`` and the key at fault."""
        if not isinstance(raw, Mapping):
            raise ValueError(
                f"{where}: expected a table ([experiments]), got {type(raw).__name__} {raw!r}"
            )
        unknown = sorted(set(raw) - {"active", "experiment"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: active, experiment")
        tables = raw.get("experiment", [])
        if not isinstance(tables, list):
            raise ValueError(f"{where}.experiment: expected [[experiments.experiment]] tables")
        experiments = tuple(
            _experiment(table, f"{where}.experiment[{i}]") for i, table in enumerate(tables)
        )
        active = raw.get("active")
        if active is not None and not isinstance(active, str):
            raise ValueError(f"{where}.active: expected an experiment name, got {active!r}")
        try:
            return cls(experiments=experiments, active=active)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc


def _experiment(table: Any, where: str) -> Experiment:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - {"name", "salt", "arms"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: name, salt, arms")
    name, salt = (_string(table, key, where) for key in ("name", "salt"))
    arms_raw = table.get("arms")
    if not isinstance(arms_raw, list) or len(arms_raw) < 2:
        raise ValueError(f"{where}.arms: expected a list of at least 2 arms, got {arms_raw!r}")
    arms = []
    for j, arm in enumerate(arms_raw):
        at = f"{where}.arms[{j}]"
        if not isinstance(arm, Mapping) or set(arm) - {"name", "alias", "weight"}:
            raise ValueError(f"{at}: expected {{name, alias, weight}}, got {arm!r}")
        weight = arm.get("weight")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not 0 < weight < math.inf
        ):
            raise ValueError(f"{at}.weight: expected a positive finite number, got {weight!r}")
        arms.append(Arm(_string(arm, "name", at), _string(arm, "alias", at), float(weight)))
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}.arms: arm names must be unique, got {names}")
    return Experiment(name=name, salt=salt, arms=tuple(arms))


def _string(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


# --- Statistics --------------------------------------------------------------------------------
#
# Every two-sample function takes the control first and reports treatment − control.


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
    p_c, p_t = successes_control / trials_control, successes_treatment / trials_treatment
    pooled = (successes_control + successes_treatment) / (trials_control + trials_treatment)
    inv_n = 1 / trials_control + 1 / trials_treatment
    se_test = math.sqrt(pooled * (1 - pooled) * inv_n)
    se_ci = math.sqrt(p_c * (1 - p_c) / trials_control + p_t * (1 - p_t) / trials_treatment)
    return _normal_comparison(p_c, p_t, se_test, se_ci, alpha)


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
    exposures ``e`` per user, more than their mean (:class:`Pilot` measures it all at once).
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

    @property
    def icc(self) -> float:
        """The intra-user correlation of clicks that gives this design effect with this mean
        exposures per user (NaN with one exposure per user: nothing to correlate)."""
        if self.exposures_per_user <= 1:
            return math.nan
        return (self.design_effect - 1) / (self.exposures_per_user - 1)

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
        return cls(len(per_unit), float(exposures.mean()), ctr, float(effect))


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


# --- The report over the service log --------------------------------------------------------


class EmptyLogError(ValueError):
    """The log holds no traffic of the experiment in the window."""


DECISION_BLOCKED = "blocked: sample ratio mismatch"


@dataclass(frozen=True)
class ArmSummary:
    """One arm's traffic and metrics; ``users`` counts units (anonymous requests count once)."""

    name: str
    alias: str
    weight: float
    users: int
    requests: int
    exposures: int
    clicks: int
    ctr: Estimate
    conversion: Estimate
    clicks_per_user: Estimate


@dataclass(frozen=True)
class ArmComparison:
    """An arm vs the control. The decision is ``ctr`` (delta method over users), at its
    p-value adjusted for the other arms compared with the same control (Holm's step-down,
    ``ctr_p_adjusted``): with three treatment arms tested at 5% each, some arm of an A/A
    test comes out "significant" about 12% of the time; Holm keeps that chance at or below
    ``alpha`` for the family. With one treatment arm it is the p-value itself. The intervals
    stay per comparison."""

    arm: str
    control: str
    ctr: Comparison | None
    ctr_per_exposure: Comparison | None
    conversion: Comparison | None
    clicks_per_user: Comparison | None
    ctr_p_adjusted: float | None = None
    """``ctr``'s p-value after Holm's adjustment over the experiment's comparisons."""

    @property
    def significant(self) -> bool:
        if self.ctr is None:
            return False
        p_value = self.ctr.p_value if self.ctr_p_adjusted is None else self.ctr_p_adjusted
        return bool(p_value < self.ctr.alpha)

    def decision(self, *, trusted: bool) -> str:
        """What the comparison supports: ``"blocked: sample ratio mismatch"`` when the
        report is not ``trusted`` (the arms' traffic is not what was configured, so the
        difference may come from who got into each arm, however small its p-value), else
        ``"better"`` or ``"worse"`` (significant, by the sign of the CTR difference) or
        ``"no significant difference"``."""
        if not trusted:
            return DECISION_BLOCKED
        if not self.significant or self.ctr is None:
            return "no significant difference"
        return "better" if self.ctr.difference > 0 else "worse"


@dataclass(frozen=True)
class ExperimentReport:
    """Per-arm metrics, each arm vs the control, and the SRM check."""

    experiment: str
    salt: str
    resalted: bool
    alpha: float
    arms: tuple[ArmSummary, ...]
    comparisons: tuple[ArmComparison, ...]
    srm: SRMResult
    unknown_arm_users: int = 0
    window: tuple[str | None, str | None] = field(default=(None, None))
    mixed_arm_units: int = 0
    """Units logged in more than one of the experiment's arms (the salt or the weights changed
    during the window, or replicas ran different configurations): exposed to both, they are
    left out of every figure, and a report with many of them has a broken assignment."""

    @property
    def trusted(self) -> bool:
        """False when the sample-ratio check flags the arms' traffic, or could not run (no
        unit in the configured arms: its p-value is NaN, which is no evidence of a sound
        split): no arm's difference is a decision then (:meth:`ArmComparison.decision`)."""
        return not self.srm.flagged and not math.isnan(self.srm.p_value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes ``None``). ``trusted`` and each comparison's
        ``decision`` carry the sample-ratio check into the verdict; ``significant`` stays the
        test's own outcome."""
        out = asdict(self)
        out["trusted"] = self.trusted
        for comparison, raw in zip(self.comparisons, out["comparisons"], strict=True):
            raw["significant"] = comparison.significant
            raw["decision"] = comparison.decision(trusted=self.trusted)
            for key in ("ctr", "ctr_per_exposure", "conversion", "clicks_per_user"):
                value = getattr(comparison, key)
                if value is not None:
                    raw[key]["relative_lift"] = value.relative_lift
        out["srm"]["flagged"] = self.srm.flagged
        out["decision_metric"] = "ctr (delta method over users)"
        result: dict[str, Any] = _json_safe(out)
        return result


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analyse_units(
    units: pd.DataFrame, experiment: Experiment, *, alpha: float = 0.05
) -> tuple[tuple[ArmSummary, ...], tuple[ArmComparison, ...], SRMResult]:
    """Per-arm summaries, comparisons with the first arm and SRM from one row per unit.

    Args:
        units: columns ``arm``, ``requests``, ``exposures``, ``clicks``; one row per unit.
    """
    groups = dict(list(units.groupby("arm", sort=False)))
    empty = units.iloc[:0]
    per_arm = [groups.get(arm.name, empty) for arm in experiment.arms]
    summaries = tuple(
        _summary(arm, frame, alpha) for arm, frame in zip(experiment.arms, per_arm, strict=True)
    )
    control = per_arm[0]
    compared = [
        _compare(experiment.arms[0].name, arm.name, control, frame, alpha)
        for arm, frame in zip(experiment.arms[1:], per_arm[1:], strict=True)
    ]
    tested = [c for c in compared if c.ctr is not None]
    adjusted = dict(
        zip(
            [c.arm for c in tested],
            holm([c.ctr.p_value for c in tested if c.ctr is not None]),
            strict=True,
        )
    )
    comparisons = tuple(replace(c, ctr_p_adjusted=adjusted.get(c.arm)) for c in compared)
    srm = srm_test([len(frame) for frame in per_arm], experiment.weights)
    return summaries, comparisons, srm


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


def _summary(arm: Arm, frame: pd.DataFrame, alpha: float) -> ArmSummary:
    clicks, exposures = frame["clicks"].to_numpy(), frame["exposures"].to_numpy()
    try:
        ctr = ratio_ci(clicks, exposures, alpha=alpha)
    except ValueError:  # fewer than 2 users or no exposures
        value = clicks.sum() / exposures.sum() if exposures.sum() else math.nan
        ctr = Estimate(float(value), math.nan, math.nan)
    return ArmSummary(
        name=arm.name,
        alias=arm.alias,
        weight=arm.weight,
        users=len(frame),
        requests=int(frame["requests"].sum()),
        exposures=int(exposures.sum()),
        clicks=int(clicks.sum()),
        ctr=ctr,
        conversion=wilson_ci(int((clicks > 0).sum()), len(frame), alpha=alpha),
        clicks_per_user=mean_ci(clicks, alpha=alpha),
    )


def _compare(
    control_name: str, name: str, control: pd.DataFrame, treated: pd.DataFrame, alpha: float
) -> ArmComparison:
    def attempt(test: Any, *args: Any) -> Comparison | None:
        try:
            return test(*args, alpha=alpha)  # type: ignore[no-any-return]
        except ValueError:  # an arm too small for this test
            return None

    c_clicks, c_exp = control["clicks"].to_numpy(), control["exposures"].to_numpy()
    t_clicks, t_exp = treated["clicks"].to_numpy(), treated["exposures"].to_numpy()
    per_exposure = (int(c_clicks.sum()), int(c_exp.sum()), int(t_clicks.sum()), int(t_exp.sum()))
    per_user = (int((c_clicks > 0).sum()), len(c_clicks), int((t_clicks > 0).sum()), len(t_clicks))
    return ArmComparison(
        arm=name,
        control=control_name,
        ctr=attempt(ratio_delta_test, c_clicks, c_exp, t_clicks, t_exp),
        ctr_per_exposure=attempt(two_proportion_ztest, *per_exposure),
        conversion=attempt(two_proportion_ztest, *per_user),
        clicks_per_user=attempt(welch_ttest, c_clicks, t_clicks),
    )


def experiment_report(
    log_dir: Path | str,
    experiment: Experiment,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    resalt: str | None = None,
    alpha: float = 0.05,
    attribution_window_s: float = DEFAULT_ATTRIBUTION_WINDOW_S,
) -> ExperimentReport:
    """The experiment's report from the service log in ``[start, end)``.

    Args:
        log_dir: root of the service log.
        experiment: the experiment as configured; its first arm is the control.
        resalt: reassign the logged units with this salt instead of using the logged arm; when
            every arm served the same model this is an A/A test on real traffic.
        attribution_window_s: how long after an exposure a click without a request id counts
            for it (clicks are read up to this long after ``end``).

    Raises:
        EmptyLogError: no traffic of the experiment in the window, or none in exactly one of
            the configured arms (every unit in arms the config does not name, e.g. arms
            renamed in the TOML, or in more than one arm): a report of zero users would read
            as "no significant difference".
    """
    units = read_units(
        log_dir, experiment.name, start=start, end=end, attribution_window_s=attribution_window_s
    )
    if units.empty:
        window = f" between {start or 'the start'} and {end or 'the end'}"
        raise EmptyLogError(
            f"{log_dir}: no requests of experiment {experiment.name!r}{window}; check "
            "--log-dir, the experiment name and the window"
        )
    run = experiment
    if resalt is not None:
        run = Experiment(experiment.name, resalt, experiment.arms)
        requests = units["anonymous_request"].tolist()
        units = units.assign(arm=run.assign_many(units["user_id"], request_ids=requests))
    unit = ["user_id", "anonymous_request"]
    units = units.groupby([*unit, "arm"], as_index=False)[["requests", "exposures", "clicks"]].sum()
    known = units["arm"].isin([arm.name for arm in experiment.arms])
    arms_of_unit = units[known].groupby(unit)["arm"].transform("nunique")
    mixed = pd.Series(False, index=units.index)
    mixed[arms_of_unit.index] = arms_of_unit > 1
    analysed = units[known & ~mixed]
    if analysed.empty:
        raise EmptyLogError(_no_usable_unit(log_dir, units, known, mixed, experiment, (start, end)))
    arms, comparisons, srm = analyse_units(analysed, experiment, alpha=alpha)
    return ExperimentReport(
        experiment=experiment.name,
        salt=run.salt,
        resalted=resalt is not None,
        alpha=alpha,
        arms=arms,
        comparisons=comparisons,
        srm=srm,
        unknown_arm_users=int((~known).sum()),
        mixed_arm_units=int(units[mixed].groupby(unit).ngroups),
        window=(
            None if start is None else start.isoformat(),
            None if end is None else end.isoformat(),
        ),
    )


def _no_usable_unit(
    log_dir: Path | str,
    units: pd.DataFrame,
    known: pd.Series,
    mixed: pd.Series,
    experiment: Experiment,
    window: tuple[datetime | None, datetime | None],
) -> str:
    """Why no unit is left to analyse, with the arms of the log and of the config."""
    unit = ["user_id", "anonymous_request"]
    logged = sorted(str(arm) for arm in units["arm"].unique())
    configured = [arm.name for arm in experiment.arms]
    n_unknown = units[~known].groupby(unit).ngroups
    n_mixed = units[mixed].groupby(unit).ngroups
    start, end = window
    return (
        f"{log_dir}: no unit of experiment {experiment.name!r} between {start or 'the start'} "
        f"and {end or 'the end'} is in exactly one configured arm, so there is nothing to "
        f"compare. The log's arms are {logged}, the config's "
        f"{configured}; {n_unknown} unit(s) are in arms the config does not define and "
        f"{n_mixed} in more than one of its arms. If the arms were renamed in [experiments], "
        "give them the names the service logged (or report a window the config's names "
        "served, with --since/--until); if the salt or the weights changed, report the window "
        "after the change"
    )
