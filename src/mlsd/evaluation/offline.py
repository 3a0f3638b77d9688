"""The offline evaluation of the whole pipeline next to its baselines, under one stated protocol.

**Temporal** (the default, DESIGN.md): cut points ``t1 < t2``.

1. Sources fit on ``ts < t1`` list candidates for the users active in ``[t1, t2)``; the merge
   quotas are tuned there (validation recall), the candidates get features as of ``t1`` and
   labels from ``[t1, t2)``; each ranker learns from 1 - ``ranker_valid_frac`` of those users
   and is scored (AUC) and calibrated on the rest.
2. Sources refit on ``ts < t2`` list candidates for the test users (active at or after
   ``t2``), with features as of ``t2``; the rankers order them, the re-ranker shapes the list.
   Baselines rank the **whole catalog** (full ranking, already-seen items excluded); the
   pipeline's list is its ranked candidates (an item it did not retrieve counts as a miss).

**Random per user** (only to compare with published numbers, labelled as such): each user's
events split at random into train/test (stratified per user, ``test_frac``); the ranker's
labels come from an inner random split of train. Time-based features are computed as of the
end of the training data.

Every metric is a mean over users with a bootstrap interval, for all, warm and cold users, and
by user-activity decile.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from rich.console import Console
from rich.progress import Progress, TaskID

from mlsd.data.schema import EVENTS_FILE, ITEMS_FILE, USERS_FILE, read_info
from mlsd.data.split import cut_points
from mlsd.evaluation.metrics import (
    average_precision_at_k_score,
    bootstrap_mean_ci,
    calibration_curve,
    catalog_coverage_score,
    expected_calibration_error,
    grouped_auc_score,
    hit_rate_at_k_score,
    intra_list_diversity_score,
    log_loss,
    ndcg_at_k_score,
    novelty_score,
    precision_at_k_score,
    recall_at_k_score,
    roc_auc_score,
)
from mlsd.evaluation.retrieval import (
    SEGMENTS,
    EvalTask,
    MergeConfig,
    ProtocolConfig,
    _finite,
    load_dataset,
    make_task,
    tune_quotas,
)
from mlsd.evaluation.retrieval import SourceRun as _SourceRun
from mlsd.evaluation.stages import (
    RankerFactory,
    Retrieved,
    Rows,
    SourceFactory,
    merge,
    rank_lists,
    retrieve,
    split_groups,
    to_rows,
    window_frame,
)
from mlsd.features.batch import feature_config_for
from mlsd.features.definitions import FeatureConfig
from mlsd.models.ranking.base import FloatArray, Ranker
from mlsd.models.ranking.calibration import Calibrator
from mlsd.models.retrieval.base import IntArray, RetrievalData
from mlsd.models.retrieval.merge import Quota
from mlsd.serving.rerank import RerankConfig, rerank_lists

Protocol = Literal["temporal", "random-per-user"]
AUTO = "auto"
"""``PipelineConfig.ranker`` value: use the ranker with the best held-out grouped AUC."""
PIPELINE = "mlsd"
"""The full pipeline's name in every table: retrieval + ranking + re-ranking."""


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline under evaluation (``[ranking]`` in the system's TOML).

    Attributes:
        n_candidates: merged candidates per user (each source lists this many).
        ranker: the rankers' key the full pipeline uses, or ``"auto"``: the best NDCG@10 of
            the held-out users' candidates — chosen on validation, never on test.
        ranker_windows: label windows the rankers learn from (temporal protocol): the
            validation window [t1, t2) and ``ranker_windows - 1`` earlier windows of the same
            span, each with its own sources fit before it and features as of its start.
        ranker_valid_frac: users of the ranker's window held out for early stopping, AUC and
            calibration.
        calibration: ``"platt"`` or ``"isotonic"``.
        rerank: the re-ranking stage of the full pipeline.
        rerank_variants: extra re-ranking settings whose cost and gain the report shows.
        baselines: sources also scored alone (full ranking).
        ks: list cutoffs of every metric.
        merge: how the quotas are found (tuned on the ranker's window by default).
    """

    n_candidates: int = 200
    ranker: str = AUTO
    ranker_windows: int = 3
    ranker_valid_frac: float = 0.2
    calibration: Literal["platt", "isotonic"] = "isotonic"
    rerank: RerankConfig = field(default_factory=RerankConfig)
    rerank_variants: Mapping[str, RerankConfig] = field(
        default_factory=lambda: {
            "mmr 0.7": RerankConfig(mmr_lambda=0.7),
            "freshness 0.3": RerankConfig(freshness_weight=0.3),
            "max 3 per category": RerankConfig(max_per_category=3),
        }
    )
    baselines: tuple[str, ...] = ("popularity", "ease", "als", "bpr")
    ks: tuple[int, ...] = (10, 20, 50, 100)
    merge: MergeConfig = field(default_factory=lambda: MergeConfig(quota_step=0.2))

    def __post_init__(self) -> None:
        if self.n_candidates < max(self.ks):
            raise ValueError(
                f"n_candidates={self.n_candidates} must be >= the largest k ({max(self.ks)})"
            )
        if self.ranker_windows < 1:
            raise ValueError(f"ranker_windows={self.ranker_windows}: must be >= 1")
        if not 0.0 < self.ranker_valid_frac < 1.0:
            raise ValueError(f"ranker_valid_frac={self.ranker_valid_frac}: must be in (0, 1)")


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class MethodScores:
    """One method on the test users.

    Attributes:
        kind: ``"baseline"`` (a source alone, full ranking), ``"ranker"`` (candidates ordered
            by one ranker, no re-ranking) or ``"pipeline"`` (the full pipeline).
        metrics: segment → metric (``ndcg@10``, ``recall@20``, ...) → estimate (None: empty).
        beyond: ``ild@10``, ``novelty@10``, ``coverage@10``.
        deciles: user-activity bucket → NDCG@10 mean (``cold`` and ``d1``..``d10``).
    """

    name: str
    kind: str
    metrics: dict[str, dict[str, Estimate | None]]
    beyond: dict[str, float]
    deciles: dict[str, float]


@dataclass(frozen=True)
class RankerScores:
    """A ranker on its held-out users (the ranker windows): NDCG@10 of their candidates
    ordered by the ranker, AUC, per-user AUC, log loss, times."""

    name: str
    valid_ndcg: float
    valid_auc: float
    valid_grouped_auc: float
    valid_log_loss: float
    fit_seconds: float
    predict_seconds_per_1k: float


@dataclass(frozen=True)
class OfflineReport:
    protocol_name: str
    protocol: str
    dataset: str
    cut_points: dict[str, str]
    counts: dict[str, int]
    ks: tuple[int, ...]
    methods: list[MethodScores]
    rankers: list[RankerScores]
    pipeline_ranker: str
    calibration: dict[str, Any]
    rerank: list[dict[str, Any]]
    quotas: dict[str, Quota]
    timings: dict[str, float]
    feature_importance: dict[str, float]

    def method(self, name: str) -> MethodScores:
        for result in self.methods:
            if result.name == name:
                return result
        raise KeyError(f"no method {name!r}; have {[m.name for m in self.methods]}")

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = _finite(dataclasses.asdict(self))
        return raw


class _Clock:
    """Wall seconds per named stage (summed over repeats)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class _LabelWindow:
    """A window of labels: targets, the events that label them, the features' time and data."""

    task: EvalTask
    events: pd.DataFrame
    as_of: pd.Timestamp
    dataset_dir: Path


def evaluate_pipeline(
    dataset_dir: Path,
    sources: Mapping[str, SourceFactory],
    rankers: Mapping[str, RankerFactory],
    *,
    protocol: ProtocolConfig | None = None,
    pipeline: PipelineConfig | None = None,
    protocol_name: Protocol = "temporal",
    feature_config: FeatureConfig | None = None,
    progress: bool = False,
) -> OfflineReport:
    """Evaluate the pipeline (``sources`` → merge → ``rankers[pipeline.ranker]`` → re-rank)
    next to each baseline source and each ranker alone, under ``protocol_name``.

    Args:
        dataset_dir: a contract directory.
        sources: name → factory of an unfitted retriever, in merge priority order.
        rankers: name → factory of an unfitted ranker; ``pipeline.ranker`` must be one.
        protocol: cut points, bootstrap settings (``ks`` there are ignored: the pipeline's
            ``ks`` rule), ``min_value``.
        pipeline: the pipeline's settings.
        protocol_name: ``"temporal"`` or ``"random-per-user"``.
        feature_config: the feature step's settings (default: derived from the dataset).
        progress: progress bars on stderr.
    """
    protocol = protocol or ProtocolConfig()
    pipeline = pipeline or PipelineConfig()
    if pipeline.ranker != AUTO and pipeline.ranker not in rankers:
        raise ValueError(f"pipeline ranker {pipeline.ranker!r} is not one of {sorted(rankers)}")
    missing = [b for b in pipeline.baselines if b not in sources]
    if missing:
        raise ValueError(f"baselines {missing} are not sources {list(sources)}")
    dataset_dir = Path(dataset_dir)
    feature_config = feature_config or feature_config_for(dataset_dir)
    clock = _Clock()
    with clock.stage("load"):
        events, users, items = load_dataset(dataset_dir)
    run = _Run(dataset_dir, sources, rankers, protocol, pipeline, feature_config, clock, progress)
    if protocol_name == "temporal":
        return run.temporal(events, users, items)
    if protocol_name == "random-per-user":
        return run.random_per_user(events, users, items)
    raise ValueError(f"protocol {protocol_name!r}: use 'temporal' or 'random-per-user'")


@dataclass
class _Run:
    dataset_dir: Path
    sources: Mapping[str, SourceFactory]
    rankers: Mapping[str, RankerFactory]
    protocol: ProtocolConfig
    pipeline: PipelineConfig
    feature_config: FeatureConfig
    clock: _Clock
    progress: bool

    # -- protocols -------------------------------------------------------------------------

    def temporal(
        self, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame
    ) -> OfflineReport:
        spec = cut_points(
            self.dataset_dir / EVENTS_FILE,
            val_frac=self.protocol.val_frac,
            test_frac=self.protocol.test_frac,
            by=self.protocol.split_by,
        )
        min_value = self.protocol.min_value
        span = spec.t2 - spec.t1
        windows = []
        with self.clock.stage("split"):
            # The validation window [t1, t2) last (it tunes the quotas), earlier ones before it.
            for i in reversed(range(self.pipeline.ranker_windows)):
                start, end = spec.t1 - i * span, spec.t2 - i * span
                task = make_task(events, users, items, cutoff=start, end=end, min_value=min_value)
                if len(task.user_ids) == 0:
                    continue
                in_window = (events["ts"] >= start) & (events["ts"] < end)
                windows.append(_LabelWindow(task, events[in_window], start, self.dataset_dir))
            test = make_task(events, users, items, cutoff=spec.t2, end=None, min_value=min_value)
        if not windows or windows[-1].as_of != spec.t1 or len(test.user_ids) == 0:
            raise ValueError(f"{self.dataset_dir}: the validation or test window has no user")
        target = _LabelWindow(test, events[events["ts"] >= spec.t2], spec.t2, self.dataset_dir)
        report = self._evaluate(windows, target, items)
        return dataclasses.replace(
            report,
            protocol_name="temporal",
            protocol=temporal_text(self.protocol, self.pipeline),
            cut_points={"t1": spec.t1.isoformat(), "t2": spec.t2.isoformat()},
        )

    def random_per_user(
        self, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame
    ) -> OfflineReport:
        seed = self.protocol.seed
        frac = self.protocol.test_frac
        with self.clock.stage("split"):
            train, test_events = random_split_per_user(events, test_frac=frac, seed=seed)
            inner, inner_holdout = random_split_per_user(train, test_frac=frac, seed=seed + 1)
        with tempfile.TemporaryDirectory(prefix="mlsd-random-") as tmp:
            inner_dir = write_contract(Path(tmp) / "inner", inner, users, items)
            train_dir = write_contract(Path(tmp) / "train", train, users, items)
            val, val_asof = _random_task(inner, inner_holdout, users, items, self.protocol)
            test, test_asof = _random_task(train, test_events, users, items, self.protocol)
            report = self._evaluate(
                [_LabelWindow(val, inner_holdout, val_asof, inner_dir)],
                _LabelWindow(test, test_events, test_asof, train_dir),
                items,
            )
        return dataclasses.replace(
            report,
            protocol_name="random-per-user",
            protocol=random_text(self.protocol, self.pipeline),
            cut_points={"train_end": test_asof.isoformat()},
        )

    # -- the shared body -------------------------------------------------------------------

    def _frame(
        self,
        window: _LabelWindow,
        retrieved: Retrieved,
        quotas: Mapping[str, Quota],
        items: pd.DataFrame,
    ) -> pd.DataFrame:
        k = self.pipeline.n_candidates
        return window_frame(
            window.task.user_ids,
            merge(retrieved, quotas, k),
            retrieved,
            dataset_dir=window.dataset_dir,
            train_events=window.task.train.events,
            as_of=window.as_of,
            label_window=window.events,
            feature_config=self.feature_config,
            items=items,
            min_value=self.protocol.min_value,
        )

    def _retrieve(self, window: _LabelWindow, bar: Progress, job: TaskID, label: str) -> Retrieved:
        def show(name: str) -> None:
            bar.update(job, description=f"{label}: fit {name}")

        with self.clock.stage(f"retrieval ({label})"):
            return retrieve(
                window.task.train,
                window.task.user_ids,
                self.sources,
                k=self.pipeline.n_candidates,
                on_source=show,
            )

    def _evaluate(
        self, windows: list[_LabelWindow], target: _LabelWindow, items: pd.DataFrame
    ) -> OfflineReport:
        k_list = self.pipeline.n_candidates
        with _bar(self.progress) as bar:
            job = bar.add_task("ranker windows", total=None)
            retrieved = {len(windows) - 1: self._retrieve(windows[-1], bar, job, "ranker window")}
            with self.clock.stage("merge quota search"):
                quotas = self._quotas(retrieved[len(windows) - 1], windows[-1].task)
            frames = []
            for i, window in enumerate(windows):
                if i not in retrieved:
                    retrieved[i] = self._retrieve(window, bar, job, "ranker window")
                bar.update(job, description=f"ranker window {i + 1}: features")
                with self.clock.stage("features (ranker windows)"):
                    frames.append(self._frame(window, retrieved.pop(i), quotas, items))
            rows, vocabulary, _ = to_rows(frames, self.feature_config)
            fit_data, valid_data = split_groups(
                rows.data, valid_frac=self.pipeline.ranker_valid_frac, seed=self.protocol.seed
            )
            fitted: dict[str, Ranker] = {}
            ranker_scores = []
            for name, make in self.rankers.items():
                bar.update(job, description=f"fit ranker {name}")
                with self.clock.stage(f"fit ranker {name}"):
                    start = time.perf_counter()
                    fitted[name] = make().fit(fit_data, valid_data)
                    fit_seconds = time.perf_counter() - start
                ranker_scores.append(_ranker_scores(name, fitted[name], valid_data, fit_seconds))
            chosen_name = self._choose(ranker_scores)
            chosen = fitted[chosen_name]
            calibrator = Calibrator(method=self.pipeline.calibration).fit(
                chosen.predict(valid_data.features), valid_data.label
            )
            test = target.task
            test_retrieved = self._retrieve(target, bar, job, "test")
            bar.update(job, description="test: features")
            with self.clock.stage("features (test)"):
                test_frame = self._frame(target, test_retrieved, quotas, items)
                test_rows, _, _ = to_rows([test_frame], self.feature_config, vocabulary)
            bar.update(job, description="test: scoring")
            scorer = _Scorer(test, self.protocol, self.pipeline, test_rows)
            methods = [
                scorer.score(name, "baseline", test_retrieved.lists.items[name])
                for name in self.pipeline.baselines
            ]
            scored: dict[str, FloatArray] = {}
            for name, ranker in fitted.items():
                with self.clock.stage(f"rank test ({name})"):
                    scored[name] = ranker.predict(test_rows.data.features)
                ranked, _ = rank_lists(test.user_ids, test_rows.pairs, scored[name], k=k_list)
                methods.append(scorer.score(f"ranker {name}", "ranker", ranked))
            ranked, ranked_scores = rank_lists(
                test.user_ids, test_rows.pairs, scored[chosen_name], k=k_list
            )
            with self.clock.stage("re-rank (test)"):
                final = scorer.rerank(ranked, ranked_scores, self.pipeline.rerank)
            methods.append(scorer.score(PIPELINE, "pipeline", final))
            settings = {"pipeline": self.pipeline.rerank, **self.pipeline.rerank_variants}
            variants = [scorer.variant("ranked, no re-ranking", ranked)]
            variants += [
                scorer.variant(label, scorer.rerank(ranked, ranked_scores, config))
                for label, config in settings.items()
            ]
        probs = calibrator.transform(scored[chosen_name])
        return OfflineReport(
            protocol_name="",
            protocol="",
            dataset=read_info(self.dataset_dir).name,
            cut_points={},
            counts=_counts(windows[-1].task, test, rows, test_rows),
            ks=tuple(self.pipeline.ks),
            methods=methods,
            rankers=ranker_scores,
            pipeline_ranker=chosen_name,
            calibration=_calibration(probs, test_rows.data.label),
            rerank=variants,
            quotas=dict(quotas),
            timings=dict(self.clock.seconds),
            feature_importance=_importance(chosen),
        )

    def _choose(self, scores: list[RankerScores]) -> str:
        """The configured ranker, or (``"auto"``) the best NDCG@10 on held-out users."""
        if self.pipeline.ranker != AUTO:
            return self.pipeline.ranker
        finite = [s for s in scores if math.isfinite(s.valid_ndcg)]
        if not finite:
            return scores[0].name
        return max(finite, key=lambda s: s.valid_ndcg).name

    def _quotas(self, retrieved: Retrieved, val: EvalTask) -> dict[str, Quota]:
        merge_config = self.pipeline.merge
        if not merge_config.tune:
            fixed = dict(merge_config.quotas)
            return fixed or {name: 1.0 / len(self.sources) for name in self.sources}
        k = min(merge_config.tune_k, self.pipeline.n_candidates)
        runs = {
            name: _SourceRun(lst[:, :k], 0.0, 0.0) for name, lst in retrieved.lists.items.items()
        }
        quotas, _, _ = tune_quotas(runs, val.relevant, dataclasses.replace(merge_config, tune_k=k))
        return dict(quotas)


@contextmanager
def _bar(enabled: bool) -> Iterator[Progress]:
    with Progress(console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        yield bar


class _Scorer:
    """Scores ``(n_users, K)`` lists of the test users: metrics, segments, deciles, beyond."""

    def __init__(
        self, task: EvalTask, protocol: ProtocolConfig, pipeline: PipelineConfig, rows: Rows
    ) -> None:
        self.task = task
        self.protocol = protocol
        self.pipeline = pipeline
        train = task.train
        self.catalog = train.items["item_id"].to_numpy(np.int64)
        top = int(
            max(
                self.catalog.max(initial=0),
                train.events["item_id"].max() if len(train.events) else 0,
            )
        )
        self.categories = _category_codes(train.items, top)
        counts = train.events.groupby("item_id")["user_id"].nunique()
        self.popularity = np.zeros(top + 1)
        self.popularity[counts.index.to_numpy(np.int64)] = counts.to_numpy(np.float64)
        self.popularity /= max(train.events["user_id"].nunique(), 1)
        activity = train.events.groupby("user_id").size()
        self.activity = pd.Series(task.user_ids).map(activity).fillna(0).to_numpy(np.float64)
        self.age_days = _item_age_days(train.items, rows.pairs, top)
        self.seen = _seen_by_user(train.events, task.user_ids)

    def rerank(self, ranked: IntArray, scores: FloatArray, config: RerankConfig) -> IntArray:
        ages = np.where(ranked >= 0, self.age_days[np.maximum(ranked, 0)], np.nan)
        return rerank_lists(
            ranked,
            scores,
            k=max(self.pipeline.ks),
            config=config,
            item_categories=self.categories,
            item_age_days=ages,
            seen=self.seen,
        ).item_ids

    def per_user(self, lists: IntArray) -> dict[str, npt.NDArray[np.float64]]:
        relevant = self.task.relevant
        out: dict[str, npt.NDArray[np.float64]] = {}
        for k in self.pipeline.ks:
            top = lists[:, :k]
            out[f"ndcg@{k}"] = ndcg_at_k_score(top, relevant, k=k)
            out[f"recall@{k}"] = recall_at_k_score(top, relevant, k=k)
            out[f"precision@{k}"] = precision_at_k_score(top, relevant, k=k)
            out[f"map@{k}"] = average_precision_at_k_score(top, relevant, k=k)
            out[f"hit_rate@{k}"] = hit_rate_at_k_score(top, relevant, k=k)
        return out

    def score(self, name: str, kind: str, lists: IntArray) -> MethodScores:
        per_user = self.per_user(lists)
        warm = self.task.warm
        masks = dict(zip(SEGMENTS, (np.ones(len(warm), bool), warm, ~warm), strict=True))
        metrics = {
            segment: {
                metric: _estimate(values[mask], self.protocol) if mask.any() else None
                for metric, values in per_user.items()
            }
            for segment, mask in masks.items()
        }
        return MethodScores(
            name,
            kind,
            metrics,
            self.beyond(lists),
            self.deciles(per_user[f"ndcg@{min(self.pipeline.ks)}"]),
        )

    def beyond(self, lists: IntArray) -> dict[str, float]:
        k = min(self.pipeline.ks)
        top = lists[:, :k]
        return {
            f"ild@{k}": float(np.nanmean(intra_list_diversity_score(top, self.categories, k=k))),
            f"novelty@{k}": float(np.nanmean(novelty_score(top, self.popularity, k=k))),
            f"coverage@{k}": catalog_coverage_score(top, catalog=self.catalog, k=k),
        }

    def deciles(self, ndcg: npt.NDArray[np.float64]) -> dict[str, float]:
        out: dict[str, float] = {}
        cold = ~self.task.warm
        if cold.any():
            out["cold"] = float(np.mean(ndcg[cold]))
        warm = np.flatnonzero(self.task.warm)
        if len(warm):
            order = warm[np.argsort(self.activity[warm], kind="stable")]
            for d, part in enumerate(np.array_split(order, min(10, len(order))), start=1):
                out[f"d{d}"] = float(np.mean(ndcg[part]))
        return out

    def variant(self, label: str, lists: IntArray) -> dict[str, Any]:
        k = min(self.pipeline.ks)
        ndcg = ndcg_at_k_score(lists[:, :k], self.task.relevant, k=k)
        return {"variant": label, f"ndcg@{k}": float(np.mean(ndcg)), **self.beyond(lists)}


def _estimate(values: npt.NDArray[np.float64], protocol: ProtocolConfig) -> Estimate:
    return Estimate(
        *bootstrap_mean_ci(
            values,
            n_resamples=protocol.n_bootstrap,
            confidence=protocol.confidence,
            seed=protocol.seed,
        )
    )


def _ranker_scores(name: str, ranker: Ranker, valid: Any, fit_seconds: float) -> RankerScores:
    start = time.perf_counter()
    scores = ranker.predict(valid.features)
    per_1k = (time.perf_counter() - start) / max(len(scores), 1) * 1000
    labels = valid.label
    both = 0 < labels.sum() < len(labels)
    probs = (
        1.0 / (1.0 + np.exp(-np.clip(scores, -30, 30)))
        if scores.min() < 0 or scores.max() > 1
        else scores
    )
    return RankerScores(
        name=name,
        valid_ndcg=group_ndcg(labels, scores, valid.groups, k=10),
        valid_auc=roc_auc_score(labels, scores) if both else math.nan,
        valid_grouped_auc=_grouped_auc(labels, scores, valid.groups),
        valid_log_loss=log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7)) if both else math.nan,
        fit_seconds=fit_seconds,
        predict_seconds_per_1k=per_1k,
    )


def group_ndcg(labels: FloatArray, scores: FloatArray, groups: IntArray, *, k: int) -> float:
    """Mean NDCG@k of each group's rows ordered by ``scores`` (binary gains = ``labels``),
    over groups with a positive: how well a ranker orders the candidates it is given."""
    order = np.lexsort((-scores, groups))
    g, hit = groups[order], labels[order] > 0
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    group_index = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(g)]))
    dcg = np.bincount(group_index, weights=discount * hit, minlength=len(starts))
    positives = np.bincount(group_index, weights=hit, minlength=len(starts)).astype(np.int64)
    ideal_by_count = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))]
    ideal = ideal_by_count[np.minimum(positives, k)]
    has = positives > 0
    return float(np.mean(dcg[has] / ideal[has])) if has.any() else math.nan


def _grouped_auc(labels: FloatArray, scores: FloatArray, groups: IntArray) -> float:
    return float(grouped_auc_score(labels, scores, groups))


def _calibration(probs: FloatArray, labels: FloatArray) -> dict[str, Any]:
    curve = calibration_curve(labels, probs, n_bins=10)
    return {
        "ece_calibrated": expected_calibration_error(labels, probs, n_bins=10),
        "base_rate": float(labels.mean()) if len(labels) else math.nan,
        "curve": {k: np.asarray(v).tolist() for k, v in curve._asdict().items()},
        "n": len(labels),
    }


def _importance(ranker: Ranker) -> dict[str, float]:
    method = getattr(ranker, "feature_importance", None)
    if method is None:
        return {}
    importance: dict[str, float] = method()
    return dict(sorted(importance.items(), key=lambda kv: -kv[1])[:20])


def _counts(val: EvalTask, test: EvalTask, rows: Rows, test_rows: Rows) -> dict[str, int]:
    return {
        "n_train_events": len(test.train.events),
        "n_catalog_items": len(test.train.items),
        "n_test_users": len(test.user_ids),
        "n_warm_users": int(test.warm.sum()),
        "n_cold_users": int((~test.warm).sum()),
        "n_relevant": int(sum(len(r) for r in test.relevant)),
        "n_validation_users": len(val.user_ids),
        "n_ranker_groups": len(np.unique(rows.data.groups)),
        "n_ranker_rows": len(rows.data.features),
        "n_ranker_positives": int(rows.data.label.sum()),
        "n_test_candidate_rows": len(test_rows.data.features),
        "n_test_candidate_positives": int(test_rows.data.label.sum()),
    }


def _category_codes(items: pd.DataFrame, top: int) -> IntArray:
    """Category code per item id (index), -1 unknown."""
    out = np.full(top + 1, -1, dtype=np.int64)
    if "category" not in items.columns:
        return out
    codes, _ = pd.factorize(items["category"].astype("string"), use_na_sentinel=True)
    ids = items["item_id"].to_numpy(np.int64)
    inside = ids <= top
    out[ids[inside]] = codes[inside]
    return out


def _item_age_days(items: pd.DataFrame, pairs: pd.DataFrame, top: int) -> FloatArray:
    """Item age in days as of the test cutoff (from the candidate rows), NaN unknown."""
    out = np.full(top + 1, np.nan)
    if "item_age_days" in pairs.columns:
        ids = pairs["item_id"].to_numpy(np.int64)
        age = pairs["item_age_days"].to_numpy(np.float64)
        ok = (ids <= top) & (age >= 0)
        out[ids[ok]] = age[ok]
    return out


def _seen_by_user(events: pd.DataFrame, user_ids: IntArray) -> list[IntArray]:
    """Each user's items before the cutoff (the re-ranker removes them)."""
    pairs = events[["user_id", "item_id"]].drop_duplicates().sort_values("user_id")
    users = pairs["user_id"].to_numpy(np.int64)
    items = pairs["item_id"].to_numpy(np.int64)
    lo = np.searchsorted(users, user_ids, side="left")
    hi = np.searchsorted(users, user_ids, side="right")
    return [items[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]


# -- random per user ---------------------------------------------------------------------------


def random_split_per_user(
    events: pd.DataFrame, *, test_frac: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user's (user, item) interactions split at random: ``test_frac`` of them to test.

    Stratified per user (the Microsoft Recommenders ``python_stratified_split`` setup): a user
    with n interactions puts ``round(test_frac * n)`` in test, keeping at least one in train.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac={test_frac}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    frame = events.reset_index(drop=True)
    order = np.lexsort((rng.random(len(frame)), frame["user_id"].to_numpy(np.int64)))
    users = frame["user_id"].to_numpy(np.int64)[order]
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    sizes = counts[inverse]
    position = np.arange(len(users)) - np.searchsorted(users, users, side="left")
    n_test = np.minimum(np.round(test_frac * sizes), sizes - 1)
    is_test = np.zeros(len(frame), dtype=bool)
    is_test[order] = position < n_test
    return frame[~is_test].reset_index(drop=True), frame[is_test].reset_index(drop=True)


def write_contract(
    out: Path, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame
) -> Path:
    """A minimal contract directory (the three tables) that the feature step can read."""
    out.mkdir(parents=True, exist_ok=True)
    events.sort_values("ts", kind="stable").to_parquet(out / EVENTS_FILE, index=False)
    users.to_parquet(out / USERS_FILE, index=False)
    items.to_parquet(out / ITEMS_FILE, index=False)
    return out


def _random_task(
    train: pd.DataFrame,
    test: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    protocol: ProtocolConfig,
) -> tuple[EvalTask, pd.Timestamp]:
    """An :class:`EvalTask` whose train is ``train`` and whose targets are ``test``'s items."""
    as_of = pd.Timestamp(max(train["ts"].max(), test["ts"].max())) + pd.Timedelta(seconds=1)
    window = test if protocol.min_value is None else test[test["value"] >= protocol.min_value]
    seen = train[["user_id", "item_id"]].drop_duplicates()
    pairs = window[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs.merge(seen, how="left", on=["user_id", "item_id"], indicator=True)
    pairs = pairs[pairs["_merge"] == "left_only"].sort_values(["user_id", "item_id"])
    user_ids = pairs["user_id"].drop_duplicates().to_numpy(np.int64)
    starts = np.searchsorted(pairs["user_id"].to_numpy(np.int64), user_ids)
    relevant = np.split(pairs["item_id"].to_numpy(np.int64), starts[1:]) if len(user_ids) else []
    task = EvalTask(
        train=RetrievalData(train.sort_values("ts").reset_index(drop=True), users, items, as_of),
        user_ids=user_ids,
        relevant=list(relevant),
        warm=np.isin(user_ids, train["user_id"].to_numpy(np.int64)),
        n_active_users=int(test["user_id"].nunique()),
    )
    return task, as_of


# -- texts -------------------------------------------------------------------------------------


def temporal_text(protocol: ProtocolConfig, pipeline: PipelineConfig) -> str:
    liked = "" if protocol.min_value is None else f" with value >= {protocol.min_value}"
    return (
        f"Global temporal split by {protocol.split_by} (validation {protocol.val_frac:.0%}, test "
        f"{protocol.test_frac:.0%}, cut points t1 < t2). Candidate sources fit on ts < t1 list "
        f"{pipeline.n_candidates} merged candidates for the users active in [t1, t2); merge "
        "quotas are tuned there; candidate features are computed as of t1 from events before "
        "t1 only; labels are the users' interactions in [t1, t2). Rankers learn from "
        f"{1 - pipeline.ranker_valid_frac:.0%} of those users; AUC and calibration on the rest. "
        "Final numbers: sources refit on ts < t2, features as of t2, scored on the test window "
        "ts >= t2. Baselines rank every catalog item the user had not interacted with before "
        "t2 (full ranking, no sampled negatives); the pipeline ranks its candidates (an item "
        f"not retrieved is a miss). Relevant = the user's test-window items{liked} not seen "
        "before t2; users without one are left out. Cold users (no event before t2) get each "
        f"method's fallback. Means over users with {protocol.confidence:.0%} bootstrap "
        f"intervals ({protocol.n_bootstrap} resamples). MAP@k divides by min(k, #relevant)."
    )


def random_text(protocol: ProtocolConfig, pipeline: PipelineConfig) -> str:
    return (
        "Random per-user split, ONLY for comparison with published tables (it leaks the future: "
        f"a user's test items are interleaved in time with their training items): "
        f"{protocol.test_frac:.0%} of each user's interactions at random (seed {protocol.seed}) "
        "are the test set, stratified per user (Microsoft Recommenders' python_stratified_split "
        "setup). The ranker learns from an inner random split of the training data. Full "
        "ranking of every item the user has not interacted with in training; all test items "
        "relevant (binary gains). MAP@k divides by min(k, #relevant). Means over users with "
        f"{protocol.confidence:.0%} bootstrap intervals."
    )


def headline(report: OfflineReport, metric: str = "ndcg@10") -> dict[str, Estimate | None]:
    """``metric`` over all users for every method."""
    return {m.name: m.metrics["all"].get(metric) for m in report.methods}


def best_baseline(report: OfflineReport, metric: str = "ndcg@10") -> tuple[str, float]:
    """The baseline with the highest mean ``metric`` over all users."""
    pairs: Sequence[tuple[str, float]] = [
        (m.name, m.metrics["all"][metric].mean)  # type: ignore[union-attr]
        for m in report.methods
        if m.kind == "baseline"
    ]
    return max(pairs, key=lambda p: p[1])
