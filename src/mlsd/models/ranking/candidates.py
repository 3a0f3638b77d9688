"""Ranker rows: each user's merged candidates with the features a ranker reads, as of one time.

A row is a (user, candidate) pair at time ``as_of``. Its features come from three places:

- the candidate sources: for every source, the reciprocal of the candidate's rank in that
  source's list (0 when the source did not list it) and its score there (the row's lowest
  score when it did not), how many sources proposed it, which source claimed it, and its
  position in the merged list;
- the feature step (:func:`mlsd.features.batch.training_features`): every stored and derived
  feature of the pair from events strictly before ``as_of`` — the code the online store and
  serving use, so training and serving read the same values;
- whole-history counts of the training window (events per user, distinct users per item),
  which the windowed stored features do not carry.

String attributes (user static features, item category, claimed source) become int codes
through a :class:`Vocabulary` fitted on the ranker's training rows and saved with the ranker,
so unseen values at serving map to 0 ("unknown") instead of shifting the codes.

Training and serving share :func:`ranker_inputs`, which builds the ranker's float block; training
wraps it in a DataFrame (:func:`ranker_frame`), a request scores it as it is, since pandas'
frame construction and per-column work cost more than the model on a request's few hundred
rows. For the same reason :meth:`Vocabulary.encode` looks a request's strings up in a dict
rather than through ``pd.factorize``; batch prediction's 100K-row columns are factorized, which
costs less per value there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.features.batch import training_features
from mlsd.features.definitions import FeatureConfig, feature_set
from mlsd.models.ranking.base import PRIMARY_LABEL, FeatureSchema, FloatArray, IntArray, RankingData
from mlsd.models.retrieval.base import PAD_ITEM
from mlsd.models.retrieval.merge import MergedCandidates

CLAIMED_SOURCE = "claimed_source"
DROPPED_FEATURES = frozenset(
    {"hour_of_day", "day_of_week", "last_event_ts", "item_first_ts", "feature_ts"}
)
"""Stored features a ranker does not read: raw timestamps (their ages are derived features)
and the request clock, which is one constant per offline cutoff and so cannot be learned."""
LOG_FEATURES = frozenset(
    {"seconds_since_last_event", "item_age_days", "session_events", "item_created_days"}
)
"""Heavy-tailed features fed as ``log1p`` (negative defaults stay -1)."""

_DICT_ROWS = 500
"""Below this many values :meth:`Vocabulary.encode` looks strings up one by one, at or above
it factorizes them (the two cost the same at ~400 values)."""

Columns: TypeAlias = pd.DataFrame | Mapping[str, npt.NDArray[Any]]
"""Rows as a DataFrame (training) or as equal-length column arrays (one request)."""


@dataclass(frozen=True)
class SourceLists:
    """Each source's ranked list for the same users: name → ``(n_users, L)`` items and scores."""

    items: Mapping[str, IntArray]
    scores: Mapping[str, npt.NDArray[np.floating]]


@dataclass
class Vocabulary:
    """String value → int code per categorical column; code 0 is "unknown"."""

    values: dict[str, list[str]] = field(default_factory=dict)
    _codes: dict[str, dict[str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def fit(self, frame: pd.DataFrame, columns: Sequence[str]) -> Vocabulary:
        for column in columns:
            seen = frame[column].astype("string").fillna("unknown").unique().tolist()
            self.values[column] = sorted(str(v) for v in seen)
        self._codes.clear()
        return self

    def encode(self, frame: Columns) -> dict[str, IntArray]:
        """Each categorical column of ``frame`` as int64 codes (unseen values → 0).

        Values are compared as strings (``astype("string")``, missing → ``"unknown"``). A
        short column of ``str`` values (a request's few hundred rows) is looked up value by
        value, which costs less than ``pd.factorize`` below ~500 values; a broadcast one (a
        request's user attribute) once; longer columns (batch prediction's 100K rows: ~30 vs
        ~70 ns a value) and other values are factorized and only the distinct ones
        converted."""
        out: dict[str, IntArray] = {}
        for column in frame:
            if column not in self.values:
                continue
            values = np.asarray(frame[column], dtype=object)
            table = self._table(column)
            if len(values) > 1 and values.strides[0] == 0:  # one value broadcast (a user's)
                code = self._encoded(values[:1], table)[0]
                out[str(column)] = np.full(len(values), code, dtype=np.int64)
            else:
                out[str(column)] = self._encoded(values, table)
        return out

    @staticmethod
    def _encoded(values: npt.NDArray[np.object_], table: Mapping[str, int]) -> IntArray:
        if len(values) < _DICT_ROWS:
            try:  # a request's rows, known strings: a dict lookup per value
                known = [table.get(v) for v in values]
            except TypeError:  # unhashable values: factorize says so
                known = [None]
            if None not in known:
                return np.array(known, dtype=np.int64)
            if all(isinstance(v, str) for v in values):  # and some unseen ones (code 0)
                return np.array([0 if c is None else c for c in known], dtype=np.int64)
        codes, uniques = pd.factorize(values)
        names = [v if isinstance(v, str) else _as_string(v) for v in uniques]
        # Code of each distinct value, then of "missing" (factorize's -1) at the end.
        lut = np.array([table.get(str(v), 0) for v in names] + [table.get("unknown", 0)])
        out: IntArray = lut[codes].astype(np.int64)
        return out

    def _table(self, column: str) -> dict[str, int]:
        table = self._codes.get(column)
        if table is None:
            table = {value: i + 1 for i, value in enumerate(self.values[column])}
            self._codes[column] = table
        return table

    def cardinalities(self) -> dict[str, int]:
        return {column: len(values) + 1 for column, values in self.values.items()}

    def to_json(self) -> str:
        return json.dumps(self.values, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls({str(k): [str(v) for v in vs] for k, vs in json.loads(text).items()})


def _as_string(value: object) -> str:
    """A non-string category value as ``astype("string")`` spells it (missing: "unknown")."""
    converted = pd.Series([value], dtype=object).astype("string").fillna("unknown")
    return str(converted.iloc[0])


def candidate_columns(
    user_ids: npt.ArrayLike, merged: MergedCandidates, lists: SourceLists
) -> dict[str, npt.NDArray[Any]]:
    """One row per (user, non-padding candidate), in user order, with the source features,
    as columns (the request path reads them without building a DataFrame)."""
    users = np.asarray(user_ids, dtype=np.int64)
    items = merged.item_ids
    row, col = np.nonzero(items != PAD_ITEM)
    out: dict[str, npt.NDArray[Any]] = {
        "user_id": users[row],
        "item_id": items[row, col],
        "merged_position": np.log1p(col).astype(np.float32),
        "n_proposers": np.bitwise_count(merged.proposers[row, col]).astype(np.int64),
        CLAIMED_SOURCE: np.asarray(merged.source_names, dtype=object)[merged.source[row, col]],
    }
    for name in merged.source_names:
        ranks, scores = _source_rank_score(items, lists.items[name], lists.scores[name])
        out[f"rrank_{name}"] = (1.0 / np.where(ranks > 0, ranks, np.inf))[row, col]
        out[f"score_{name}"] = scores[row, col]
    return out


def candidate_pairs(
    user_ids: npt.ArrayLike, merged: MergedCandidates, lists: SourceLists
) -> pd.DataFrame:
    """:func:`candidate_columns` as a DataFrame (the training rows' first columns)."""
    return pd.DataFrame(candidate_columns(user_ids, merged, lists))


def positions_in(items: IntArray, listed: IntArray) -> tuple[npt.NDArray[np.bool_], IntArray]:
    """Where each of ``items`` (``(n, k)``, padding < 0) sits in its row of ``listed``
    (``(n, L)``): whether it is there, and its column (meaningless where it is not)."""
    n, width = listed.shape
    user = np.arange(n)[:, None]  # row-wise gathers by indexing (take_along_axis costs more)
    order = np.argsort(listed, axis=1, kind="stable")
    sorted_items = listed[user, order]
    pos = np.empty_like(items)
    for r in range(n):  # one searchsorted per user: candidates x L stays small
        pos[r] = np.searchsorted(sorted_items[r], items[r])
    pos = np.minimum(pos, max(width - 1, 0))
    found = (sorted_items[user, pos] == items) & (items >= 0)
    return found, order[user, pos]


def _source_rank_score(
    candidates: IntArray, listed: IntArray, scores: npt.NDArray[np.floating]
) -> tuple[IntArray, FloatArray]:
    """1-based rank (0 = not listed) and score of each candidate in one source's lists."""
    found, col = positions_in(candidates, listed)
    user = np.arange(len(listed))[:, None]
    finite = np.where(np.isfinite(scores), scores, np.nan).astype(np.float64)
    floor = np.nanmin(np.where(np.isnan(finite), np.inf, finite), axis=1, keepdims=True)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    picked = finite[user, col]
    value = np.where(found & ~np.isnan(picked), picked, floor)
    return np.where(found, col + 1, 0).astype(np.int64), value.astype(np.float64)


def history_counts(events: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Events per user and distinct users per item over a training window."""
    per_user = events.groupby("user_id").size().rename("user_events_all")
    per_item = events.groupby("item_id")["user_id"].nunique().rename("item_users_all")
    return per_user, per_item


def pair_features(
    pairs: pd.DataFrame,
    *,
    dataset_dir: Path,
    train_events: pd.DataFrame,
    as_of: pd.Timestamp,
    config: FeatureConfig,
    items: pd.DataFrame | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """``pairs`` + every feature of :func:`training_features` as of ``as_of`` + history counts.

    ``train_events`` must be the events before ``as_of`` that ``dataset_dir`` holds (the counts
    come from it; the stored features from ``dataset_dir`` with the same cutoff); ``items``
    (the catalog) gives ``item_created_days`` when it has ``created_ts``.
    """
    rows = pairs[["user_id", "item_id"]].assign(label_ts=as_of)
    features = training_features(dataset_dir, rows, config, progress=progress)
    features = features.drop(columns=["user_id", "item_id", "label_ts"])
    out = pd.concat([pairs.reset_index(drop=True), features], axis=1)
    per_user, per_item = history_counts(train_events)
    out["user_events_all"] = out["user_id"].map(per_user).fillna(0.0)
    out["item_users_all"] = out["item_id"].map(per_item).fillna(0.0)
    out["item_created_days"] = _created_days(out["item_id"], items, as_of)
    return out


def _created_days(
    item_ids: pd.Series, items: pd.DataFrame | None, as_of: pd.Timestamp
) -> FloatArray:
    """Days from the item's ``created_ts`` (e.g. a film's release) to ``as_of``; -1 unknown."""
    if items is None or "created_ts" not in items.columns:
        return np.full(len(item_ids), -1.0)
    created = pd.to_datetime(items.set_index("item_id")["created_ts"], utc=True)
    days = (pd.Timestamp(as_of) - item_ids.map(created)).dt.total_seconds() / 86_400
    out: FloatArray = days.fillna(-1.0).to_numpy(np.float64)
    return out


@dataclass(frozen=True)
class FeatureLayout:
    """Which columns of a :func:`pair_features` frame become ranker features, and how."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    @classmethod
    def of(cls, frame: pd.DataFrame, config: FeatureConfig) -> FeatureLayout:
        features = feature_set(config)
        categorical = [*features.names("user_static"), "category", CLAIMED_SOURCE]
        numeric = [
            f.name
            for f in features.features
            if f.dtype in ("int64", "float32")
            and f.name not in DROPPED_FEATURES
            and f.group != "user_static"
        ]
        numeric += [
            c
            for c in frame.columns
            if c.startswith(("rrank_", "score_"))
            or c
            in (
                "merged_position",
                "n_proposers",
                "user_events_all",
                "item_users_all",
                "item_created_days",
            )
        ]
        numeric += [f"affinity_mean_{config.windows_days[-1]}d"]
        return cls(tuple(dict.fromkeys(numeric)), tuple(c for c in categorical if c in frame))

    def to_dict(self) -> dict[str, list[str]]:
        return {"numeric": list(self.numeric), "categorical": list(self.categorical)}

    @cached_property
    def logged(self) -> list[int]:
        """Positions in ``numeric`` of the :data:`LOG_FEATURES`."""
        return [j for j, c in enumerate(self.numeric) if c in LOG_FEATURES]

    @cached_property
    def counts(self) -> list[int]:
        """Positions in ``numeric`` of the count features (fed as ``log1p``)."""
        return [
            j
            for j, c in enumerate(self.numeric)
            if c in ("user_events_all", "item_users_all") or c.startswith("events_")
        ]


def ranker_frame(
    frame: Columns, layout: FeatureLayout, vocabulary: Vocabulary, config: FeatureConfig
) -> tuple[pd.DataFrame, FeatureSchema]:
    """The numeric (float64, finite) and categorical (codes) columns a ranker reads.

    ``frame`` is :func:`pair_features`'s DataFrame offline and :func:`request_columns`'s
    arrays for batch prediction; both go through :func:`ranker_inputs`, as one request does."""
    matrix, schema = ranker_inputs(frame, layout, vocabulary, config)
    return schema.frame(matrix, frame.index if isinstance(frame, pd.DataFrame) else None), schema


def ranker_inputs(
    frame: Columns, layout: FeatureLayout, vocabulary: Vocabulary, config: FeatureConfig
) -> tuple[FloatArray, FeatureSchema]:
    """:func:`ranker_frame`'s values as one ``(n, len(schema.columns))`` float64 block (codes
    as floats, what ``FeatureSchema.matrix`` gives), and its schema.

    The request path scores this block as it is: a DataFrame of a request's few hundred rows
    costs more to build (~1 ms) than the trees take to score it.

    The features are written and transformed one contiguous row each in a ``(columns, n)``
    array, then transposed in one copy, where strided column writes into the row-major block
    cost more (batch prediction's 100K rows: ~25 instead of ~50 ms). The block stays
    row-major: LightGBM scored it a few % faster than the column-major transpose, and the
    request path's block keeps the layout it had."""
    n = len(frame) if isinstance(frame, pd.DataFrame) else len(frame["item_id"])
    k = len(layout.numeric)
    block = np.empty((k + len(layout.categorical), n), dtype=np.float64)
    numeric = block[:k]  # one block, transformed feature-wise at once
    affinity = f"affinity_mean_{config.windows_days[-1]}d"
    for j, column in enumerate(layout.numeric):
        if column == affinity and column not in frame:
            numeric[j] = _category_mean(frame, config.windows_days[-1], config.categories)
        elif isinstance(frame, pd.DataFrame):
            numeric[j] = frame[column].to_numpy(dtype=np.float64, na_value=0.0)
        else:
            numeric[j] = frame[column]
    # A missing value is 0 before the transforms, on both paths (the DataFrame's na_value).
    np.copyto(numeric, 0.0, where=np.isnan(numeric))
    logged, counts = layout.logged, layout.counts
    if logged:
        values = numeric[logged]
        numeric[logged] = np.where(values >= 0, np.log1p(np.maximum(values, 0.0)), -1.0)
    if counts:
        numeric[counts] = np.log1p(np.maximum(numeric[counts], 0.0))
    # NaN and ±inf → 0, as np.nan_to_num(nan=0, posinf=0, neginf=0) in one masked write.
    np.copyto(numeric, 0.0, where=~np.isfinite(numeric))
    codes = vocabulary.encode({c: frame[c] for c in layout.categorical})
    for j, column in enumerate(layout.categorical):
        block[k + j] = codes[column]
    cardinalities = vocabulary.cardinalities()
    schema = FeatureSchema(
        layout.numeric, layout.categorical, {c: cardinalities[c] for c in layout.categorical}
    )
    matrix: FloatArray = np.ascontiguousarray(block.T)
    return matrix, schema


def _category_mean(frame: Columns, window: int, categories: Sequence[str]) -> FloatArray:
    """The user's mean value (e.g. rating) in the item's category over the longest window."""
    means = frame[f"cat_mean_{window}d"]
    if "category_index" in frame:
        index = np.asarray(frame["category_index"], dtype=np.int64)
    else:  # the batch features carry the category name; its index as the online path has it
        lookup = {name: i for i, name in enumerate(categories)}
        index = pd.Series(frame["category"]).map(lookup).fillna(-1).to_numpy(dtype=np.int64)
    out = np.zeros(len(index))
    for i, (row, cat) in enumerate(zip(means, index, strict=True)):
        if cat >= 0 and row is not None and cat < len(row):
            out[i] = float(row[cat])
    return out


def label_pairs(
    pairs: pd.DataFrame, window: pd.DataFrame, *, min_value: float | None = None
) -> dict[str, FloatArray]:
    """``click``: the user interacted with the item in ``window`` (with ``value >= min_value``);
    ``rating``: the interaction's highest value scaled to [0, 1] by the window's maximum
    (0 without an interaction)."""
    relevant = window if min_value is None else window[window["value"] >= min_value]
    key = ["user_id", "item_id"]
    clicked = relevant[key].drop_duplicates().assign(_hit=1.0)
    best = window.groupby(key, as_index=False)["value"].max()
    top = float(window["value"].max()) if len(window) else 1.0
    joined = pairs[key].merge(clicked, how="left", on=key).merge(best, how="left", on=key)
    rating = joined["value"].fillna(0.0).to_numpy(np.float64) / (top if top > 0 else 1.0)
    return {
        PRIMARY_LABEL: joined["_hit"].fillna(0.0).to_numpy(np.float64),
        "rating": np.clip(rating, 0.0, 1.0),
    }


def ranking_data(
    features: pd.DataFrame,
    schema: FeatureSchema,
    labels: Mapping[str, FloatArray],
    user_ids: npt.ArrayLike,
) -> RankingData:
    """Wrap a ranker frame and its labels; each user's rows are one group."""
    users = np.asarray(user_ids, dtype=np.int64)
    _, groups = np.unique(users, return_inverse=True)
    return RankingData(features, labels, groups.astype(np.int64), schema)


def request_columns(
    pairs: Mapping[str, npt.NDArray[Any]],
    *,
    user: Mapping[str, npt.NDArray[np.generic]],
    items: Mapping[str, npt.NDArray[np.generic]],
    derived: Mapping[str, npt.NDArray[np.generic]],
    extras: Mapping[str, npt.ArrayLike],
    layout: FeatureLayout,
    config: FeatureConfig,
    owner: IntArray | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """The serving twin of :func:`pair_features` for one request: the same columns, from the
    online store's features of the request instead of the batch computation, as arrays.

    Args:
        pairs: :func:`candidate_columns` of the one user (its candidates, in order).
        user, items, derived: :class:`mlsd.features.online.FeatureBatch`'s parts for these
            candidates (user values have a leading dimension of 1, or one row per candidate).
        extras: ``user_events_all``, ``item_users_all`` and ``item_created_days`` per candidate
            (the model's snapshot as of training); they win over a ``derived`` entry of the
            same name (a request context key, which never overrides a model column).
        layout: the ranker's columns.
        owner: batch prediction's many users: ``user`` has one row per user and candidate row
            ``i`` belongs to user row ``owner[i]`` (the columns are those of ``user`` repeated
            by ``owner``; only the user values the ranker reads are repeated).
    """
    n = len(pairs["item_id"])
    out = dict(pairs)
    longest = config.windows_days[-1]

    def users(name: str) -> npt.NDArray[Any]:
        values = np.asarray(user[name])
        return values if owner is None else values[owner]

    for column in layout.numeric:
        if column in out:
            continue
        if column == f"affinity_mean_{longest}d":
            # What _category_mean computes offline, vectorised: the row's user's mean in the
            # row's item category (user rows: one broadcast user, one per candidate, or one
            # per user with the candidates' owners).
            means = np.asarray(user[f"cat_mean_{longest}d"], dtype=np.float64)
            means = means.reshape(-1, means.shape[-1])
            index = np.asarray(items["category_index"], dtype=np.int64)
            known = (index >= 0) & (index < means.shape[1])
            if owner is None:
                means = np.broadcast_to(means, (n, means.shape[-1]))
                picked = means[np.arange(n), np.where(known, index, 0)]
            else:
                picked = means[owner, np.where(known, index, 0)]
            out[column] = np.where(known, picked, 0.0)
            continue
        # extras before derived: derived also holds the request's context, whose keys must
        # not stand in for the model's own columns.
        for source in (extras, derived, items, user):
            if column in source:
                value = users(column) if source is user else np.asarray(source[column])
                out[column] = value if value.shape == (n,) else np.broadcast_to(value, (n,))
                break
        else:
            raise ValueError(f"request features: no value for the ranker's column {column!r}")
    for column in layout.categorical:
        if column in out:
            continue
        if column in items:
            values = np.asarray(items[column], dtype=object)
        else:
            values = np.asarray(user[column], dtype=object)
            values = values if owner is None else values[owner]
        out[column] = np.broadcast_to(values, (n,)) if values.shape[0] == 1 else values
    return out
