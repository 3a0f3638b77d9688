"""The reference profile: what the ranker's inputs and outputs looked like at training time.

Monitoring compares a live window of logged ranker rows against this profile, so it stores
exactly what the drift statistics of :mod:`mlsd.monitoring.drift` need, and nothing that could
leak training data:

- per numeric feature (at float32 precision, as logged): decile bin edges of the reference
  values (ties deduplicated; a mass point, a value that several deciles fall on, such as "0
  events" or a flag that is 1 in 95% of rows, also gets the largest reference value below it
  as an edge, so it has a bin of its own whether it sits at the bottom, in the middle or at
  the top of the range; a constant column keeps one edge, i.e. two bins), the reference share
  of each bin (for PSI), the **missing share** (NaN and ±inf among all reference values),
  summary statistics of the finite values, and a fixed-size uniform sample of them drawn with
  a seeded generator (for the two-sample Kolmogorov–Smirnov test);
- per categorical feature: the count of every code and of missing (null) codes (for
  chi-squared and PSI on categories);
- the prediction (the ranker's score) profiled like a numeric feature;
- training-time label metrics when known (``ctr``, ``ndcg_at_10``, ``ece``), the baseline of
  the live label metrics;
- when the rows' times are given, per numeric feature its **time PSI**: the PSI of the later
  half of the rows (by time) against the earlier half, over the profile's bins. A feature whose
  distribution moves that much *within* the reference window is a function of the calendar
  (e.g. "days since the item's first event" when most items were first seen when the data
  began), so it will keep moving after it whatever happens to the world; :mod:`.drift` reports
  such a feature as time-trending instead of counting it as drifted. It needs
  :data:`MIN_TREND_MOMENTS` distinct times in each half (else it is NaN, not trending): the
  candidates of one request share its user's values, so a few hundred requests give a time
  PSI that is mostly noise.

Bins are right-closed: with inner edges ``e_0 < ... < e_{m-1}`` the bins are ``(-inf, e_0]``,
``(e_0, e_1]``, ..., ``(e_{m-1}, inf)``, so :func:`bin_index` is one ``searchsorted``.

Profiles are JSON (never pickle: serving and monitoring load them) with a format version
(a profile written before missing shares existed reads as having none)::

    profile = ReferenceProfile.build(ranker_rows, y_score, numeric=schema.numeric,
                                     categorical=schema.categorical, label_metrics={"ctr": 0.05})
    profile.save(run_dir / "reference_profile.json")
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

FloatArray = npt.NDArray[np.float64]

PROFILE_FORMAT = 1
N_BINS = 10
PSI_EPSILON = 1e-4
"""Floor of a bin share in PSI: an empty bin contributes about ``share * ln(share / 1e-4)``."""
SAMPLE_SIZE = 5_000
TREND_PSI = 0.25
"""A time PSI above this (a major shift between the two halves of the reference window) marks a
feature as moving with the calendar."""
MIN_TREND_MOMENTS = 250
"""Distinct times each half of the reference needs for a time PSI. With one value per request
(a user-level feature), a stationary feature's time PSI over 50/100/250 request moments
exceeds :data:`TREND_PSI` in 97%/78%/9% of reference windows (and at 500 in none), so fewer
moments than this per half cannot tell a calendar-driven feature from noise."""
LABEL_METRICS = ("ctr", "ndcg_at_10", "ece")
"""Training-time label metrics a profile may carry: click-through (base) rate, NDCG@10 on the
validation users, expected calibration error of the score against clicks."""


def finite(values: npt.ArrayLike) -> FloatArray:
    """``values`` as float64 with NaN and ±inf dropped (callers count the dropped ones: missing
    values are a bin of their own in PSI, see :mod:`mlsd.monitoring.drift`)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    out: FloatArray = array[np.isfinite(array)]
    return out


def missing_share(n_missing: int, n_total: int) -> float:
    """``n_missing / n_total``, 0 when there are no values at all (nothing is missing)."""
    return n_missing / n_total if n_total else 0.0


def split_codes(codes: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], int]:
    """Categorical ``codes`` as int64 without their missing ones (null, NaN, ±inf), and how
    many were missing."""
    series = pd.Series(np.asarray(codes).ravel())
    if series.dtype.kind == "f":
        present = np.isfinite(series.to_numpy(dtype=np.float64))
    else:
        present = series.notna().to_numpy(dtype=bool)
    out: npt.NDArray[np.int64] = series[present].to_numpy().astype(np.int64)
    return out, int((~present).sum())


def decile_edges(x: FloatArray, n_bins: int = N_BINS) -> FloatArray:
    """Inner bin edges of the finite values ``x`` (not empty): their ``n_bins``-quantiles with
    ties merged, plus, below each mass point, the largest value of ``x`` under it.

    A mass point is a value that several quantiles fall on (ties merged). With right-closed
    bins it would otherwise share its bin with everything down to the previous edge: a flag
    that is 1 in 95% of rows has every decile at 1.0, so 0s and 1s would fill one bin and a
    move to 50% ones would give PSI 0. The extra edge gives the mass point the bin
    ``(largest value below it, e]`` of its own. An ordinary (continuous) decile gets no extra
    edge, which would only cut a sliver of a bin off.
    """
    quantiles = np.quantile(x, np.arange(1, n_bins) / n_bins)
    edges, repeats = np.unique(quantiles, return_counts=True)  # sorted, ties merged
    ordered = np.sort(x)
    below = np.searchsorted(ordered, edges[repeats > 1], side="left") - 1
    extra = ordered[below[below >= 0]]  # the largest value strictly under each mass point
    out: FloatArray = np.union1d(edges, extra)
    return out


def bin_index(edges: Sequence[float] | FloatArray, values: FloatArray) -> npt.NDArray[np.int64]:
    """The right-closed bin of each value: 0 for ``(-inf, e_0]``, ``len(edges)`` past the last."""
    out: npt.NDArray[np.int64] = np.searchsorted(
        np.asarray(edges, dtype=np.float64), values, side="left"
    ).astype(np.int64)
    return out


def bin_shares(edges: Sequence[float] | FloatArray, values: FloatArray) -> FloatArray:
    """``(len(edges) + 1,)`` share of ``values`` in each bin (zeros when there are none)."""
    counts = np.bincount(bin_index(edges, values), minlength=len(edges) + 1).astype(np.float64)
    total = counts.sum()
    out: FloatArray = counts / total if total > 0 else counts
    return out


def psi(
    reference_shares: npt.ArrayLike, live_shares: npt.ArrayLike, *, epsilon: float = PSI_EPSILON
) -> float:
    """Population stability index of two share vectors over the same bins (each sums to 1)."""
    ref = np.maximum(np.asarray(reference_shares, dtype=np.float64), epsilon)
    live = np.maximum(np.asarray(live_shares, dtype=np.float64), epsilon)
    if ref.shape != live.shape:
        raise ValueError(f"psi: {ref.shape} reference bins vs {live.shape} live bins")
    return float(np.sum((live - ref) * np.log(live / ref)))


def time_psi(
    edges: Sequence[float] | FloatArray, values: npt.ArrayLike, times: npt.ArrayLike
) -> float:
    """PSI of the later half of ``values`` (by ``times``) against the earlier half, over the
    bins ``edges``; NaN when a half has fewer than :data:`MIN_TREND_MOMENTS` distinct times
    (too few request moments to tell a trend from noise; also when all times are equal).

    Values are rounded to float32 and non-finite ones dropped, as in :meth:`NumericProfile.build`.
    """
    x = np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64).ravel()
    t = np.asarray(times, dtype=np.float64).ravel()
    if len(x) != len(t):
        raise ValueError(f"time_psi: {len(x)} values but {len(t)} times")
    keep = np.isfinite(x) & np.isfinite(t)
    x, t = x[keep], t[keep]
    if len(x) < 2:
        return math.nan
    middle = np.median(t)
    late = t > middle
    if min(len(np.unique(t[~late])), len(np.unique(t[late]))) < MIN_TREND_MOMENTS:
        return math.nan
    return psi(bin_shares(edges, x[~late]), bin_shares(edges, x[late]))


@dataclass(frozen=True)
class NumericProfile:
    """One numeric column at reference time.

    Attributes:
        edges: inner bin edges, strictly increasing (decile cut points, ties merged, and the
            largest value below each mass point: :func:`decile_edges`).
        shares: ``(len(edges) + 1,)`` reference share of each bin; sums to 1.
        n: finite reference values; ``mean``/``std``/``min``/``max`` describe them.
        sample: a uniform sample of at most :data:`SAMPLE_SIZE` finite reference values, for KS.
        time_psi: :func:`time_psi` of the reference values (NaN when their times are unknown).
        missing_share: share of all reference values that were NaN or ±inf; ``shares`` are of
            the finite ones, so of the reference as a whole bin ``i`` held
            ``shares[i] * (1 - missing_share)``.
    """

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    n: int
    mean: float
    std: float
    min: float
    max: float
    sample: tuple[float, ...]
    time_psi: float = math.nan
    missing_share: float = 0.0

    @property
    def trending(self) -> bool:
        """Whether the feature moves with the calendar: a time PSI above :data:`TREND_PSI`."""
        return math.isfinite(self.time_psi) and self.time_psi > TREND_PSI

    @classmethod
    def build(
        cls,
        values: npt.ArrayLike,
        *,
        n_bins: int = N_BINS,
        sample_size: int = SAMPLE_SIZE,
        rng: np.random.Generator | None = None,
        times: npt.ArrayLike | None = None,
    ) -> NumericProfile:
        """Profile ``values``: the finite ones are binned and sampled, the share of the others
        (NaN, ±inf) is kept as ``missing_share``.

        Values are rounded to float32 first, the precision of the service log, so a value on an
        edge (e.g. a mean of exactly 0.1) falls in the same bin at reference and at live time.
        ``times`` (one per value, any monotone unit) gives the profile its ``time_psi``.
        """
        rounded = np.asarray(values, dtype=np.float64).astype(np.float32).ravel()
        x = finite(rounded)
        missing = missing_share(len(rounded) - len(x), len(rounded))
        if len(x) == 0:
            nan = math.nan
            return cls(
                edges=(), shares=(1.0,), n=0, mean=nan, std=nan, min=nan, max=nan, sample=(),
                missing_share=missing,
            )  # fmt: skip
        edges = decile_edges(x, n_bins)  # a constant column keeps one edge
        rng = rng if rng is not None else np.random.default_rng(0)
        sample = x if len(x) <= sample_size else rng.choice(x, size=sample_size, replace=False)
        trend = math.nan if times is None else time_psi(edges, values, times)
        return cls(
            edges=tuple(float(e) for e in edges),
            shares=tuple(float(s) for s in bin_shares(edges, x)),
            n=len(x),
            mean=float(x.mean()),
            std=float(x.std()),
            min=float(x.min()),
            max=float(x.max()),
            sample=tuple(float(v) for v in np.sort(sample)),
            time_psi=trend,
            missing_share=missing,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            "shares": list(self.shares),
            "n": self.n,
            "mean": _json_float(self.mean),
            "std": _json_float(self.std),
            "min": _json_float(self.min),
            "max": _json_float(self.max),
            "sample": list(self.sample),
            "time_psi": _json_float(self.time_psi),
            "missing_share": self.missing_share,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NumericProfile:
        edges = tuple(float(e) for e in raw["edges"])
        shares = tuple(float(s) for s in raw["shares"])
        if len(shares) != len(edges) + 1 or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("edges must increase strictly and shares need len(edges) + 1 values")
        stats = {k: math.nan if raw[k] is None else float(raw[k]) for k in ("mean", "std")}
        bounds = {k: math.nan if raw[k] is None else float(raw[k]) for k in ("min", "max")}
        missing = float(raw.get("missing_share", 0.0))  # absent before missing shares existed
        if not 0.0 <= missing <= 1.0:
            raise ValueError(f"missing_share {missing} is not a share in [0, 1]")
        return cls(
            edges=edges,
            shares=shares,
            n=int(raw["n"]),
            sample=tuple(float(v) for v in raw["sample"]),
            time_psi=math.nan if raw.get("time_psi") is None else float(raw["time_psi"]),
            missing_share=missing,
            **stats,
            **bounds,
        )


@dataclass(frozen=True)
class CategoricalProfile:
    """One categorical (int code) column at reference time: ``counts`` code → rows, and
    ``n_missing`` rows without a code (null), a count rather than a share so chi-squared can
    put them in its table."""

    counts: Mapping[int, int]
    n_missing: int = 0

    @property
    def n(self) -> int:
        """Rows with a code."""
        return sum(self.counts.values())

    @property
    def missing_share(self) -> float:
        """Share of all reference rows without a code."""
        return missing_share(self.n_missing, self.n + self.n_missing)

    def shares(self) -> dict[int, float]:
        total = self.n
        return {code: count / total for code, count in self.counts.items()} if total else {}

    @classmethod
    def build(cls, codes: npt.ArrayLike) -> CategoricalProfile:
        values, n_missing = split_codes(codes)
        counts = pd.Series(values).value_counts().sort_index()
        return cls(counts={int(k): int(v) for k, v in counts.items()}, n_missing=n_missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(code): count for code, count in self.counts.items()},
            "n_missing": self.n_missing,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CategoricalProfile:
        n_missing = int(raw.get("n_missing", 0))  # absent before missing counts existed
        if n_missing < 0:
            raise ValueError(f"n_missing {n_missing} is negative")
        return cls(
            counts={int(code): int(count) for code, count in raw["counts"].items()},
            n_missing=n_missing,
        )


@dataclass(frozen=True)
class ReferenceProfile:
    """Every ranker feature and the prediction at training time (see the module docstring).

    Attributes:
        numeric: feature name → its profile (names as in the ranker rows, without ``f_``).
        categorical: feature name → its code counts (without ``c_``).
        prediction: the profile of the ranker's score.
        label_metrics: some of :data:`LABEL_METRICS` (e.g. ``{"ctr": 0.051}``).
        n_rows: rows the profile was built from.
    """

    numeric: Mapping[str, NumericProfile]
    categorical: Mapping[str, CategoricalProfile]
    prediction: NumericProfile
    label_metrics: Mapping[str, float] = field(default_factory=dict)
    n_rows: int = 0

    @classmethod
    def build(
        cls,
        rows: pd.DataFrame,
        y_score: npt.ArrayLike,
        *,
        numeric: Sequence[str],
        categorical: Sequence[str] = (),
        label_metrics: Mapping[str, float] | None = None,
        times: npt.ArrayLike | None = None,
        n_bins: int = N_BINS,
        sample_size: int = SAMPLE_SIZE,
        seed: int = 0,
    ) -> ReferenceProfile:
        """Profile ranker rows and their scores.

        Args:
            rows: one row per (request, candidate); at least ``numeric`` and ``categorical``.
            y_score: ``(len(rows),)`` the ranker's prediction on each row.
            numeric, categorical: the ranker's feature columns (its ``FeatureSchema``).
            label_metrics: training-time values of some of :data:`LABEL_METRICS`.
            times: ``(len(rows),)`` each row's time (e.g. epoch µs of its request), for the
                numeric features' ``time_psi``; ``None`` leaves it NaN.
            seed: seeds the KS samples, so the same rows give the same profile.
        """
        missing = [c for c in (*numeric, *categorical) if c not in rows.columns]
        if missing:
            raise ValueError(f"reference rows: missing feature columns {missing}")
        scores = np.asarray(y_score, dtype=np.float64).ravel()
        if len(scores) != len(rows):
            raise ValueError(f"reference rows: {len(rows)} rows but {len(scores)} scores")
        unknown = sorted(set(label_metrics or {}) - set(LABEL_METRICS))
        if unknown:
            raise ValueError(f"label_metrics: unknown {unknown}; known: {list(LABEL_METRICS)}")
        if times is not None and len(np.asarray(times).ravel()) != len(rows):
            raise ValueError(f"reference rows: {len(rows)} rows but {len(np.ravel(times))} times")
        rng = np.random.default_rng(seed)

        def profile(values: npt.ArrayLike) -> NumericProfile:
            return NumericProfile.build(
                values, n_bins=n_bins, sample_size=sample_size, rng=rng, times=times
            )

        return cls(
            numeric={c: profile(rows[c].to_numpy(np.float64)) for c in numeric},
            categorical={c: CategoricalProfile.build(rows[c].to_numpy()) for c in categorical},
            prediction=profile(scores),
            label_metrics={  # a metric that could not be computed (NaN) is left out
                k: float(v) for k, v in (label_metrics or {}).items() if math.isfinite(float(v))
            },
            n_rows=len(rows),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "n_rows": self.n_rows,
            "label_metrics": dict(self.label_metrics),
            "prediction": self.prediction.to_dict(),
            "numeric": {name: p.to_dict() for name, p in self.numeric.items()},
            "categorical": {name: p.to_dict() for name, p in self.categorical.items()},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ReferenceProfile:
        if raw.get("format") != PROFILE_FORMAT:
            raise ValueError(f"format {raw.get('format')!r} is not {PROFILE_FORMAT}")
        return cls(
            numeric={str(k): NumericProfile.from_dict(v) for k, v in raw["numeric"].items()},
            categorical={
                str(k): CategoricalProfile.from_dict(v) for k, v in raw["categorical"].items()
            },
            prediction=NumericProfile.from_dict(raw["prediction"]),
            label_metrics={str(k): float(v) for k, v in raw.get("label_metrics", {}).items()},
            n_rows=int(raw.get("n_rows", 0)),
        )

    def save(self, path: Path) -> Path:
        """Write the profile as JSON; returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), allow_nan=False))
        return path

    @classmethod
    def load(cls, path: Path) -> ReferenceProfile:
        """Read a profile written by :meth:`save`; a ValueError names the file when malformed."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: reference profile not found") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: reference profile is not valid JSON ({exc})") from exc
        try:
            if not isinstance(raw, dict):
                raise ValueError("expected a JSON object")
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(
                f"{path}: malformed reference profile ({detail}); rebuild it with "
                "ReferenceProfile.build(...).save(path) from the training rows"
            ) from exc


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
