"""Train the feed and write the model directory the service loads.

:mod:`mlsd.serving.feed_model` says what the directory holds and reads it.

One function, :func:`package_model`: the ranking stage is trained as of the end of the data
(:func:`mlsd.evaluation.offline.train_pipeline`), every candidate source is refit on all the
events and exported in its serving form, and the counts the ranker reads but the online store
does not hold are snapshotted. The result is a directory of safe files (JSON, npz, LightGBM
text, torch weights, Faiss index files): what the registry stores and serving loads.

The directory also holds ``reference_profile.json`` (:mod:`mlsd.monitoring.profile`), the
distribution live traffic is compared against; it travels with the model through the registry
(``model.json``'s ``reference_profile`` names it). It profiles the ranker's inputs *as the
service will compute them for requests*, not the training rows, because the two are different
populations (measured on the closed-loop demo, where a profile of the training rows made the
feature-drift rule fire on undrifted traffic, PSI 1–4 on the user's activity and recency
features):

- a training row is a (user, candidate) pair *as of the label window's start* ``t1``: one
  instant for every row, picked by the calendar (most users are mid-way between two visits,
  a day since their last event), one group per user active in the window, with the candidate
  sources fitted before ``t1``;
- a served row is a pair *as of a request*: users open the feed at the start of a session
  (more than ``session_gap_s`` after their previous event), as often as they are active, and
  the service scores them with the sources and snapshot counts of the *packaged* model.

So :func:`reference_profile` replays requests: the session starts of the last label window
(:func:`request_moments`, sampled) go through the packaged model's own sources, merge and
snapshot, with the store features from the events strictly before each moment
(:func:`served_rows`, checked against the online path feature by feature in the tests). The
profile also gets each row's moment, which flags the features whose distribution moves within
the window itself (:attr:`~mlsd.monitoring.profile.NumericProfile.trending`: e.g.
``item_age_days`` when most items were first seen when the data began, which makes it a clock).
Label metrics stay those of the held-out training rows.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.config import FeedConfig
from mlsd.data.schema import read_info
from mlsd.evaluation.metrics import expected_calibration_error
from mlsd.evaluation.offline import TrainedRankers, train_pipeline
from mlsd.evaluation.retrieval import catalog_as_of, load_dataset
from mlsd.features.batch import feature_config_for, stored_user_features, training_features
from mlsd.models.ranking.candidates import SourceLists, candidate_columns, ranker_frame
from mlsd.models.retrieval.base import RetrievalData
from mlsd.models.retrieval.export import export_source
from mlsd.monitoring.profile import MIN_TREND_MOMENTS, ReferenceProfile
from mlsd.serving.feed_model import (
    FORMAT_VERSION,
    MODEL_JSON,
    REFERENCE_PROFILE,
    SNAPSHOT,
    FeedModel,
)
from mlsd.serving.sources import UserQuery, candidates_many


def evaluation_settings(feed: FeedConfig) -> dict[str, Any]:
    """The settings that shape a model's held-out scores (its stored gate value).

    ``model.json`` keeps them as ``evaluation``; registering a model records them as params and
    ``mlsd.protocol.*`` version tags, and the stored-value gate refuses to compare versions
    whose settings differ. (The NDCG cutoff is in the gate metric's name, ``ndcg@10``.)
    """
    protocol, ranking = feed.retrieval.protocol, feed.ranking
    return {
        "val_frac": protocol.val_frac,
        "split_by": protocol.split_by,
        "min_value": protocol.min_value,
        "seed": protocol.seed,
        "ranker_windows": ranking.ranker_windows,
        "ranker_valid_frac": ranking.ranker_valid_frac,
    }


def package_model(
    dataset_dir: Path,
    out: Path,
    feed: FeedConfig,
    *,
    version: str | None = None,
    progress: bool = False,
) -> tuple[Path, TrainedRankers]:
    """Train on all of ``dataset_dir`` and write the model directory ``out`` (replaced).

    Returns the directory and the ranking stage's training details (held-out scores).

    Raises:
        ValueError: ``out`` is not safe to replace (:func:`check_model_out`); checked before
            training and again before deleting.
    """
    dataset_dir, out = Path(dataset_dir), Path(out)
    check_model_out(out, dataset_dir)
    feature_config = feature_config_for(dataset_dir, **vars(feed.features))
    bundle, trained = train_pipeline(
        dataset_dir,
        feed.retrieval.factories(),
        feed.ranking.factories(),
        protocol=feed.retrieval.protocol,
        pipeline=feed.ranking.pipeline(feed.retrieval.merge),
        feature_config=feature_config,
        progress=progress,
    )
    check_model_out(out, dataset_dir)  # again: the folder may have changed while training ran
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    bundle.save(out / "ranking")
    events, users, items = load_dataset(dataset_dir)
    cutoff = events["ts"].max() + pd.Timedelta(microseconds=1)
    train = RetrievalData(events, users, catalog_as_of(items, events, cutoff), cutoff)
    fit_seconds: dict[str, float] = {}
    for name, make in feed.retrieval.factories().items():
        start = time.perf_counter()
        export_source(make().fit(train), out / "sources" / name)
        fit_seconds[name] = time.perf_counter() - start
    _write_snapshot(out / SNAPSHOT, events, items, feature_config.categories)
    info = read_info(dataset_dir)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "version": version or f"{info.content_hash.split(':')[-1][:8]}-{uuid.uuid4().hex[:8]}",
        "sources": list(feed.retrieval.sources),
        "n_candidates": feed.ranking.n_candidates,
        "rerank": {
            **dataclasses.asdict(feed.ranking.rerank),
            "blocklist": list(feed.ranking.rerank.blocklist),
        },
        "ranker": bundle.ranker_name,
        "dataset": {"name": info.name, "content_hash": info.content_hash},
        "trained_until": cutoff.isoformat(),
        "source_fit_seconds": fit_seconds,
        "evaluation": evaluation_settings(feed),
        "reference_profile": None,
    }
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    # The profile replays requests through the model as written, so it comes last.
    profile = reference_profile(out, trained, dataset_dir, events=events)
    if profile is not None:
        profile.save(out / REFERENCE_PROFILE)
        meta["reference_profile"] = REFERENCE_PROFILE
        (out / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out, trained


def check_model_out(out: Path, dataset_dir: Path) -> None:
    """Refuse a model directory ``out`` that :func:`package_model` must not replace.

    ``out`` may be missing, empty, or a previous model directory (it holds a ``model.json``
    object with a ``format_version``); anything else would be deleted with all its files.
    It may not be ``dataset_dir``, contain it or be inside it (paths resolved).

    Raises:
        ValueError: ``out`` is unsafe; the message names it and says what to pass instead.
    """
    target, dataset = Path(out).resolve(), Path(dataset_dir).resolve()
    if target == dataset or target.is_relative_to(dataset) or dataset.is_relative_to(target):
        raise ValueError(
            f"--out {out}: is the dataset {dataset_dir}, inside it or contains it, and writing "
            "the model replaces --out; pass a directory outside the dataset"
        )
    if not target.exists() or _is_model_dir(target):
        return
    if not target.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory; pass a model directory")
    if any(target.iterdir()):
        raise ValueError(
            f"--out {out}: not empty and not a previous model directory (no {MODEL_JSON} "
            "written by packaging), and replacing it would delete its files; pass a new or "
            "empty directory"
        )


def _is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a ``model.json`` that :func:`package_model` wrote."""
    try:
        meta = json.loads((path / MODEL_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta


PROFILE_MAX_ROWS = 100_000
"""About this many served rows go into the reference profile (request moments are sampled,
seeded, to stay under it), but never fewer than :data:`PROFILE_MIN_MOMENTS` moments."""
PROFILE_MIN_MOMENTS = 4 * MIN_TREND_MOMENTS
"""Request moments the profile keeps when the data has them, whatever the candidates per
request: a feature's time PSI needs :data:`~mlsd.monitoring.profile.MIN_TREND_MOMENTS`
distinct times in each half of them, or a calendar-driven feature is not recognised as one
(and its drift would alert)."""


def reference_profile(
    model_dir: Path,
    trained: TrainedRankers,
    dataset_dir: Path,
    *,
    events: pd.DataFrame,
    max_rows: int = PROFILE_MAX_ROWS,
    seed: int = 0,
) -> ReferenceProfile | None:
    """The packaged model's ranker inputs and calibrated scores as served, at the request
    moments of the last label window (``None`` when training held no rows out).

    Features are the ranker's view (:func:`~mlsd.models.ranking.candidates.ranker_frame`: the
    values the service logs as ``f_<name>``/``c_<name>``) of :func:`served_rows`. Label
    metrics, of the held-out rows: ``ctr`` (their click rate), ``ndcg_at_10`` (the chosen
    ranker's) and ``ece`` of the calibrated scores; the calibrator was fitted on these rows,
    so that ECE is in-sample.

    Args:
        model_dir: the model directory, sources and snapshot written (``model.json`` too).
        trained: its ranking stage's training (held-out rows, the window's start).
        dataset_dir, events: the data it was trained on (``events``: ``user_id`` and ``ts``).
    """
    valid = trained.valid_data
    if valid is None or len(valid.features) == 0:
        return None
    model = FeedModel.load(model_dir)
    bundle = model.ranking
    y_score = bundle.probabilities(valid.features)
    y_true = valid.label
    chosen = next((s for s in trained.scores if s.name == trained.chosen), None)
    label_metrics = {
        "ctr": float(y_true.mean()),
        "ece": expected_calibration_error(y_true, np.clip(y_score, 0.0, 1.0), n_bins=10),
    }
    if chosen is not None:
        label_metrics["ndcg_at_10"] = chosen.valid_ndcg  # NaN (not computable) is left out
    moments = request_moments(
        events,
        start=trained.validation.train.cutoff,
        session_gap_s=bundle.feature_config.session_gap_s,
        limit=max(PROFILE_MIN_MOMENTS, max_rows // max(model.n_candidates, 1)),
        seed=seed,
    )
    features, times = valid.features, None
    if len(moments):
        features, times = served_rows(model, dataset_dir, moments)
        y_score = bundle.probabilities(features)
    return ReferenceProfile.build(
        features,
        y_score,
        numeric=valid.schema.numeric,
        categorical=valid.schema.categorical,
        label_metrics=label_metrics,
        times=times,
    )


def request_moments(
    events: pd.DataFrame, *, start: pd.Timestamp, session_gap_s: int, limit: int, seed: int = 0
) -> pd.DataFrame:
    """``user_id``, ``ts`` of up to ``limit`` session starts at or after ``start`` (sampled,
    seeded, in time order).

    A session starts at an event more than ``session_gap_s`` after the user's previous event
    (the online store's session rule), or at the user's first event: the moment a user opens
    the feed, when the service answers a request. Users weigh by their visits, as in traffic.
    """
    frame = events[["user_id", "ts"]].sort_values(["user_id", "ts"], kind="stable")
    previous = frame.groupby("user_id")["ts"].shift()
    gap = (frame["ts"] - previous).dt.total_seconds()
    starts = frame[(previous.isna() | (gap > session_gap_s)) & (frame["ts"] >= start)]
    if len(starts) > limit:
        keep = np.random.default_rng(seed).choice(len(starts), size=limit, replace=False)
        starts = starts.iloc[np.sort(keep)]
    return starts.sort_values("ts", kind="stable").reset_index(drop=True)


def served_rows(
    model: FeedModel, dataset_dir: Path, moments: pd.DataFrame
) -> tuple[pd.DataFrame, npt.NDArray[np.int64]]:
    """The ranker's features of what ``model`` would score for each (user, moment): its own
    candidate sources, merge and snapshot, with the store's features from the events strictly
    before the moment (what :meth:`FeedRecommender.recommend_many
    <mlsd.serving.feed.FeedRecommender.recommend_many>` does online, computed offline).
    The sources were fitted on all the events, the moments' later ones included: fine for a
    distribution of inputs (what the service will see), not for scoring the rows.

    Returns:
        The ranker frame (one row per candidate) and each row's moment, epoch µs.
    """
    bundle, width = model.ranking, model.n_candidates
    config = bundle.feature_config
    user_ids = moments["user_id"].to_numpy(np.int64)
    now_us = moments["ts"].to_numpy("datetime64[us]").astype(np.int64)
    users = stored_user_features(dataset_dir, moments[["user_id", "ts"]], config)
    queries = []
    for row, user_id in enumerate(user_ids):
        recent = np.asarray(users["recent_item_ids"].iloc[row], dtype=np.int64)
        stamps = np.asarray(users["recent_ts"].iloc[row], dtype=np.int64)
        real = int(users["recent_len"].iloc[row])  # stored newest first, then padding
        attributes = {a: str(users[a].iloc[row]) for a in config.user_attributes if a in users}
        queries.append(UserQuery(int(user_id), recent[:real][::-1], stamps[:real][::-1],
                                 attributes, int(now_us[row] // 1_000_000)))  # fmt: skip
    excludes = [model.excluded(q) for q in queries]  # as the service excludes them
    found = {
        name: candidates_many(source, queries, width, excludes=excludes)
        for name, source in model.sources.items()
    }
    lists = SourceLists(
        {n: _padded([i for i, _ in answers], width, -1) for n, answers in found.items()},
        {n: _padded([s for _, s in answers], width, -np.inf) for n, answers in found.items()},
    )
    merged = model.merge(dict(lists.items), queries)
    pairs = candidate_columns(user_ids, merged, lists)
    owner = np.repeat(np.arange(len(user_ids)), (merged.item_ids >= 0).sum(axis=1))
    label_ts = pd.to_datetime(now_us[owner], unit="us", utc=True)
    rows = pd.DataFrame({"user_id": pairs["user_id"], "item_id": pairs["item_id"]})
    rows["label_ts"] = label_ts
    stored = training_features(dataset_dir, rows, config, progress=False)
    extras = model.snapshot.extras(
        pairs["user_id"], pairs["item_id"].astype(np.int64), now_us[owner] / 1e6
    )
    stored = stored.drop(columns=["user_id", "item_id", "label_ts"])
    frame = pd.concat([pd.DataFrame(pairs), stored, pd.DataFrame(extras)], axis=1)
    features, _ = ranker_frame(frame, bundle.layout, bundle.vocabulary, config)
    return features, now_us[owner]


def _padded(rows: list[npt.NDArray[Any]], width: int, fill: float) -> npt.NDArray[Any]:
    """Ragged per-user lists as one ``(n_users, width)`` array padded with ``fill``."""
    dtype = np.int64 if fill == -1 else np.float64
    out = np.full((len(rows), width), fill, dtype=dtype)
    for r, values in enumerate(rows):
        out[r, : min(len(values), width)] = np.asarray(values)[:width]
    return out


def _write_snapshot(
    path: Path, events: pd.DataFrame, items: pd.DataFrame, categories: tuple[str, ...]
) -> None:
    """Per-item and per-user counts over all events, item creation times and categories,
    and each user's distinct items (the serving path's seen items as of training)."""
    per_user = events.groupby("user_id").size()
    user_ids = per_user.index.to_numpy(np.int64)
    pairs = np.unique(events[["user_id", "item_id"]].to_numpy(np.int64), axis=0)  # sorted
    per_item = events.groupby("item_id")["user_id"].nunique()
    items = items.sort_values("item_id")
    item_ids = items["item_id"].to_numpy(np.int64)
    created = (
        pd.to_datetime(items["created_ts"], utc=True)
        if "created_ts" in items.columns
        else pd.Series(pd.NaT, index=items.index, dtype="datetime64[ns, UTC]")
    )
    epoch = pd.Timestamp(0, tz="UTC")
    created_s = (created - epoch).dt.total_seconds().to_numpy(np.float64)  # NaT → NaN
    index = {c: i for i, c in enumerate(categories)}
    category = (
        items["category"].map(index).fillna(-1).to_numpy(np.int64)
        if "category" in items.columns
        else np.full(len(items), -1, dtype=np.int64)
    )
    np.savez(
        path,
        item_ids=item_ids,
        item_users_all=per_item.reindex(item_ids, fill_value=0).to_numpy(np.float64),
        item_created_days_ref=created_s,
        item_category=category,
        user_ids=user_ids,
        user_events_all=per_user.to_numpy(np.float64),
        seen_indptr=np.r_[np.searchsorted(pairs[:, 0], user_ids), len(pairs)].astype(np.int64),
        seen_items=pairs[:, 1],
    )
