"""The reference profile: what the ranker's inputs and outputs looked like at training time.

Monitoring compares a live window of logged ranker rows against this profile, so it stores
exactly what the drift statistics of :mod:`mlsd.monitoring.drift` need, and nothing that could
leak training data:

- per numeric feature (at float32 precision, as logged): decile bin edges of the reference
  values (ties deduplicated, so a mass point such as "0 events" gets one bin of its own; a
  constant column keeps one edge, i.e. two bins), the reference share of each bin (for PSI),
  summary statistics, and a fixed-size uniform sample drawn with a seeded generator (for the
  two-sample Kolmogorov–Smirnov test);
- per categorical feature: the count of every code (for chi-squared and PSI on categories);
- the prediction (the ranker's score) profiled like a numeric feature;
- training-time label metrics when known (``ctr``, ``ndcg_at_10``, ``ece``), the baseline of
  the live label metrics;
- when the rows' times are given, per numeric feature its **time PSI**: the PSI of the later
  half of the rows (by time) against the earlier half, over the profile's bins. A feature whose
  distribution moves that much *within* the reference window is a function of the calendar
  (e.g. "days since the item's first event" when most items were first seen when the data
  began), so it will keep moving after it whatever happens to the world; :mod:`.drift` reports
  such a feature as time-trending instead of counting it as drifted.

Bins are right-closed: with inner edges ``e_0 < ... < e_{m-1}`` the bins are ``(-inf, e_0]``,
``(e_0, e_1]``, ..., ``(e_{m-1}, inf)``, so :func:`bin_index` is one ``searchsorted``.

Profiles are JSON (never pickle: serving and monitoring load them) with a format version::

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
LABEL_METRICS = ("ctr", "ndcg_at_10", "ece")
"""Training-time label metrics a profile may carry: click-through (base) rate, NDCG@10 on the
validation users, expected calibration error of the score against clicks."""


def finite(values: npt.ArrayLike) -> FloatArray:
    """``values`` as float64 with NaN and ±inf dropped."""
    array = np.asarray(values, dtype=np.float64).ravel()
    out: FloatArray = array[np.isfinite(array)]
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
    bins ``edges``; NaN when a half is empty or all times are equal.

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
    if not late.any() or late.all():
        return math.nan
    return psi(bin_shares(edges, x[~late]), bin_shares(edges, x[late]))


@dataclass(frozen=True)
class NumericProfile:
    """One numeric column at reference time.

    Attributes:
        edges: inner bin edges, strictly increasing (decile cut points, ties merged).
        shares: ``(len(edges) + 1,)`` reference share of each bin; sums to 1.
        n: finite reference values; ``mean``/``std``/``min``/``max`` describe them.
        sample: a uniform sample of at most :data:`SAMPLE_SIZE` reference values, for KS.
        time_psi: :func:`time_psi` of the reference values (NaN when their times are unknown).
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
        """Profile ``values`` (non-finite values are ignored).

        Values are rounded to float32 first, the precision of the service log, so a value on an
        edge (e.g. a mean of exactly 0.1) falls in the same bin at reference and at live time.
        ``times`` (one per value, any monotone unit) gives the profile its ``time_psi``.
        """
        x = finite(np.asarray(values, dtype=np.float64).astype(np.float32))
        if len(x) == 0:
            nan = math.nan
            return cls(edges=(), shares=(1.0,), n=0, mean=nan, std=nan, min=nan, max=nan, sample=())
        quantiles = np.quantile(x, np.arange(1, n_bins) / n_bins)
        edges = np.unique(quantiles)  # sorted, ties merged; a constant column keeps one edge
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
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NumericProfile:
        edges = tuple(float(e) for e in raw["edges"])
        shares = tuple(float(s) for s in raw["shares"])
        if len(shares) != len(edges) + 1 or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("edges must increase strictly and shares need len(edges) + 1 values")
        stats = {k: math.nan if raw[k] is None else float(raw[k]) for k in ("mean", "std")}
        bounds = {k: math.nan if raw[k] is None else float(raw[k]) for k in ("min", "max")}
        return cls(
            edges=edges,
            shares=shares,
            n=int(raw["n"]),
            sample=tuple(float(v) for v in raw["sample"]),
            time_psi=math.nan if raw.get("time_psi") is None else float(raw["time_psi"]),
            **stats,
            **bounds,
        )


@dataclass(frozen=True)
class CategoricalProfile:
    """One categorical (int code) column at reference time: ``counts`` code → rows."""

    counts: Mapping[int, int]

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def shares(self) -> dict[int, float]:
        total = self.n
        return {code: count / total for code, count in self.counts.items()} if total else {}

    @classmethod
    def build(cls, codes: npt.ArrayLike) -> CategoricalProfile:
        values = pd.Series(np.asarray(codes).ravel()).dropna().astype(np.int64)
        counts = values.value_counts().sort_index()
        return cls(counts={int(k): int(v) for k, v in counts.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(code): count for code, count in self.counts.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CategoricalProfile:
        return cls(counts={int(code): int(count) for code, count in raw["counts"].items()})


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
