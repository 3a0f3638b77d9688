"""What a retrieval evaluation returns: per-method estimates, the quota search, the JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from mlsd.models.retrieval.merge import QUOTAS, Fusion, Quota


@dataclass(frozen=True)
class Estimate:
    """A mean over users with its bootstrap interval."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedEstimate:
    """One method's mean over another's on the same users (``ratio``) and their difference,
    each with a paired bootstrap interval (:func:`mlsd.evaluation.metrics.paired_bootstrap_ci`).
    ``ratio`` and its bounds are NaN (``null`` in JSON) when the other's mean is 0."""

    ratio: float
    ratio_low: float
    ratio_high: float
    difference: float
    difference_low: float
    difference_high: float


@dataclass(frozen=True)
class Comparison:
    """``method`` against ``baseline`` on ``metric``, paired over the same test users.

    Attributes:
        segments: ``all``, ``warm``, ``cold`` → the ratio and difference of the two means with
            paired bootstrap intervals (None: no user in the segment).
    """

    method: str
    baseline: str
    metric: str
    segments: dict[str, PairedEstimate | None]


@dataclass(frozen=True)
class MethodResult:
    """One source (or the merged set) on the test window.

    Attributes:
        name: the source name, or ``"merged"``.
        fit_seconds: wall seconds of the fit on everything before ``t2`` (merged: the sum).
        recommend_seconds: wall seconds to recommend for every test user.
        metrics: segment (``all``, ``warm``, ``cold``) → metric (``recall@50``, ``ndcg@10``)
            → estimate; ``None`` for an empty segment.
    """

    name: str
    fit_seconds: float
    recommend_seconds: float
    metrics: dict[str, dict[str, Estimate | None]]


@dataclass(frozen=True)
class ValidationResult:
    """The quota search on the validation window (sources fit before ``t1``).

    Attributes:
        n_users: validation users with a relevant item (``n_tune_users`` of them searched).
        recall: name → mean validation recall@``tune_k`` over the searched users (sources and
            the tuned merge).
        quotas: the chosen fractions of k for warm users (for everyone without ``cold_quotas``).
        n_candidates: quota vectors tried per search.
        cold_quotas: the chosen fractions of k for cold users; ``None`` when not split.
        segment_recall: ``"warm"``/``"cold"`` → name → mean recall over that segment's users.
    """

    n_users: int
    n_tune_users: int
    tune_k: int
    recall: dict[str, float]
    quotas: dict[str, float]
    n_candidates: int
    cold_quotas: dict[str, float] | None = None
    segment_recall: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrievalReport:
    """Everything :func:`~mlsd.evaluation.retrieval.evaluate_retrieval` measured.

    ``quotas`` serve warm users, and everyone when ``cold_quotas`` is ``None``.
    """

    protocol: str
    dataset: str
    t1: str
    t2: str
    counts: dict[str, int]
    ks: tuple[int, ...]
    ndcg_k: int
    methods: list[MethodResult]
    quotas: dict[str, Quota]
    validation: ValidationResult | None
    cold_quotas: dict[str, Quota] | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    """The merged set against each source on recall at every k, paired over the test users."""
    fusion: Fusion = QUOTAS
    """How the quotas merged the sources (with ``"rrf"``, they are the sources' weights)."""

    def method(self, name: str) -> MethodResult:
        """The result of one source, or of ``"merged"``."""
        for result in self.methods:
            if result.name == name:
                return result
        raise KeyError(f"no method {name!r}; have {[m.name for m in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dicts; NaN becomes None."""
        raw: dict[str, Any] = _finite(dataclasses.asdict(self))
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _finite(value: Any) -> Any:
    """NaN/inf → None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
