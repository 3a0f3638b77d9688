"""Online A/B experiments: deterministic assignment, and the report over the log.

The statistics (tests, intervals, sample-ratio mismatch, sizing, Holm) are in
:mod:`mlsd.evaluation.experiment_stats` and exported here too; this docstring says why the
report uses them as it does.

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
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.evaluation.experiment_log import EmptyLogError, read_units
from mlsd.evaluation.experiment_stats import (
    SRM_THRESHOLD,
    Comparison,
    Estimate,
    Pilot,
    SRMResult,
    design_effect,
    holm,
    mean_ci,
    power,
    ratio_ci,
    ratio_delta_test,
    read_pilot,
    sample_size,
    srm_test,
    two_proportion_ztest,
    welch_ttest,
    wilson_ci,
)
from mlsd.monitoring.log_reader import DEFAULT_ATTRIBUTION_WINDOW_S

__all__ = [
    "DECISION_BLOCKED",
    "SRM_THRESHOLD",
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


# --- The report over the service log --------------------------------------------------------


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
    """Units logged in an arm the config does not define (arms renamed or removed): left out,
    and also counted in ``mixed_arm_units`` when they were logged in a configured arm too."""
    window: tuple[str | None, str | None] = field(default=(None, None))
    mixed_arm_units: int = 0
    """Units logged in more than one arm, configured or not (the salt or the weights changed
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
    mixed = units.groupby(unit)["arm"].transform("nunique") > 1  # any arms, known or not
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
        unknown_arm_users=int(units[~known].groupby(unit).ngroups),
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
        f"{n_mixed} in more than one arm. If the arms were renamed in [experiments], "
        "give them the names the service logged (or report a window the config's names "
        "served, with --since/--until); if the salt or the weights changed, report the window "
        "after the change"
    )
