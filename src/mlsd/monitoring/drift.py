"""Drift statistics and the comparison of a live window with the reference profile.

Three views of "has this column changed?", each answering a different question:

- **PSI** (population stability index) over the reference bins,
  ``sum_i (live_i - ref_i) * ln(live_i / ref_i)`` on bin shares, with shares floored at
  :data:`~mlsd.monitoring.profile.PSI_EPSILON` so an empty bin costs a large but finite
  amount. It measures *how much* the distribution moved and does not grow with the sample
  size, which makes it the statistic to alert on. The usual reading (credit scoring, where it
  comes from): < 0.1 stable, 0.1–0.25 a moderate shift worth a look (:data:`PSI_MODERATE`),
  > 0.25 a major shift (:data:`PSI_MAJOR`, the default ``drifted`` flag).
- **Kolmogorov–Smirnov** (numeric columns): the two-sample test of the live values against the
  profile's stored reference sample (``scipy.stats.ks_2samp``). Its p-value answers "could
  both come from one distribution?"; with tens of thousands of live rows even a harmless shift
  is "significant", so it is reported, and alerting on it is opt-in (``ks_pvalue_min``).
- **Chi-squared** (categorical columns): the test of independence of (reference vs live) and
  code on a 2 × K table of counts (``scipy.stats.chi2_contingency``), live codes the reference
  never saw pooled into one ``other`` column; PSI on the same categories beside it.

**Missing values are a bin of their own.** A feature that serving stops filling is drift, not
an absence of data: NaN and ±inf (numeric) and null codes (categorical) go to a ``missing``
bin (category), on the reference side with the profile's missing share. PSI then compares
the reference's bin shares scaled by ``1 - missing share`` plus that share with the live
rows' bins over *all* live rows; when neither side has missing values this is exactly the
PSI over the reference bins alone. A live column that is entirely NaN thus has a large PSI,
and a profiled column absent from the log is counted (``n_missing_features``). KS compares
the finite values only.

**Too few requests are not judged.** The candidates of one request share its user's
features, so a window's effective sample size is its number of requests, not of rows: with
no drift at all, the largest PSI exceeds 0.25 in every window of 3–10 sampled requests, in
64% at 30, 2% at 100 and none at 1,000. Below ``min_requests`` distinct ``request_id``
(:data:`~mlsd.monitoring.alerts.MIN_DRIFT_REQUESTS`) the rows are still computed and shown,
but none is ``drifted`` and the PSI/KS metrics are left out, so their rules report "no data"
rather than fire on noise.

:func:`compare` takes the live rows as logged in the ``candidates`` table (``f_<name>`` numeric,
``c_<name>`` categorical, ``score`` the prediction, ``request_id``) and returns a
:class:`DriftReport`, one :class:`FeatureDrift` row per feature plus the prediction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from mlsd.monitoring.alerts import MIN_DRIFT_REQUESTS, check_psi_threshold
from mlsd.monitoring.profile import (
    CategoricalProfile,
    FloatArray,
    NumericProfile,
    ReferenceProfile,
    bin_index,
    finite,
    psi,
    split_codes,
)

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
NUMERIC_PREFIX = "f_"
CATEGORICAL_PREFIX = "c_"
PREDICTION_COLUMN = "score"
REQUEST_COLUMN = "request_id"
OTHER = "other"
MISSING = "missing"
"""The label of the bin (category) of missing values: NaN and ±inf, or null codes."""

LiveFrame: TypeAlias = pd.DataFrame | pa.Table


def ks_test(reference_sample: npt.ArrayLike, live: npt.ArrayLike) -> tuple[float, float]:
    """(KS statistic D, p-value) of the two-sample test; (nan, nan) when a side is empty."""
    ref, values = finite(reference_sample), finite(live)
    if len(ref) == 0 or len(values) == 0:
        return math.nan, math.nan
    result = stats.ks_2samp(ref, values)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class CategoricalTest:
    """Chi-squared and PSI of live codes against reference counts, over ``categories``.

    ``n_live`` counts the live rows with a code; ``missing_share`` is the share of all live
    rows without one (NaN with no rows).
    """

    categories: tuple[str, ...]
    reference_shares: tuple[float, ...]
    live_shares: tuple[float, ...]
    chi2: float
    p_value: float
    psi: float
    n_live: int
    missing_share: float = math.nan


def categorical_test(reference: CategoricalProfile, live_codes: npt.ArrayLike) -> CategoricalTest:
    """Compare live codes with the reference counts; unseen codes pool into ``other``, null
    codes (on either side) into ``missing``, a category shown only when either side has one.

    NaN statistics when either side has no rows at all.
    """
    codes, n_missing = split_codes(live_codes)
    live_counts = pd.Series(codes).value_counts()
    known = sorted(reference.counts)
    ref = np.array([reference.counts[c] for c in known] + [0], dtype=np.float64)
    seen = np.array([int(live_counts.get(c, 0)) for c in known], dtype=np.float64)
    other = float(live_counts[~live_counts.index.isin(known)].sum())
    live = np.append(seen, other)
    labels: tuple[str, ...] = (*(str(c) for c in known), OTHER)
    n_live = int(live.sum())
    if n_missing or reference.n_missing:
        ref = np.append(ref, float(reference.n_missing))
        live = np.append(live, float(n_missing))
        labels = (*labels, MISSING)
    n_all = n_live + n_missing
    ref_shares = ref / ref.sum() if ref.sum() else ref
    live_shares = live / n_all if n_all else live
    table = np.vstack([ref, live])[:, (ref + live) > 0]
    if n_all == 0 or ref.sum() == 0:
        chi2, p_value, value = math.nan, math.nan, math.nan
    elif table.shape[1] < 2:
        chi2, p_value, value = 0.0, 1.0, psi(ref_shares, live_shares)
    else:
        result = stats.chi2_contingency(table, correction=False)
        chi2, p_value = float(result.statistic), float(result.pvalue)
        value = psi(ref_shares, live_shares)
    return CategoricalTest(
        categories=labels,
        reference_shares=tuple(float(s) for s in ref_shares),
        live_shares=tuple(float(s) for s in live_shares),
        chi2=chi2,
        p_value=p_value,
        psi=value,
        n_live=n_live,
        missing_share=n_missing / n_all if n_all else math.nan,
    )


@dataclass(frozen=True)
class FeatureDrift:
    """One row of the drift table.

    Attributes:
        name: the feature (``"score"`` for the prediction).
        kind: ``"numeric"``, ``"categorical"`` or ``"prediction"``.
        test: ``"ks"`` (statistic = D) or ``"chi2"`` (statistic = chi-squared).
        psi: over the reference bins (numeric) or categories (categorical), plus a
            ``missing`` one when either side has missing values; NaN with no rows.
        n_live: live rows with a finite value (a code, for a categorical feature); the
            missing ones are in ``missing_share``, not here.
        drifted: ``psi > psi_threshold`` of :func:`compare`, not ``trending``, and the
            window had enough requests (:attr:`DriftReport.judged`).
        bins, reference_shares, live_shares: the histograms behind PSI, for plots; the last
            bin is ``missing`` when either side has a nonzero missing share.
        trending: the reference itself moved with time (its profile's ``time_psi`` is above
            :data:`~mlsd.monitoring.profile.TREND_PSI`): the feature is a function of the
            calendar, so its PSI grows with the time since training whatever the world does;
            reported, never ``drifted``.
        missing_share: share of the live rows with a missing value (NaN, ±inf, a null code);
            NaN with no rows.
    """

    name: str
    kind: Literal["numeric", "categorical", "prediction"]
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    psi: float
    n_live: int
    drifted: bool
    bins: tuple[str, ...]
    reference_shares: tuple[float, ...]
    live_shares: tuple[float, ...]
    trending: bool = False
    missing_share: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "test": self.test,
            "statistic": _json(self.statistic),
            "p_value": _json(self.p_value),
            "psi": _json(self.psi),
            "n_live": self.n_live,
            "missing_share": _json(self.missing_share),
            "drifted": self.drifted,
            "trending": self.trending,
            "bins": list(self.bins),
            "reference_shares": list(self.reference_shares),
            "live_shares": list(self.live_shares),
        }


@dataclass(frozen=True)
class DriftReport:
    """Every profiled feature and the prediction, live window vs reference.

    Attributes:
        features: one row per feature found in the live rows, in profile order.
        prediction: the score's row; ``None`` when the live rows have no ``score`` column.
        missing: profiled features absent from the live rows (a logging or schema change).
        psi_threshold: the PSI above which a row is flagged ``drifted``.
        n_requests: distinct live ``request_id`` values (live rows, without that column).
        min_requests: the fewest requests whose PSI and KS are judged (see :attr:`judged`).
    """

    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    missing: tuple[str, ...]
    psi_threshold: float
    n_requests: int = 0
    min_requests: int = 0

    @property
    def judged(self) -> bool:
        """Whether the window had ``min_requests`` requests, enough for its PSI and KS to mean
        anything: if not, no row is ``drifted`` and their metrics are left out."""
        return self.n_requests >= self.min_requests

    @property
    def note(self) -> str | None:
        """Why drift was not judged, for the report; ``None`` when it was."""
        if self.judged:
            return None
        return (
            f"drift not judged: {self.n_requests} sampled requests in the window, fewer than "
            f"the {self.min_requests} needed ([monitoring].min_drift_requests); the "
            "candidates of one request share its user's features, so PSI and KS on so few "
            "requests are noise"
        )

    def ranked(self) -> list[FeatureDrift]:
        """Features by decreasing PSI (rows without live data last)."""
        return sorted(self.features, key=lambda r: -r.psi if math.isfinite(r.psi) else math.inf)

    def metrics(self) -> dict[str, float]:
        """Alertable summaries; a metric without data is left out (see ``alerts.evaluate``).

        ``feature_psi_max`` and ``ks_pvalue_min`` are over the features that are not
        time-trending (see :class:`FeatureDrift`); ``trending_psi_max`` is the largest PSI of
        those that are. ``n_missing_features`` counts the profiled columns absent from the live
        rows. A window of too few requests (not :attr:`judged`) has only that one.
        """
        out: dict[str, float] = {"n_missing_features": float(len(self.missing))}
        if not self.judged:
            return out
        psis = [r.psi for r in self.features if math.isfinite(r.psi) and not r.trending]
        if psis:
            out["feature_psi_max"] = max(psis)
            out["n_drifted_features"] = float(sum(r.drifted for r in self.features))
        trending = [r.psi for r in self.features if math.isfinite(r.psi) and r.trending]
        if trending:
            out["trending_psi_max"] = max(trending)
        pvalues = [
            r.p_value
            for r in self.features
            if r.test == "ks" and math.isfinite(r.p_value) and not r.trending
        ]
        if pvalues:
            out["ks_pvalue_min"] = min(pvalues)
        if self.prediction is not None and math.isfinite(self.prediction.psi):
            out["prediction_psi"] = self.prediction.psi
            if math.isfinite(self.prediction.p_value):
                out["prediction_ks_pvalue"] = self.prediction.p_value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "psi_threshold": self.psi_threshold,
            "n_requests": self.n_requests,
            "min_requests": self.min_requests,
            "judged": self.judged,
            "features": [r.to_dict() for r in self.features],
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "missing": list(self.missing),
        }


def compare(
    profile: ReferenceProfile,
    live: LiveFrame,
    *,
    psi_threshold: float = PSI_MAJOR,
    min_requests: int = MIN_DRIFT_REQUESTS,
) -> DriftReport:
    """Drift of each profiled feature and of the prediction in ``live``.

    Args:
        live: logged ranker rows (pandas or pyarrow): ``f_<name>`` per numeric feature,
            ``c_<name>`` per categorical feature, ``score``, ``request_id``; other columns
            are ignored.
        psi_threshold: flag a row ``drifted`` above this PSI (default: a major shift).
        min_requests: with fewer distinct ``request_id`` values (rows, without that column)
            no row is ``drifted`` and the PSI/KS metrics are left out (module docstring).
    """
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
        raise ValueError(f"min_requests: expected an integer >= 1, got {min_requests!r}")
    check_psi_threshold(psi_threshold, "psi_threshold")
    columns = set(live.column_names if isinstance(live, pa.Table) else live.columns)
    n_requests = count_requests(live)
    flag_above = psi_threshold if n_requests >= min_requests else math.inf  # not on noise
    rows: list[FeatureDrift] = []
    missing: list[str] = []
    for name, numeric in profile.numeric.items():
        column = NUMERIC_PREFIX + name
        if column not in columns:
            missing.append(column)
            continue
        rows.append(_numeric_row(name, "numeric", numeric, _values(live, column), flag_above))
    for name, categorical in profile.categorical.items():
        column = CATEGORICAL_PREFIX + name
        if column not in columns:
            missing.append(column)
            continue
        test = categorical_test(categorical, _values(live, column))
        rows.append(
            FeatureDrift(
                name=name,
                kind="categorical",
                test="chi2",
                statistic=test.chi2,
                p_value=test.p_value,
                psi=test.psi,
                n_live=test.n_live,
                drifted=test.psi > flag_above,
                bins=test.categories,
                reference_shares=test.reference_shares,
                live_shares=test.live_shares,
                missing_share=test.missing_share,
            )
        )
    prediction = None
    if PREDICTION_COLUMN in columns:
        values = _values(live, PREDICTION_COLUMN)
        prediction = _numeric_row(
            PREDICTION_COLUMN, "prediction", profile.prediction, values, flag_above
        )
    return DriftReport(
        tuple(rows),
        prediction,
        tuple(missing),
        psi_threshold,
        n_requests=n_requests,
        min_requests=min_requests,
    )


def count_requests(live: LiveFrame) -> int:
    """Distinct non-null ``request_id`` values of ``live``; its rows without that column."""
    if isinstance(live, pa.Table):
        if REQUEST_COLUMN not in live.column_names:
            return int(live.num_rows)
        return int(pc.count_distinct(live.column(REQUEST_COLUMN)).as_py())
    if REQUEST_COLUMN not in live.columns:
        return len(live)
    return int(live[REQUEST_COLUMN].nunique(dropna=True))


def bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """Readable right-closed bins: ``≤ e0``, ``(e0, e1]``, ..., ``> e_last``."""
    if not edges:
        return ("all",)
    inner = [f"({a:.4g}, {b:.4g}]" for a, b in itertools.pairwise(edges)]
    return (f"≤ {edges[0]:.4g}", *inner, f"> {edges[-1]:.4g}")


def _numeric_row(
    name: str,
    kind: Literal["numeric", "prediction"],
    reference: NumericProfile,
    values: FloatArray,
    psi_threshold: float,
) -> FeatureDrift:
    values = np.asarray(values, dtype=np.float64).ravel()
    x = finite(values)
    ref_shares, live_shares = numeric_shares(reference, values)
    has_reference = reference.n > 0 or reference.missing_share > 0
    value = psi(ref_shares, live_shares) if len(values) and has_reference else math.nan
    statistic, p_value = ks_test(reference.sample, x)
    trending = kind == "numeric" and reference.trending
    labels = bin_labels(reference.edges)
    return FeatureDrift(
        name=name,
        kind=kind,
        test="ks",
        statistic=statistic,
        p_value=p_value,
        psi=value,
        n_live=len(x),
        drifted=value > psi_threshold and not trending,
        bins=labels if len(ref_shares) == len(labels) else (*labels, MISSING),
        reference_shares=tuple(float(s) for s in ref_shares),
        live_shares=tuple(float(s) for s in live_shares),
        trending=trending,
        missing_share=(len(values) - len(x)) / len(values) if len(values) else math.nan,
    )


def numeric_shares(reference: NumericProfile, values: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(reference, live) share of each reference bin over all rows, plus a last ``missing``
    bin (NaN, ±inf) when either side has missing values; live shares are zeros with no rows.

    The reference's bin shares are of its finite values, so they are scaled by ``1 -
    missing_share``. Without missing values on either side these are the profile's shares
    and the live values' bin shares, unchanged.
    """
    present = np.isfinite(values)
    n_bins = len(reference.edges) + 1
    counts = np.bincount(bin_index(reference.edges, values[present]), minlength=n_bins)
    ref = np.asarray(reference.shares, dtype=np.float64)
    live = counts.astype(np.float64)
    n_missing = len(values) - int(present.sum())
    if n_missing or reference.missing_share > 0:
        ref = np.append(ref * (1.0 - reference.missing_share), reference.missing_share)
        live = np.append(live, float(n_missing))
    total = live.sum()
    return ref, live / total if total > 0 else live


def _values(live: LiveFrame, column: str) -> npt.NDArray[Any]:
    if isinstance(live, pa.Table):
        return np.asarray(live.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.asarray(live[column].to_numpy(dtype=np.float64, na_value=np.nan))


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None
