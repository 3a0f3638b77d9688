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

:func:`compare` takes the live rows as logged in the ``candidates`` table (``f_<name>`` numeric,
``c_<name>`` categorical, ``score`` the prediction) and returns a :class:`DriftReport`, one
:class:`FeatureDrift` row per feature plus the prediction.
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
from scipy import stats

from mlsd.monitoring.profile import (
    CategoricalProfile,
    FloatArray,
    NumericProfile,
    ReferenceProfile,
    bin_shares,
    finite,
    psi,
)

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
NUMERIC_PREFIX = "f_"
CATEGORICAL_PREFIX = "c_"
PREDICTION_COLUMN = "score"
OTHER = "other"

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
    """Chi-squared and PSI of live codes against reference counts, over ``categories``."""

    categories: tuple[str, ...]
    reference_shares: tuple[float, ...]
    live_shares: tuple[float, ...]
    chi2: float
    p_value: float
    psi: float
    n_live: int


def categorical_test(reference: CategoricalProfile, live_codes: npt.ArrayLike) -> CategoricalTest:
    """Compare live codes with the reference counts; unseen codes pool into ``other``."""
    codes = pd.Series(np.asarray(live_codes).ravel()).dropna().astype(np.int64)
    live_counts = codes.value_counts()
    known = sorted(reference.counts)
    ref = np.array([reference.counts[c] for c in known] + [0], dtype=np.float64)
    seen = np.array([int(live_counts.get(c, 0)) for c in known], dtype=np.float64)
    other = float(live_counts[~live_counts.index.isin(known)].sum())
    live = np.append(seen, other)
    labels = (*(str(c) for c in known), OTHER)
    n_live = int(live.sum())
    ref_shares = ref / ref.sum() if ref.sum() else ref
    live_shares = live / n_live if n_live else live
    table = np.vstack([ref, live])[:, (ref + live) > 0]
    if n_live == 0 or ref.sum() == 0:
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
    )


@dataclass(frozen=True)
class FeatureDrift:
    """One row of the drift table.

    Attributes:
        name: the feature (``"score"`` for the prediction).
        kind: ``"numeric"``, ``"categorical"`` or ``"prediction"``.
        test: ``"ks"`` (statistic = D) or ``"chi2"`` (statistic = chi-squared).
        psi: over the reference bins (numeric) or categories (categorical); NaN with no rows.
        n_live: live rows with a finite value.
        drifted: ``psi > psi_threshold`` of :func:`compare`, and not ``trending``.
        bins, reference_shares, live_shares: the histograms behind PSI, for plots.
        trending: the reference itself moved with time (its profile's ``time_psi`` is above
            :data:`~mlsd.monitoring.profile.TREND_PSI`): the feature is a function of the
            calendar, so its PSI grows with the time since training whatever the world does;
            reported, never ``drifted``.
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "test": self.test,
            "statistic": _json(self.statistic),
            "p_value": _json(self.p_value),
            "psi": _json(self.psi),
            "n_live": self.n_live,
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
    """

    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    missing: tuple[str, ...]
    psi_threshold: float

    def ranked(self) -> list[FeatureDrift]:
        """Features by decreasing PSI (rows without live data last)."""
        return sorted(self.features, key=lambda r: -r.psi if math.isfinite(r.psi) else math.inf)

    def metrics(self) -> dict[str, float]:
        """Alertable summaries; a metric without data is left out (see ``alerts.evaluate``).

        ``feature_psi_max`` is over the features that are not time-trending (see
        :class:`FeatureDrift`); ``trending_psi_max`` is the largest PSI of those that are.
        """
        out: dict[str, float] = {}
        psis = [r.psi for r in self.features if math.isfinite(r.psi) and not r.trending]
        if psis:
            out["feature_psi_max"] = max(psis)
            out["n_drifted_features"] = float(sum(r.drifted for r in self.features))
        trending = [r.psi for r in self.features if math.isfinite(r.psi) and r.trending]
        if trending:
            out["trending_psi_max"] = max(trending)
        pvalues = [r.p_value for r in self.features if r.test == "ks" and math.isfinite(r.p_value)]
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
            "features": [r.to_dict() for r in self.features],
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "missing": list(self.missing),
        }


def compare(
    profile: ReferenceProfile, live: LiveFrame, *, psi_threshold: float = PSI_MAJOR
) -> DriftReport:
    """Drift of each profiled feature and of the prediction in ``live``.

    Args:
        live: logged ranker rows (pandas or pyarrow): ``f_<name>`` per numeric feature,
            ``c_<name>`` per categorical feature, ``score``; other columns are ignored.
        psi_threshold: flag a row ``drifted`` above this PSI (default: a major shift).
    """
    columns = set(live.column_names if isinstance(live, pa.Table) else live.columns)
    rows: list[FeatureDrift] = []
    missing: list[str] = []
    for name, numeric in profile.numeric.items():
        column = NUMERIC_PREFIX + name
        if column not in columns:
            missing.append(column)
            continue
        rows.append(_numeric_row(name, "numeric", numeric, _values(live, column), psi_threshold))
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
                drifted=test.psi > psi_threshold,
                bins=test.categories,
                reference_shares=test.reference_shares,
                live_shares=test.live_shares,
            )
        )
    prediction = None
    if PREDICTION_COLUMN in columns:
        values = _values(live, PREDICTION_COLUMN)
        prediction = _numeric_row(
            PREDICTION_COLUMN, "prediction", profile.prediction, values, psi_threshold
        )
    return DriftReport(tuple(rows), prediction, tuple(missing), psi_threshold)


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
    x = finite(values)
    live_shares = bin_shares(reference.edges, x)
    value = psi(reference.shares, live_shares) if len(x) and reference.n else math.nan
    statistic, p_value = ks_test(reference.sample, x)
    trending = kind == "numeric" and reference.trending
    return FeatureDrift(
        name=name,
        kind=kind,
        test="ks",
        statistic=statistic,
        p_value=p_value,
        psi=value,
        n_live=len(x),
        drifted=value > psi_threshold and not trending,
        bins=bin_labels(reference.edges),
        reference_shares=reference.shares,
        live_shares=tuple(float(s) for s in live_shares),
        trending=trending,
    )


def _values(live: LiveFrame, column: str) -> npt.NDArray[Any]:
    if isinstance(live, pa.Table):
        return np.asarray(live.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.asarray(live[column].to_numpy(dtype=np.float64, na_value=np.nan))


def _json(value: float) -> float | None:
    return value if math.isfinite(value) else None
