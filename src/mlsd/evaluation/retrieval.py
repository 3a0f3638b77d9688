"""Offline evaluation of candidate sources and of their merge, under DESIGN.md's protocol.

Global temporal split at ``t1 < t2`` (the cut points of :mod:`mlsd.data.split`):

1. Validation: every source is fit on events before ``t1`` and recommends for the users active
   in ``[t1, t2)``; the merge quotas are grid-searched there on recall@``tune_k``, separately
   for warm and cold users by default (a cold user gets every source's fallback, so the quotas
   that serve warm users waste slots on duplicates there).
2. Test: every source is refit on everything before ``t2`` and scored on the users active at or
   after ``t2``, the merged set with the quotas from step 1. The test window picks nothing.

Each user's list ranks **all** catalog items they had not interacted with before the cutoff
(full ranking, ``exclude_seen=True``); the relevant items are their test-window items they had
not interacted with before it (an already-seen item is excluded from ranking, so it cannot be
relevant). Users without such an item are left out and counted. Users with no event before the
cutoff are cold and get each method's fallback; warm, cold and all users are reported
separately, each mean with a 95% bootstrap interval over users.

    report = evaluate_retrieval(Path("data/ml-100k"), {"popularity": PopularityRetriever})
    print(report.to_json())
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.data.schema import EVENTS_FILE, read_info
from mlsd.data.split import SplitSpec, cut_points
from mlsd.evaluation.metrics import (
    bootstrap_mean_ci,
    ndcg_at_k_score,
    paired_bootstrap_ci,
    recall_at_k_score,
)
from mlsd.evaluation.quotas import (
    MergeConfig,
    progress_bar,
    quota_grid,
    tune_quotas,
    tune_segment_quotas,
)
from mlsd.evaluation.retrieval_report import (
    Comparison,
    Estimate,
    MethodResult,
    PairedEstimate,
    RetrievalReport,
    ValidationResult,
    _finite,
)
from mlsd.evaluation.retrieval_windows import EvalTask, catalog_as_of, load_dataset, make_task
from mlsd.evaluation.stages import recommend_excluding
from mlsd.models.retrieval.base import IntArray, Retriever
from mlsd.models.retrieval.merge import QUOTAS, Fusion, Quota, merge_by_segment

__all__ = [
    "MERGED",
    "SEGMENTS",
    "Comparison",
    "Estimate",
    "EvalTask",
    "MergeConfig",
    "MethodResult",
    "ProtocolConfig",
    "RetrievalReport",
    "SourceFactory",
    "SourceRun",
    "ValidationResult",
    "_finite",
    "catalog_as_of",
    "compare",
    "evaluate_retrieval",
    "load_dataset",
    "make_task",
    "quota_grid",
    "run_sources",
    "segment_masks",
    "tune_quotas",
    "tune_segment_quotas",
]

SourceFactory = Callable[[], Retriever]
"""Makes a fresh, unfitted retriever (each window fits its own)."""

MERGED = "merged"
SEGMENTS = ("all", "warm", "cold")
"""The user groups every metric is reported on."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Cut points, cutoffs and statistics of the evaluation (``[retrieval]`` in the config).

    Attributes:
        val_frac, test_frac: the windows' shares, cut as :func:`mlsd.data.split.cut_points`.
        split_by: ``"events"`` (quantiles of event times) or ``"time"`` (fractions of the span).
        ks: recall cutoffs; the lists are ``max(ks)`` long.
        ndcg_k: the NDCG cutoff.
        min_value: relevant test events need ``value >= min_value`` (e.g. 4 stars: the "liked"
            variant); ``None`` counts every event.
        n_bootstrap: bootstrap resamples of the users.
        confidence: coverage of the intervals.
        seed: seeds the bootstrap and the sample of tuning users.
    """

    val_frac: float = 0.1
    test_frac: float = 0.2
    split_by: Literal["events", "time"] = "events"
    ks: tuple[int, ...] = (50, 100, 200, 500)
    ndcg_k: int = 10
    min_value: float | None = None
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def bootstrap_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~mlsd.evaluation.metrics.bootstrap_mean_ci` (and of
        the paired intervals): every interval of a report from the same resamples."""
        return {"n_resamples": self.n_bootstrap, "confidence": self.confidence, "seed": self.seed}

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1 or self.ndcg_k < 1:
            raise ValueError(f"ks and ndcg_k must be >= 1, got ks={self.ks}, ndcg_k={self.ndcg_k}")
        if self.n_bootstrap < 1 or not 0.0 < self.confidence < 1.0:
            raise ValueError(
                f"n_bootstrap must be >= 1 and confidence in (0, 1), got {self.n_bootstrap}, "
                f"{self.confidence}"
            )


def protocol_text(protocol: ProtocolConfig, merge: MergeConfig | None = None) -> str:
    """The protocol in one paragraph, for every report; ``merge``: how the merged set was made
    (``None``: the sources alone)."""
    liked = "" if protocol.min_value is None else f" with value >= {protocol.min_value}"
    merged = "each source alone, no merge" if merge is None else merge.describe()
    return (
        f"global temporal split by {protocol.split_by} (val_frac={protocol.val_frac}, "
        f"test_frac={protocol.test_frac}): {merged}; "
        "final numbers from sources refit on ts < t2 and scored on the test window "
        "ts >= t2. Full ranking over every catalog item the user had not interacted with before "
        f"t2; relevant = the user's test-window items{liked} not interacted with before t2 "
        "(already-seen items are excluded from ranking, so they cannot be relevant); users "
        "without a relevant item are left out. Cold users (no event before t2) get each "
        f"method's fallback. Means over users with {protocol.confidence:.0%} bootstrap "
        f"intervals ({protocol.n_bootstrap} resamples, seed {protocol.seed})."
    )


@dataclass(frozen=True)
class SourceRun:
    """One source fit on a window: its ``(n_users, L)`` lists and timings (seconds)."""

    items: IntArray
    fit_seconds: float
    recommend_seconds: float


def run_sources(
    task: EvalTask,
    sources: Mapping[str, SourceFactory],
    k: int,
    *,
    progress: bool = False,
    label: str = "",
) -> dict[str, SourceRun]:
    """Fit each source on ``task.train`` and recommend ``k`` unseen items to every target user
    (none of ``task.exclude`` either)."""
    runs: dict[str, SourceRun] = {}
    with progress_bar(progress) as bar:
        job = bar.add_task(label or "sources", total=len(sources))
        for name, make in sources.items():
            bar.update(job, description=f"{label} {name}: fit")
            start = time.perf_counter()
            retriever = make().fit(task.train)
            fitted = time.perf_counter()
            bar.update(job, description=f"{label} {name}: recommend")
            items, _ = recommend_excluding(retriever, task.user_ids, k, task.exclude)
            runs[name] = SourceRun(items, fitted - start, time.perf_counter() - fitted)
            bar.advance(job)
    return runs


def _subsample(task: EvalTask, n: int, seed: int) -> npt.NDArray[np.int64]:
    rows = np.arange(len(task.user_ids))
    if len(rows) <= n:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


PerUser: TypeAlias = dict[str, npt.NDArray[np.float64]]
"""Metric name → ``(n_users,)`` per-user scores."""


def per_user_scores(
    lists_at: Callable[[int], IntArray], task: EvalTask, protocol: ProtocolConfig
) -> PerUser:
    """Each user's recall@ks and NDCG@ndcg_k."""
    per_user = {
        f"recall@{k}": recall_at_k_score(lists_at(k), task.relevant, k=k) for k in protocol.ks
    }
    k = protocol.ndcg_k
    per_user[f"ndcg@{k}"] = ndcg_at_k_score(lists_at(k), task.relevant, k=k)
    return per_user


def estimates(
    per_user: PerUser, task: EvalTask, protocol: ProtocolConfig
) -> dict[str, dict[str, Estimate | None]]:
    """Segment → metric → mean over the segment's users with its bootstrap interval."""
    return {
        segment: {
            metric: Estimate(*bootstrap_mean_ci(values[mask], **protocol.bootstrap_options()))
            if mask.any()
            else None
            for metric, values in per_user.items()
        }
        for segment, mask in segment_masks(task).items()
    }


def segment_masks(task: EvalTask) -> dict[str, npt.NDArray[np.bool_]]:
    """``all``, ``warm``, ``cold`` → which of the task's users are in the segment."""
    warm = task.warm
    return dict(zip(SEGMENTS, (np.ones(len(warm), bool), warm, ~warm), strict=True))


def compare(
    per_user: Mapping[str, PerUser],
    method: str,
    baseline: str,
    metric: str,
    task: EvalTask,
    protocol: ProtocolConfig,
) -> Comparison:
    """``method`` against ``baseline`` on ``metric`` per segment: the ratio and difference of
    their means, with intervals from resampling the same users for both."""
    mine, theirs = per_user[method][metric], per_user[baseline][metric]
    segments = {
        segment: PairedEstimate(
            *paired_bootstrap_ci(mine[mask], theirs[mask], **protocol.bootstrap_options())
        )
        if mask.any()
        else None
        for segment, mask in segment_masks(task).items()
    }
    return Comparison(method, baseline, metric, segments)


def evaluate_retrieval(
    dataset_dir: Path,
    sources: Mapping[str, SourceFactory],
    *,
    protocol: ProtocolConfig | None = None,
    merge: MergeConfig | None = None,
    progress: bool = False,
) -> RetrievalReport:
    """Run the protocol (module docstring) for ``sources`` and, with ``merge``, their merge.

    Args:
        dataset_dir: a contract directory (``events.parquet``, ``users.parquet``, ...).
        sources: name → factory of an unfitted retriever, in merge priority order.
        protocol: cut points, ks and bootstrap settings.
        merge: how to merge the sources; ``None`` scores the sources alone.
        progress: rich progress bars (on stderr) over the sources.

    Returns:
        The :class:`RetrievalReport`.
    """
    protocol = protocol or ProtocolConfig()
    if not sources:
        raise ValueError("evaluate_retrieval needs at least one source")
    events, users, items = load_dataset(dataset_dir)
    spec = cut_points(
        Path(dataset_dir) / EVENTS_FILE,
        val_frac=protocol.val_frac,
        test_frac=protocol.test_frac,
        by=protocol.split_by,
    )
    k_max = max(*protocol.ks, protocol.ndcg_k)
    quotas: dict[str, Quota] = {}
    cold_quotas: dict[str, Quota] | None = None
    validation = None
    if merge is not None:
        quotas, cold_quotas, validation = _merge_quotas(
            events, users, items, spec, sources, protocol, merge, progress=progress
        )
    test = make_task(events, users, items, cutoff=spec.t2, end=None, min_value=protocol.min_value)
    if len(test.user_ids) == 0:
        raise ValueError(
            f"{dataset_dir}: no test user has a relevant item at or after t2={spec.t2}"
        )
    runs = run_sources(test, sources, k_max, progress=progress, label="test")
    per_user = {
        name: per_user_scores(_prefixes(run.items), test, protocol) for name, run in runs.items()
    }
    methods = [
        MethodResult(
            name,
            run.fit_seconds,
            run.recommend_seconds,
            estimates(per_user[name], test, protocol),
        )
        for name, run in runs.items()
    ]
    comparisons = []
    if merge is not None:
        merged, per_user[MERGED] = _merged_result(
            runs, quotas, cold_quotas, merge.fusion, test, protocol
        )
        methods.append(merged)
        comparisons = [
            compare(per_user, MERGED, name, f"recall@{k}", test, protocol)
            for k in protocol.ks
            for name in runs
        ]
    counts = {
        "n_train_events": len(test.train.events),
        "n_catalog_items": len(test.train.items),
        "n_test_active_users": test.n_active_users,
        "n_test_users": len(test.user_ids),
        "n_warm_users": int(test.warm.sum()),
        "n_cold_users": int((~test.warm).sum()),
        "n_relevant": int(sum(len(r) for r in test.relevant)),
    }
    return RetrievalReport(
        protocol=protocol_text(protocol, merge),
        dataset=read_info(Path(dataset_dir)).name,
        t1=spec.t1.isoformat(),
        t2=spec.t2.isoformat(),
        counts=counts,
        ks=tuple(protocol.ks),
        ndcg_k=protocol.ndcg_k,
        methods=methods,
        quotas=quotas,
        validation=validation,
        cold_quotas=cold_quotas,
        comparisons=comparisons,
        fusion=merge.fusion if merge is not None else QUOTAS,
    )


def _prefixes(items: IntArray) -> Callable[[int], IntArray]:
    """``k → items[:, :k]``: a ranked list's top k is its prefix."""
    return lambda k: items[:, :k]


def _merge_quotas(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    spec: SplitSpec,
    sources: Mapping[str, SourceFactory],
    protocol: ProtocolConfig,
    merge: MergeConfig,
    *,
    progress: bool,
) -> tuple[dict[str, Quota], dict[str, Quota] | None, ValidationResult | None]:
    """Warm (or everyone's) and cold quotas: tuned on validation (sources fit before t1), or
    the configured ones; and the search's record."""
    if not merge.tune:
        return (*merge.fixed(list(sources)), None)
    val = make_task(events, users, items, cutoff=spec.t1, end=spec.t2, min_value=protocol.min_value)
    if len(val.user_ids) == 0:
        raise ValueError(f"no validation user has a relevant item in [{spec.t1}, {spec.t2})")
    runs = run_sources(val, sources, merge.tune_k, progress=progress, label="validation")
    rows = _subsample(val, merge.max_tune_users, protocol.seed)
    lists = {name: run.items[rows] for name, run in runs.items()}
    relevant = [val.relevant[i] for i in rows]
    warm = val.warm[rows]
    quotas, cold_quotas, n_grid = tune_segment_quotas(
        lists, relevant, warm, merge, progress=progress
    )
    k = merge.tune_k
    per_user = {name: recall_at_k_score(lst, relevant, k=k) for name, lst in lists.items()}
    merged = merge_by_segment(
        lists, quotas, k, cold=~warm, cold_quotas=cold_quotas, fusion=merge.fusion
    )
    per_user[MERGED] = recall_at_k_score(merged.item_ids, relevant, k=k)
    segment_recall = {
        segment: {name: float(r[mask].mean()) for name, r in per_user.items()}
        for segment, mask in (("warm", warm), ("cold", ~warm))
        if mask.any()
    }
    return (
        dict(quotas),
        None if cold_quotas is None else dict(cold_quotas),
        ValidationResult(
            n_users=len(val.user_ids),
            n_tune_users=len(rows),
            tune_k=k,
            recall={name: float(r.mean()) for name, r in per_user.items()},
            quotas=quotas,
            n_candidates=n_grid,
            cold_quotas=cold_quotas,
            segment_recall=segment_recall,
        ),
    )


def _merged_result(
    runs: Mapping[str, SourceRun],
    quotas: Mapping[str, Quota],
    cold_quotas: Mapping[str, Quota] | None,
    fusion: Fusion,
    task: EvalTask,
    protocol: ProtocolConfig,
) -> tuple[MethodResult, PerUser]:
    """The merged set at each k: every source's top-k merged into k with the quotas; and its
    per-user scores."""
    start = time.perf_counter()
    by_k = {
        k: merge_by_segment(
            {n: r.items[:, :k] for n, r in runs.items()},
            quotas,
            k,
            cold=~task.warm,
            cold_quotas=cold_quotas,
            fusion=fusion,
        ).item_ids
        for k in {*protocol.ks, protocol.ndcg_k}
    }
    merge_seconds = time.perf_counter() - start
    per_user = per_user_scores(by_k.__getitem__, task, protocol)
    result = MethodResult(
        MERGED,
        sum(run.fit_seconds for run in runs.values()),
        sum(run.recommend_seconds for run in runs.values()) + merge_seconds,
        estimates(per_user, task, protocol),
    )
    return result, per_user
