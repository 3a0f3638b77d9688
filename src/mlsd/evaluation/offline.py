"""The offline evaluation of the whole pipeline next to its baselines, under one stated protocol.

**Temporal** (the default, DESIGN.md): cut points ``t1 < t2``.

1. The ranker label windows: ``[t1, t2)`` and ``ranker_windows - 1`` earlier windows of the
   same span. Before each, sources fit on the events before its start list candidates for the
   users active in it, with features as of its start and labels from the window; the merge
   quotas are tuned on ``[t1, t2)`` (validation recall). ``ranker_valid_frac`` of the users
   are held out with all their rows in every window (:func:`split_groups`); each ranker
   learns from the others and is scored (NDCG@10, AUC) and calibrated on the held-out ones.
2. Sources refit on ``ts < t2`` list candidates for the test users (active at or after
   ``t2``), with features as of ``t2``; the rankers order them, the re-ranker shapes the list.
   Baselines rank the **whole catalog** (full ranking, already-seen items excluded); the
   pipeline's list is its ranked candidates (an item it did not retrieve counts as a miss).

**Random per user** (only to compare with published numbers, labelled as such): each user's
events split at random into train/test (stratified per user, ``test_frac``); the ranker's
labels come from ``ranker_windows`` inner random splits of train (seeds ``seed + 1``, ...),
each a label window with its own sources. Time-based features are computed as of the end of
the training data.

**Splits** (only to compare with a peer library's numbers on its own files): a peer's train,
validation and test files (:mod:`mlsd.evaluation.given_split`); as RecBole does it, everything
is fit on train only, the ranker's labels are the validation items, and a user's train and
validation items are excluded at test. **Leave-last-out** (published numbers only) is the same
on each user's last event (test) and the one before it (validation).

Every metric is a mean over users with a bootstrap interval, for all, warm and cold users, and
by user-activity decile.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress, TaskID

from mlsd.data.sampling import downsample_negatives_mask
from mlsd.data.schema import EVENTS_FILE, read_info
from mlsd.data.split import cut_points
from mlsd.evaluation.given_split import GivenSplits, leave_last_out, read_splits
from mlsd.evaluation.metrics import (
    calibration_curve,
    expected_calibration_error,
    grouped_auc_score,
    log_loss,
    roc_auc_score,
)
from mlsd.evaluation.pipeline import AUTO, PipelineConfig
from mlsd.evaluation.random_split import random_split_per_user, random_task, write_contract
from mlsd.evaluation.retrieval import (
    EvalTask,
    ProtocolConfig,
    _finite,
    load_dataset,
    make_task,
    tune_segment_quotas,
)
from mlsd.evaluation.retrieval_report import Comparison
from mlsd.evaluation.scoring import ListScorer, MethodScores, group_ndcg
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
from mlsd.models.ranking.base import FloatArray, Ranker, RankingData, as_probability, sigmoid
from mlsd.models.ranking.bundle import RankingBundle, calibration_input
from mlsd.models.ranking.calibration import Calibrator
from mlsd.models.ranking.candidates import FeatureLayout, Vocabulary
from mlsd.models.retrieval.merge import QUOTAS, Fusion, Quota

Protocol = Literal["temporal", "random-per-user", "splits", "leave-last-out"]
DerivedRanker = Callable[[Mapping[str, Ranker], RankingData, RankingData], Ranker]
"""(fitted rankers, fit rows, held-out rows) → a new ranker, e.g. a distilled student."""

RANDOM_TEST_FRAC = 0.25
"""The random-per-user protocol's test share on the command line (``mlsd feed evaluate``) when
none is given: the 75/25 split of the published tables it exists to compare with."""

PIPELINE = "mlsd"
"""The full pipeline's name in every table: retrieval + ranking + re-ranking."""


@dataclass(frozen=True)
class RankerScores:
    """A ranker on its held-out users (the ranker windows): NDCG@10 of their candidates
    ordered by the ranker, AUC, per-user AUC, log loss (NaN for a ranker whose scores are no
    probability, :attr:`~mlsd.models.ranking.base.Ranker.outputs`), times; with
    ``PipelineConfig.auc_splits`` > 1, also the AUC of a fit on each of several draws of
    held-out users (``valid_auc_splits``, the first being ``valid_auc``'s), so that rankers can
    be compared beyond the noise of one draw."""

    name: str
    valid_ndcg: float
    valid_auc: float
    valid_grouped_auc: float
    valid_log_loss: float
    fit_seconds: float
    predict_seconds_per_1k: float
    valid_auc_splits: tuple[float, ...] = ()


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
    cold_quotas: dict[str, Quota] | None = None
    test_frac: float | None = None
    """The protocol's test share (``ProtocolConfig.test_frac``)."""
    min_value: float | None = None
    """Relevant test events need at least this value (``ProtocolConfig.min_value``; ``None``:
    every test event is relevant)."""
    comparisons: list[Comparison] = field(default_factory=list)
    """The pipeline against each baseline on NDCG at the smallest k, paired over test users."""
    fusion: Fusion = QUOTAS
    """How the quotas merged the candidate sources."""

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
class TrainedRankers:
    """What the ranker windows produce: everything the pipeline needs after retrieval.

    Attributes:
        quotas: the merge quotas (tuned on the last window); of warm users when
            ``cold_quotas`` is set.
        cold_quotas: the quotas of cold users (no event before the cutoff), or ``None``.
        vocabulary, layout: how candidate rows become ranker features.
        rankers: every fitted ranker; ``chosen`` names the pipeline's.
        scores: each ranker on the held-out users.
        calibrator: maps the chosen ranker's scores to click probabilities.
        rows: the ranker rows (all windows).
        validation: the last window's targets.
        valid_data: the held-out users' ranker rows (all windows) the rankers were scored and
            the calibrator fitted on (what a reference profile of the ranker's inputs
            describes).
    """

    quotas: dict[str, Quota]
    vocabulary: Vocabulary
    layout: FeatureLayout
    rankers: dict[str, Ranker]
    scores: list[RankerScores]
    chosen: str
    calibrator: Calibrator
    rows: Rows
    validation: EvalTask
    valid_data: RankingData | None = None
    cold_quotas: dict[str, Quota] | None = None
    negative_keep_rate: float = 1.0
    """The share of negatives the rankers were fit on (their log loss is corrected for it)."""

    def gate_rows(self) -> tuple[pd.DataFrame, RankingData]:
        """The held-out users' rows of the LAST label window (``[t1, t2)``): their raw pairs
        and ranker rows, in the same order. What the registry's gate metric is computed on
        (:func:`gate_scores`, the champion head-to-head), so that it describes the newest
        window rather than mostly older ones.

        Raises:
            ValueError: there are no held-out rows, or the rows do not say their window.
        """
        valid = self.valid_data
        if valid is None or len(valid.features) == 0:
            raise ValueError("the new model has no held-out rows to compare the champion on")
        window = self.rows.window
        if len(window) != len(self.rows.data.groups):
            raise ValueError("the ranker rows do not say which label window they are from")
        held_out = np.isin(self.rows.data.groups, np.unique(valid.groups))
        index = np.flatnonzero(held_out & (window == window.max()))
        pairs = self.rows.pairs.iloc[index].reset_index(drop=True)
        return pairs, self.rows.data.take(index)


def gate_scores(trained: TrainedRankers) -> RankerScores:
    """The chosen ranker on the held-out users of the last label window
    (:meth:`TrainedRankers.gate_rows`): the scores the model registry records and gates on.
    NaN scores when no held-out user has a row in that window."""
    _, data = trained.gate_rows()
    chosen = next(s for s in trained.scores if s.name == trained.chosen)
    if len(data.features) == 0:
        nan = math.nan
        return RankerScores(trained.chosen, nan, nan, nan, nan, chosen.fit_seconds, nan)
    return _ranker_scores(
        trained.chosen, trained.rankers[trained.chosen], data, chosen.fit_seconds,
        keep_rate=trained.negative_keep_rate,
    )  # fmt: skip


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
    derived: Mapping[str, DerivedRanker] | None = None,
    splits: Path | None = None,
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
        protocol_name: ``"temporal"``, ``"random-per-user"`` or ``"splits"`` (a peer's
            split files, :mod:`mlsd.evaluation.given_split`).
        feature_config: the feature step's settings (default: derived from the dataset).
        derived: name → function making a ranker from the fitted ones and the ranker rows
            (e.g. a distilled, quantized student of the deep ranker); scored like the others.
        splits: the split files' prefix (``PREFIX_train.tsv`` ...), for ``"splits"``.
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
    run = _Run(
        dataset_dir,
        sources,
        rankers,
        protocol,
        pipeline,
        feature_config,
        clock,
        progress,
        dict(derived or {}),
    )
    if protocol_name == "temporal":
        return run.temporal(events, users, items)
    if protocol_name == "random-per-user":
        return run.random_per_user(events, users, items)
    if protocol_name == "splits":
        if splits is None:
            raise ValueError("the splits protocol needs the split files' prefix (--splits)")
        with clock.stage("split"):
            given = read_splits(splits, events, dataset=str(dataset_dir))
        return run.given_splits(given, users, items, protocol_name)
    if protocol_name == "leave-last-out":
        with clock.stage("split"):
            given = leave_last_out(events)
        return run.given_splits(given, users, items, protocol_name)
    raise ValueError(
        f"protocol {protocol_name!r}: use 'temporal', 'random-per-user', 'splits' or "
        "'leave-last-out'"
    )


def train_pipeline(
    dataset_dir: Path,
    sources: Mapping[str, SourceFactory],
    rankers: Mapping[str, RankerFactory],
    *,
    protocol: ProtocolConfig | None = None,
    pipeline: PipelineConfig | None = None,
    feature_config: FeatureConfig | None = None,
    progress: bool = False,
) -> tuple[RankingBundle, TrainedRankers]:
    """Train the ranking stage as of the end of the data, for deployment.

    The last ``protocol.val_frac`` of the events (by event-time quantile) is the last label
    window, earlier windows of the same span before it (``pipeline.ranker_windows``); sources
    fit before each window give its candidates. Returns the bundle to save and the details
    (held-out scores of every ranker).
    """
    protocol = protocol or ProtocolConfig()
    pipeline = pipeline or PipelineConfig()
    dataset_dir = Path(dataset_dir)
    feature_config = feature_config or feature_config_for(dataset_dir)
    clock = _Clock()
    events, users, items = load_dataset(dataset_dir)
    if events.empty:
        raise ValueError(f"{dataset_dir}: no events to train on")
    info = read_info(dataset_dir)
    t2 = events["ts"].max() + pd.Timedelta(microseconds=1)
    t1 = events["ts"].quantile(1.0 - protocol.val_frac)
    run = _Run(dataset_dir, sources, rankers, protocol, pipeline, feature_config, clock, progress)
    windows = run.label_windows(events, users, items, t1, t2)
    with _bar(progress) as bar:
        trained = run.train(windows, items, bar, bar.add_task("train", total=None))
    bundle = RankingBundle(
        ranker=trained.rankers[trained.chosen],
        ranker_name=trained.chosen,
        calibrator=trained.calibrator,
        vocabulary=trained.vocabulary,
        layout=trained.layout,
        quotas=trained.quotas,
        cold_quotas=trained.cold_quotas,
        fusion=pipeline.merge.fusion,
        feature_config=feature_config,
        negative_keep_rate=pipeline.negative_keep_rate,
        calibration_scale="log_odds",  # what run.train fitted the calibrator on
        metadata={
            "dataset": {"name": info.name, "content_hash": info.content_hash},
            "label_window": [t1.isoformat(), t2.isoformat()],
            "rankers": [dataclasses.asdict(score) for score in trained.scores],
            "timings": dict(clock.seconds),
        },
    )
    return bundle, trained


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
    derived: Mapping[str, DerivedRanker] = field(default_factory=dict)

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
        windows = self.label_windows(events, users, items, spec.t1, spec.t2)
        min_value = self.protocol.min_value
        test = make_task(events, users, items, cutoff=spec.t2, end=None, min_value=min_value)
        if len(test.user_ids) == 0:
            raise ValueError(f"{self.dataset_dir}: no test user has a relevant item after t2")
        target = _LabelWindow(test, events[events["ts"] >= spec.t2], spec.t2, self.dataset_dir)
        report = self._evaluate(windows, target, items)
        return dataclasses.replace(
            report,
            protocol_name="temporal",
            protocol=temporal_text(
                self.protocol, self.pipeline, [w.as_of for w in windows], spec.t2
            ),
            cut_points={"t1": spec.t1.isoformat(), "t2": spec.t2.isoformat()},
            test_frac=self.protocol.test_frac,
        )

    def random_per_user(
        self, events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame
    ) -> OfflineReport:
        seed = self.protocol.seed
        frac = self.protocol.test_frac
        with self.clock.stage("split"):
            train, test_events = random_split_per_user(events, test_frac=frac, seed=seed)
            # One inner split per label window, each with its own sources (as the temporal
            # protocol's windows are): more rows for the rankers, over more draws.
            inner_splits = [
                random_split_per_user(train, test_frac=frac, seed=seed + 1 + i)
                for i in range(self.pipeline.ranker_windows)
            ]
        with tempfile.TemporaryDirectory(prefix="mlsd-random-") as tmp:
            train_dir = write_contract(Path(tmp) / "train", train, users, items)
            windows = []
            for i, (inner, inner_holdout) in enumerate(inner_splits):
                inner_dir = write_contract(Path(tmp) / f"inner-{i}", inner, users, items)
                val, val_asof = random_task(inner, inner_holdout, users, items, self.protocol)
                windows.append(_LabelWindow(val, inner_holdout, val_asof, inner_dir))
            test, test_asof = random_task(train, test_events, users, items, self.protocol)
            report = self._evaluate(
                windows,
                _LabelWindow(test, test_events, test_asof, train_dir),
                items,
                relevant_map=True,
            )
        return dataclasses.replace(
            report,
            protocol_name="random-per-user",
            protocol=random_text(self.protocol, self.pipeline),
            cut_points={"train_end": test_asof.isoformat()},
            test_frac=frac,
        )

    def given_splits(
        self, given: GivenSplits, users: pd.DataFrame, items: pd.DataFrame, kind: Protocol
    ) -> OfflineReport:
        """A peer's split files (``"splits"``) or the leave-last-out split of the data."""
        val, test, as_of = given.tasks(users, items, self.protocol)
        for task, name, what in ((val, "valid", "labels for the ranker"), (test, "test", "scores")):
            if len(task.user_ids) == 0:
                where = given.files.get(name, f"{self.dataset_dir}, the {name} split")
                raise ValueError(
                    f"{where}: no user has an item there that is not in an earlier split, so "
                    f"there are no {what}; check the data (and [retrieval] min_value)"
                )
        with tempfile.TemporaryDirectory(prefix="mlsd-splits-") as tmp:
            train_dir = write_contract(Path(tmp) / "train", given.events["train"], users, items)
            report = self._evaluate(
                [_LabelWindow(val, given.events["valid"], as_of, train_dir)],
                _LabelWindow(test, given.events["test"], as_of, train_dir),
                items,
            )
        return dataclasses.replace(
            report,
            protocol_name=kind,
            protocol=splits_text(self.protocol, given.files if kind == "splits" else None),
            cut_points={
                **{name: str(path) for name, path in given.files.items()},
                **{f"{name}_sha256": digest for name, digest in given.sha256.items()},
            },
            counts={**report.counts, **given.counts},
        )

    # -- the shared body -------------------------------------------------------------------

    def _frame(
        self,
        window: _LabelWindow,
        retrieved: Retrieved,
        quotas: Mapping[str, Quota],
        cold_quotas: Mapping[str, Quota] | None,
        items: pd.DataFrame,
    ) -> pd.DataFrame:
        k = self.pipeline.n_candidates
        return window_frame(
            window.task.user_ids,
            merge(
                retrieved,
                quotas,
                k,
                cold=~window.task.warm,
                cold_quotas=cold_quotas,
                fusion=self.pipeline.merge.fusion,
            ),
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
                exclude=window.task.exclude,
            )

    def label_windows(
        self,
        events: pd.DataFrame,
        users: pd.DataFrame,
        items: pd.DataFrame,
        t1: pd.Timestamp,
        t2: pd.Timestamp,
    ) -> list[_LabelWindow]:
        """The ranker's label windows: [t1, t2) last (it tunes the quotas), earlier ones of the
        same span before it, each with targets from its own window and training before it."""
        span = t2 - t1
        windows = []
        with self.clock.stage("split"):
            for i in reversed(range(self.pipeline.ranker_windows)):
                start, end = t1 - i * span, t2 - i * span
                task = make_task(
                    events, users, items, cutoff=start, end=end, min_value=self.protocol.min_value
                )
                if len(task.user_ids) == 0:
                    continue
                in_window = (events["ts"] >= start) & (events["ts"] < end)
                windows.append(_LabelWindow(task, events[in_window], start, self.dataset_dir))
        if not windows or windows[-1].as_of != t1:
            raise ValueError(f"{self.dataset_dir}: no user has a relevant item in [{t1}, {t2})")
        return windows

    def train(
        self, windows: list[_LabelWindow], items: pd.DataFrame, bar: Progress, job: TaskID
    ) -> TrainedRankers:
        """Retrieve for every label window, tune the quotas on the last, fit every ranker on
        the candidates' rows (held-out users apart), pick and calibrate the pipeline's."""
        last = len(windows) - 1
        retrieved = {last: self._retrieve(windows[last], bar, job, "ranker window")}
        with self.clock.stage("merge quota search"):
            quotas, cold_quotas = self._quotas(retrieved[last], windows[last].task)
        frames = []
        for i, window in enumerate(windows):
            if i not in retrieved:
                retrieved[i] = self._retrieve(window, bar, job, "ranker window")
            bar.update(job, description=f"ranker window {i + 1}: features")
            with self.clock.stage("features (ranker windows)"):
                frames.append(self._frame(window, retrieved.pop(i), quotas, cold_quotas, items))
        rows, vocabulary, layout = to_rows(frames, self.feature_config)
        keep = self.pipeline.negative_keep_rate
        fit_data, valid_data = self._held_out(rows, self.protocol.seed)
        fitted: dict[str, Ranker] = {}
        scores = []
        for name, make in self.rankers.items():
            bar.update(job, description=f"fit ranker {name}")
            with self.clock.stage(f"fit ranker {name}"):
                start = time.perf_counter()
                fitted[name] = make().fit(fit_data, valid_data)
                fit_seconds = time.perf_counter() - start
            scores.append(
                _ranker_scores(name, fitted[name], valid_data, fit_seconds, keep_rate=keep)
            )
        for name, derive in self.derived.items():
            bar.update(job, description=f"derive ranker {name}")
            with self.clock.stage(f"derive ranker {name}"):
                start = time.perf_counter()
                fitted[name] = derive(dict(fitted), fit_data, valid_data)
                fit_seconds = time.perf_counter() - start
            scores.append(
                _ranker_scores(name, fitted[name], valid_data, fit_seconds, keep_rate=keep)
            )
        if self.pipeline.auc_splits > 1:
            bar.update(job, description="rankers: more held-out draws")
            with self.clock.stage("ranker AUC over held-out draws"):
                scores = self._auc_splits(rows, scores)
        chosen = self._choose(scores)
        calibrator = Calibrator(method=self.pipeline.calibration).fit(
            calibration_input(
                fitted[chosen].predict(valid_data.features), keep, fitted[chosen].outputs
            ),
            valid_data.label,
        )
        return TrainedRankers(
            quotas, vocabulary, layout, fitted, scores, chosen, calibrator, rows, windows[-1].task,
            valid_data, cold_quotas, keep,
        )  # fmt: skip

    def _held_out(self, rows: Rows, seed: int) -> tuple[RankingData, RankingData]:
        """The ranker rows of the fit users and of the held-out users (drawn with ``seed``);
        with ``negative_keep_rate`` < 1 the fit rows keep fewer negatives, held-out rows all."""
        fit_data, valid_data = split_groups(
            rows.data, rows.users, valid_frac=self.pipeline.ranker_valid_frac, seed=seed
        )
        keep = self.pipeline.negative_keep_rate
        if keep < 1.0:
            mask = downsample_negatives_mask(fit_data.label, keep_rate=keep, seed=seed)
            fit_data = fit_data.take(np.flatnonzero(mask))
        return fit_data, valid_data

    def _auc_splits(self, rows: Rows, scores: list[RankerScores]) -> list[RankerScores]:
        """``scores`` with each ranker's AUC on ``pipeline.auc_splits`` draws of held-out
        users: the pipeline's draw (seed ``protocol.seed``), then seeds after it, each a fresh
        fit of every ranker (derived ones apart) on the other users' rows."""
        aucs: dict[str, list[float]] = {s.name: [s.valid_auc] for s in scores}
        for draw in range(1, self.pipeline.auc_splits):
            fit_data, valid_data = self._held_out(rows, self.protocol.seed + draw)
            for name, make in self.rankers.items():
                predicted = make().fit(fit_data, valid_data).predict(valid_data.features)
                aucs[name].append(_auc(valid_data.label, predicted))
        return [
            dataclasses.replace(s, valid_auc_splits=tuple(aucs[s.name]))
            if s.name in self.rankers
            else s
            for s in scores
        ]

    def _evaluate(
        self,
        windows: list[_LabelWindow],
        target: _LabelWindow,
        items: pd.DataFrame,
        *,
        relevant_map: bool = False,
    ) -> OfflineReport:
        k_list = self.pipeline.n_candidates
        with _bar(self.progress) as bar:
            job = bar.add_task("ranker windows", total=None)
            trained = self.train(windows, items, bar, job)
            quotas, vocabulary, fitted = trained.quotas, trained.vocabulary, trained.rankers
            chosen_name, calibrator, rows = trained.chosen, trained.calibrator, trained.rows
            ranker_scores = trained.scores
            chosen = fitted[chosen_name]
            test = target.task
            test_retrieved = self._retrieve(target, bar, job, "test")
            bar.update(job, description="test: features")
            with self.clock.stage("features (test)"):
                test_frame = self._frame(target, test_retrieved, quotas, trained.cold_quotas, items)
                test_rows, _, _ = to_rows([test_frame], self.feature_config, vocabulary)
            bar.update(job, description="test: scoring")
            scorer = ListScorer(
                test, self.protocol, self.pipeline.ks, test_rows, relevant_map=relevant_map
            )
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
            comparisons = scorer.compare(
                PIPELINE, self.pipeline.baselines, f"ndcg@{min(self.pipeline.ks)}"
            )
            settings = {"pipeline": self.pipeline.rerank, **self.pipeline.rerank_variants}
            variants = [scorer.variant("ranked, no re-ranking", ranked)]
            variants += [
                scorer.variant(label, scorer.rerank(ranked, ranked_scores, config))
                for label, config in settings.items()
            ]
        corrected = calibration_input(
            scored[chosen_name], self.pipeline.negative_keep_rate, fitted[chosen_name].outputs
        )
        probs = calibrator.transform(corrected)
        # the ranker's own probabilities, prior-corrected (none for a score that only orders)
        uncalibrated = sigmoid(corrected) if fitted[chosen_name].outputs != "score" else None
        return OfflineReport(
            protocol_name="",
            protocol="",
            dataset=read_info(self.dataset_dir).name,
            cut_points={},
            counts=_counts(trained.validation, test, rows, test_rows),
            ks=tuple(self.pipeline.ks),
            methods=methods,
            rankers=ranker_scores,
            pipeline_ranker=chosen_name,
            calibration=_calibration(
                probs, test_rows.data.label, uncalibrated, self.pipeline.negative_keep_rate
            ),
            rerank=variants,
            quotas=dict(quotas),
            timings=dict(self.clock.seconds),
            feature_importance=_importance(chosen),
            cold_quotas=None if trained.cold_quotas is None else dict(trained.cold_quotas),
            fusion=self.pipeline.merge.fusion,
            comparisons=comparisons,
            min_value=self.protocol.min_value,
        )

    def _choose(self, scores: list[RankerScores]) -> str:
        """The configured ranker, or (``"auto"``) the best NDCG@10 on held-out users."""
        if self.pipeline.ranker != AUTO:
            return self.pipeline.ranker
        finite = [s for s in scores if math.isfinite(s.valid_ndcg)]
        if not finite:
            return scores[0].name
        return max(finite, key=lambda s: s.valid_ndcg).name

    def _quotas(
        self, retrieved: Retrieved, val: EvalTask
    ) -> tuple[dict[str, Quota], dict[str, Quota] | None]:
        """The merge quotas of warm (or all) users and of cold users (``None``: the same), as
        the retrieval harness has them: tuned on ``val`` (recall), warm and cold users apart
        with ``by_segment``, or the configured ones."""
        merge_config = self.pipeline.merge
        if not merge_config.tune:
            return merge_config.fixed(list(self.sources))
        k = min(merge_config.tune_k, self.pipeline.n_candidates)
        lists = {name: lst[:, :k] for name, lst in retrieved.lists.items.items()}
        quotas, cold_quotas, _ = tune_segment_quotas(
            lists, val.relevant, val.warm, dataclasses.replace(merge_config, tune_k=k)
        )
        return dict(quotas), None if cold_quotas is None else dict(cold_quotas)


@contextmanager
def _bar(enabled: bool) -> Iterator[Progress]:
    with Progress(console=Console(stderr=True), disable=not enabled, transient=True) as bar:
        yield bar


def _ranker_scores(
    name: str, ranker: Ranker, valid: Any, fit_seconds: float, *, keep_rate: float = 1.0
) -> RankerScores:
    """A ranker on held-out rows. Its log loss reads its probabilities corrected for the
    negatives it was fit without (``keep_rate``), as the calibrator reads them: held-out rows
    keep every negative, so the uncorrected probabilities are off by the sampling alone."""
    start = time.perf_counter()
    scores = ranker.predict(valid.features)
    per_1k = (time.perf_counter() - start) / max(len(scores), 1) * 1000
    labels = valid.label
    both = 0 < labels.sum() < len(labels)
    # A plain score (LambdaRank's, the ensemble's) is no probability: no log loss for it.
    probs = None
    if as_probability(scores, ranker.outputs) is not None:
        probs = sigmoid(calibration_input(scores, keep_rate, ranker.outputs))
    return RankerScores(
        name=name,
        valid_ndcg=group_ndcg(labels, scores, valid.groups, k=10),
        valid_auc=_auc(labels, scores),
        valid_grouped_auc=grouped_auc_score(labels, scores, valid.groups),
        valid_log_loss=(
            log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7))
            if both and probs is not None
            else math.nan
        ),
        fit_seconds=fit_seconds,
        predict_seconds_per_1k=per_1k,
    )


def _auc(labels: FloatArray, scores: FloatArray) -> float:
    """ROC AUC, NaN when ``labels`` hold one class only."""
    return roc_auc_score(labels, scores) if 0 < labels.sum() < len(labels) else math.nan


def _calibration(
    probs: FloatArray, labels: FloatArray, uncalibrated: FloatArray | None, keep_rate: float
) -> dict[str, Any]:
    curve = calibration_curve(labels, probs, n_bins=10)
    return {
        "negative_keep_rate": keep_rate,
        "ece_before_calibrator": (
            expected_calibration_error(labels, uncalibrated, n_bins=10)
            if uncalibrated is not None and uncalibrated.size
            else None
        ),
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


# -- texts -------------------------------------------------------------------------------------


def temporal_text(
    protocol: ProtocolConfig,
    pipeline: PipelineConfig,
    windows: Sequence[pd.Timestamp] | None = None,
    t2: pd.Timestamp | None = None,
) -> str:
    """The temporal protocol in words. ``windows`` are the ranker label windows' starts (the
    cutoffs; the last is t1) and ``t2`` the test cutoff, to name them; without them the text
    assumes ``pipeline.ranker_windows`` windows and names no dates."""
    liked = "" if protocol.min_value is None else f" with value >= {protocol.min_value}"
    n = len(windows) if windows else pipeline.ranker_windows
    if n == 1:
        learn = "one label window, [t1, t2)"
    else:
        learn = (
            f"{n} label windows of the same span (t2 - t1): [t1, t2) and the {n - 1} before "
            f"it, back to t1 - {n - 1}(t2 - t1)"
        )
    if windows and t2 is not None:
        span = t2 - windows[-1]
        days = span / pd.Timedelta(days=1)
        named = "; ".join(f"[{w.isoformat()}, {(w + span).isoformat()})" for w in windows)
        learn += f" ({days:.1f} days each: {named})"
    return (
        f"Global temporal split by {protocol.split_by} (validation {protocol.val_frac:.0%}, test "
        f"{protocol.test_frac:.0%}, cut points t1 < t2). The rankers learn from {learn}. Before "
        "each window the candidate sources are refit on the events before its start and list "
        f"{pipeline.n_candidates} merged candidates for the users active in it; candidate "
        "features are computed as of the window's start from events before it only; labels are "
        f"the users' interactions in the window. The candidates: {pipeline.merge.describe()}. The "
        f"held-out split is by user: {pipeline.ranker_valid_frac:.0%} of the users (drawn with "
        f"seed {protocol.seed}) are held out with all their rows in every window, and the "
        f"rankers fit on the other {1 - pipeline.ranker_valid_frac:.0%}; ranker scores (NDCG@10, "
        "AUC) and the calibrator are of the held-out users. "
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
        f"setup). The ranker learns from {pipeline.ranker_windows} inner random split(s) of "
        "the training data, each with sources fit on its own training part. Full "
        "ranking of every item the user has not interacted with in training; all test items "
        "relevant (binary gains). MAP@k divides by min(k, #relevant); map_relevant@k divides by "
        "#relevant, the published tables' definition (Microsoft Recommenders), and is the MAP "
        f"set beside them. Means over users with {protocol.confidence:.0%} bootstrap intervals."
    )


def splits_text(protocol: ProtocolConfig, files: Mapping[str, Path] | None) -> str:
    """The protocol text of a peer's split ``files`` or (``None``) of leave-last-out."""
    names = ", ".join(f"{name} {path.name}" for name, path in (files or {}).items())
    what = (
        f"Given splits ({names}), ONLY for comparison with a peer library's numbers on the same "
        "files (RecBole's general-recommendation setup)."
        if files is not None
        else "Leave-last-one-out, ONLY for comparison with published numbers: each user's last "
        "event by time is the test split, the one before it the validation split, the rest "
        "train (users with fewer than 3 events: all train); other users' later events stay in "
        "train, so it leaks the future as random splits do."
    )
    relevant = (
        "the user's test items are relevant"
        if protocol.min_value is None
        else f"the user's test items with value >= {protocol.min_value:g} are relevant"
    )
    return (
        f"{what} Every source and ranker is fit on the "
        "train split alone; the ranker learns from candidates for the validation split's users "
        "with its items as labels (one label window); nothing is refit on train + validation. "
        "At test, the items of a user's train and validation splits are excluded and "
        f"{relevant} (binary gains); full ranking of the whole catalog. Means over the users "
        f"with a relevant test item, {protocol.confidence:.0%} bootstrap intervals."
    )


def best_baseline(report: OfflineReport, metric: str = "ndcg@10") -> tuple[str, float]:
    """The baseline with the highest mean ``metric`` over all users."""
    pairs: Sequence[tuple[str, float]] = [
        (m.name, m.metrics["all"][metric].mean)  # type: ignore[union-attr]
        for m in report.methods
        if m.kind == "baseline"
    ]
    return max(pairs, key=lambda p: p[1])
