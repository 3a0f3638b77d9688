"""Train the feed and write the model directory the service loads (:mod:`mlsd.serving.feed`).

One function, :func:`package_model`: the ranking stage is trained as of the end of the data
(:func:`mlsd.evaluation.offline.train_pipeline`), every candidate source is refit on all the
events and exported in its serving form, and the counts the ranker reads but the online store
does not hold are snapshotted. The result is a directory of safe files (JSON, npz, LightGBM
text, torch weights, Faiss index files): what the registry stores and serving loads.

The directory also holds ``reference_profile.json`` (:mod:`mlsd.monitoring.profile`): the
ranker's inputs and calibrated scores on its held-out rows, with the training-time label
metrics, so the profile that live traffic is compared against travels with the model through
the registry (``model.json``'s ``reference_profile`` names it).
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
import pandas as pd

from mlsd.config import FeedConfig
from mlsd.data.schema import read_info
from mlsd.evaluation.metrics import expected_calibration_error
from mlsd.evaluation.offline import TrainedRankers, train_pipeline
from mlsd.evaluation.retrieval import catalog_as_of, load_dataset
from mlsd.features.batch import feature_config_for
from mlsd.models.ranking.bundle import RankingBundle
from mlsd.models.retrieval.base import RetrievalData
from mlsd.models.retrieval.export import export_source
from mlsd.monitoring.profile import ReferenceProfile
from mlsd.serving.feed import FORMAT_VERSION, MODEL_JSON, REFERENCE_PROFILE, SNAPSHOT


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
    """
    dataset_dir, out = Path(dataset_dir), Path(out)
    feature_config = feature_config_for(dataset_dir, **vars(feed.features))
    bundle, trained = train_pipeline(
        dataset_dir,
        feed.retrieval.factories(),
        feed.ranking.factories(),
        protocol=feed.retrieval.protocol,
        pipeline=feed.ranking.pipeline(),
        feature_config=feature_config,
        progress=progress,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    bundle.save(out / "ranking")
    profile = reference_profile(bundle, trained)
    if profile is not None:
        profile.save(out / REFERENCE_PROFILE)
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
        "quotas": dict(bundle.quotas),
        "n_candidates": feed.ranking.n_candidates,
        "rerank": {
            **dataclasses.asdict(feed.ranking.rerank),
            "blocklist": list(feed.ranking.rerank.blocklist),
        },
        "ranker": bundle.ranker_name,
        "dataset": {"name": info.name, "content_hash": info.content_hash},
        "trained_until": cutoff.isoformat(),
        "source_fit_seconds": fit_seconds,
        "reference_profile": REFERENCE_PROFILE if profile is not None else None,
    }
    (out / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out, trained


def reference_profile(bundle: RankingBundle, trained: TrainedRankers) -> ReferenceProfile | None:
    """The ranker's inputs and calibrated scores on its held-out rows (``None`` without any).

    Features are the ranker's view (:func:`~mlsd.models.ranking.candidates.ranker_frame`: the
    values the service logs as ``f_<name>``/``c_<name>``). Label metrics: ``ctr`` (the rows'
    click rate), ``ndcg_at_10`` (the chosen ranker's on its held-out users) and ``ece`` of
    the calibrated scores; the calibrator was fitted on these rows, so that ECE is in-sample.
    """
    valid = trained.valid_data
    if valid is None or len(valid.features) == 0:
        return None
    y_score = bundle.probabilities(valid.features)
    y_true = valid.label
    chosen = next((s for s in trained.scores if s.name == trained.chosen), None)
    label_metrics = {
        "ctr": float(y_true.mean()),
        "ece": expected_calibration_error(y_true, np.clip(y_score, 0.0, 1.0), n_bins=10),
    }
    if chosen is not None:
        label_metrics["ndcg_at_10"] = chosen.valid_ndcg  # NaN (not computable) is left out
    return ReferenceProfile.build(
        valid.features,
        y_score,
        numeric=valid.schema.numeric,
        categorical=valid.schema.categorical,
        label_metrics=label_metrics,
    )


def _write_snapshot(
    path: Path, events: pd.DataFrame, items: pd.DataFrame, categories: tuple[str, ...]
) -> None:
    """Per-item and per-user counts over all events, item creation times and categories."""
    per_user = events.groupby("user_id").size()
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
        user_ids=per_user.index.to_numpy(np.int64),
        user_events_all=per_user.to_numpy(np.float64),
    )
