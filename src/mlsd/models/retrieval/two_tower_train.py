"""Two-tower retriever: point-in-time training data, the training loop and the serving wrapper.

Every training example is one event (user, item, ts). Its user features are those known before
``ts``: the last ``history_len`` items *strictly* before ``ts - history_gap_hours`` (never an
event at or after ``ts``), the user's attributes, and the hour and weekday of ``ts``.

A batch is a run of ``batch_size`` consecutive events (cut at a random offset each epoch, the
runs shuffled), and every candidate of the batch (its positives and random negatives) is
embedded with its popularity *as of the batch's first event*: counts of events strictly before
it, so no example sees a count from its future, and all candidates of a softmax are compared at
one moment, as the catalog is at serving time (embedded as of the cutoff). With shuffled,
time-mixed batches instead, the item tower cannot learn what "popular right now" means: every
candidate would carry the counts of a different day (on ML-100K's training window, validation
recall@100 was 0.30-0.32 that way, 0.36-0.41 with time-local batches). The log-Q correction
follows the same sampling: an item's chance to be in a batch is its share of the events
shortly before it.

Early stopping holds out the last ``val_frac`` of the window's events: each epoch, those users
are embedded as of the split time and their recall@100 over the whole catalog (minus what they
had seen) picks the epoch; with ``refit`` the model is retrained on the whole window for that
many epochs. Users with neither attributes nor history get the popularity fallback.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mlsd.models.retrieval.base import (
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.popularity import PopularityRetriever, fit_fallback
from mlsd.models.retrieval.topk import MAX_BATCH_CELLS, check_fitted, recommend_from_scores
from mlsd.models.retrieval.two_tower import (
    FeatureSizes,
    InBatchSoftmax,
    ItemFeatures,
    TwoTower,
    TwoTowerConfig,
    UserFeatures,
)
from mlsd.models.threads import torch_threads

US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR
POPULARITY_SCALE = 10.0  # log1p(count) reaches 10 at 22k events: keeps the inputs near [-1, 1]
VAL_K = 100


def to_us(ts: pd.Series | pd.Timestamp | Sequence[pd.Timestamp]) -> IntArray:
    """UTC timestamps (naive ones read as UTC) → ``(n,)`` int64 microseconds since the epoch."""
    values = pd.Series([ts] if isinstance(ts, pd.Timestamp) else ts)
    stamps = pd.to_datetime(values, utc=True).dt.as_unit("us")
    return np.asarray(stamps.astype("int64"), dtype=np.int64)


def context_of(ts_us: IntArray) -> tuple[IntArray, IntArray]:
    """Hour of day (0-23) and weekday (Monday = 0) of UTC microsecond timestamps."""
    days = ts_us // US_PER_DAY
    return (ts_us // US_PER_HOUR) % 24, (days + 3) % 7  # 1970-01-01 was a Thursday


class EventLog:
    """The window's events, indexed to answer "as of time t" questions for many rows at once.

    Events sorted by (user, ts) and by (item, ts) under a key ``row * span + rank(ts)`` make
    "this row's events before t" one ``searchsorted``: no Python loop per event.

    Args:
        user_rows, item_rows: ``(n_events,)`` positions in the user space and in the catalog.
        ts_us: ``(n_events,)`` event times, microseconds.
    """

    def __init__(self, user_rows: IntArray, item_rows: IntArray, ts_us: IntArray) -> None:
        self.times = np.unique(ts_us)
        self.span = len(self.times) + 1
        rank = np.searchsorted(self.times, ts_us)
        by_user = np.lexsort((ts_us, user_rows))
        self.user_keys = user_rows[by_user] * self.span + rank[by_user]
        self.items_by_user = item_rows[by_user]
        self.item_keys = np.sort(item_rows * self.span + rank)
        self.sorted_ts = np.sort(ts_us)

    def _before(self, keys: IntArray, rows: IntArray, ts_us: IntArray) -> tuple[IntArray, IntArray]:
        """``[start, end)`` in ``keys`` of each row's events strictly before each time."""
        base = rows * self.span
        rank = np.searchsorted(self.times, ts_us, side="left")  # distinct times before ts
        return np.searchsorted(keys, base), np.searchsorted(keys, base + rank)

    def histories(self, user_rows: IntArray, ts_us: IntArray, length: int) -> IntArray:
        """``(n, length)`` item tokens (catalog position + 1) of each user's last ``length``
        items strictly before each time: oldest first, right-aligned, 0-padded on the left."""
        start, end = self._before(self.user_keys, user_rows, ts_us)
        positions = end[:, None] - length + np.arange(length)
        if len(self.items_by_user) == 0:
            return np.zeros(positions.shape, dtype=np.int64)
        tokens = self.items_by_user[np.clip(positions, 0, len(self.items_by_user) - 1)] + 1
        return np.where(positions >= start[:, None], tokens, 0)

    def counts_before(self, item_rows: IntArray, ts_us: IntArray) -> IntArray:
        """``(n,)`` events of each item strictly before each time."""
        start, end = self._before(self.item_keys, item_rows, ts_us)
        return end - start

    def total_before(self, ts_us: IntArray) -> IntArray:
        """``(n,)`` events of any item strictly before each time."""
        return np.searchsorted(self.sorted_ts, ts_us, side="left")


@dataclass(frozen=True)
class Encoding:
    """Id and attribute vocabularies fixed at fit time (saved beside the weights).

    Attributes:
        item_ids: ``(n_items,)`` sorted catalog ids; an item's token is its position + 1.
        item_categories: ``(n_items,)`` category code of each item, 0 = none.
        category_levels: the category of code ``c`` is ``category_levels[c - 1]``.
        user_ids: ``(n_users,)`` sorted ids of every known user (users table ∪ event users).
        user_attributes: ``(n_users, n_attributes)`` codes, 0 = unknown.
        attribute_names: the ``users`` columns used.
        attribute_levels: the values of each attribute, code ``c`` ↔ ``levels[c - 1]``.
    """

    item_ids: IntArray
    item_categories: IntArray
    category_levels: tuple[str, ...]
    user_ids: IntArray
    user_attributes: IntArray
    attribute_names: tuple[str, ...]
    attribute_levels: tuple[tuple[str, ...], ...]

    def sizes(self) -> FeatureSizes:
        levels = tuple(len(values) for values in self.attribute_levels)
        return FeatureSizes(len(self.item_ids), len(self.category_levels), levels)

    def encode_attributes(self, rows: Sequence[Mapping[str, Any]]) -> IntArray:
        """``(n, n_attributes)`` codes of raw ``{column: value}`` dicts; unknown values → 0."""
        codes = np.zeros((len(rows), len(self.attribute_names)), dtype=np.int64)
        for j, name in enumerate(self.attribute_names):
            codes[:, j] = _codes([row.get(name) for row in rows], self.attribute_levels[j])
        return codes


def rows_of(ids: npt.ArrayLike, known: IntArray) -> IntArray:
    """Position of each id in the sorted ``known`` ids, -1 when absent."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(known) == 0:
        return np.full(ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    return np.where(known[pos] == ids, pos, -1)


def _level(value: Any) -> str | None:
    missing = value is None or (not isinstance(value, str) and bool(pd.isna(value)))
    return None if missing else str(value)


def _levels(values: pd.Series) -> tuple[str, ...]:
    return tuple(sorted({level for level in map(_level, values) if level is not None}))


def _codes(values: Sequence[Any] | pd.Series, levels: tuple[str, ...]) -> IntArray:
    lookup = {level: code + 1 for code, level in enumerate(levels)}
    return np.array([lookup.get(_level(v) or "", 0) for v in values], dtype=np.int64)


def build_encoding(train: RetrievalData, config: TwoTowerConfig) -> Encoding:
    """Vocabularies of a window: catalog, categories, known users and their attributes."""
    items = train.items.drop_duplicates("item_id").sort_values("item_id")
    category_levels = _levels(items["category"]) if "category" in items else ()
    categories = _codes(items["category"], category_levels) if category_levels else None
    users = train.users.drop_duplicates("user_id")
    user_ids = np.union1d(users["user_id"].to_numpy(np.int64), train.events["user_id"])
    names = config.user_features
    if names is None:
        names = tuple(
            c
            for c in users.columns
            if c != "user_id" and 0 < users[c].nunique() <= config.max_feature_levels
        )
    missing = sorted(set(names) - set(users.columns))
    if missing:
        raise ValueError(
            f"TwoTowerConfig.user_features: {missing} not in the users table (columns: "
            f"{list(users.columns)}); fix the config or the data"
        )
    levels = tuple(_levels(users[name]) for name in names)
    attributes = np.zeros((len(user_ids), len(names)), dtype=np.int64)
    rows = np.searchsorted(user_ids, users["user_id"].to_numpy(np.int64))
    for j, name in enumerate(names):
        attributes[rows, j] = _codes(users[name], levels[j])
    return Encoding(
        item_ids=items["item_id"].to_numpy(np.int64),
        item_categories=np.zeros(len(items), np.int64) if categories is None else categories,
        category_levels=category_levels,
        user_ids=user_ids.astype(np.int64),
        user_attributes=attributes,
        attribute_names=tuple(names),
        attribute_levels=levels,
    )


class FeatureBuilder:
    """Tensors for the towers, every feature as of a given time."""

    def __init__(self, encoding: Encoding, log: EventLog, config: TwoTowerConfig) -> None:
        self.encoding, self.log, self.config = encoding, log, config
        self.n_items = len(encoding.item_ids)

    def users(
        self, user_rows: IntArray, ts_us: IntArray, *, context: bool, gap_us: int = 0
    ) -> UserFeatures:
        """Users by row as of ``ts_us`` (history before ``ts_us - gap_us``); ``context=False``
        marginalises the hour and weekday (their mean embeddings)."""
        hour, weekday = context_of(ts_us) if context else (np.full_like(ts_us, -1),) * 2
        history = self.log.histories(user_rows, ts_us - gap_us, self.config.history_len)
        attributes = self.encoding.user_attributes[user_rows]
        return UserFeatures(*map(torch.from_numpy, (history, attributes, hour, weekday)))

    def items(self, item_rows: IntArray, ts_us: int) -> ItemFeatures:
        """Items by row with their popularity as of ``ts_us``."""
        now = np.full(len(item_rows), ts_us, dtype=np.int64)
        before = self.log.counts_before(item_rows, now)
        mean = np.log1p(self.log.total_before(now) / max(self.n_items, 1))
        recent = [
            before - self.log.counts_before(item_rows, now - int(days * US_PER_DAY))
            for days in self.config.popularity_windows_days
        ]
        popularity = np.log1p(np.stack([before, *recent], axis=1))
        popularity = np.concatenate([popularity, popularity[:, :1] - mean[:, None]], axis=1)
        return ItemFeatures(
            item=torch.from_numpy(item_rows + 1),
            category=torch.from_numpy(self.encoding.item_categories[item_rows]),
            popularity=torch.from_numpy((popularity / POPULARITY_SCALE).astype(np.float32)),
        )

    def catalog(self, ts_us: int) -> ItemFeatures:
        return self.items(np.arange(self.n_items, dtype=np.int64), ts_us)

    def log_q(self, item_rows: IntArray, ts_us: int, n_rows: int) -> torch.Tensor:
        """``(C,)`` log of each candidate's expected count in a batch starting at ``ts_us``:
        ``n_rows`` draws from the items' (add-one smoothed) share of the last
        ``logq_window_events`` events before it, plus the uniform random negatives."""
        now = np.full(len(item_rows), ts_us, dtype=np.int64)
        end = int(self.log.total_before(now[:1])[0])
        begin = max(end - self.config.logq_window_events, 0)
        start = np.full_like(now, self.log.sorted_ts[begin] if end else ts_us)
        counts = self.log.counts_before(item_rows, now) - self.log.counts_before(item_rows, start)
        share = (counts + 1.0) / (end - begin + self.n_items)
        expected = n_rows * share + self.config.n_random_negatives / self.n_items
        return torch.from_numpy(np.log(expected).astype(np.float32))


@dataclass(frozen=True)
class Examples:
    """Training events as positions, sorted by time: ``(n,)`` user rows, item rows, µs."""

    users: IntArray
    items: IntArray
    ts: IntArray

    def take(self, index: IntArray | npt.NDArray[np.bool_]) -> Examples:
        return Examples(self.users[index], self.items[index], self.ts[index])


def training_examples(events: pd.DataFrame, encoding: Encoding) -> Examples:
    """The events on catalog items as positions, sorted by time (ties keep their order)."""
    item_rows = rows_of(events["item_id"], encoding.item_ids)
    keep = item_rows >= 0
    if not keep.any():
        raise ValueError(
            "TwoTowerRetriever: the training window has no events on catalog items; "
            "check that events.item_id matches items.item_id"
        )
    ts = to_us(events["ts"])[keep]
    users = rows_of(events["user_id"].to_numpy()[keep], encoding.user_ids)
    return Examples(users, item_rows[keep], ts).take(np.argsort(ts, kind="stable"))


@dataclass(frozen=True)
class Validation:
    """Held-out users of the window's tail (those with attributes or history before it).

    ``relevant`` and ``seen`` are CSR (n_val_users × n_items): their new items from ``as_of``
    on, and what they had before.
    """

    user_rows: IntArray
    as_of: int
    relevant: sp.csr_matrix
    seen: sp.csr_matrix


def make_validation(
    examples: Examples, as_of: int, n_items: int, with_attributes: IntArray
) -> Validation:
    """Users with events at or after ``as_of`` and, before it, attributes or history."""
    before = examples.ts < as_of
    tail_users = np.unique(examples.users[~before])
    users = tail_users[np.isin(tail_users, np.union1d(with_attributes, examples.users[before]))]

    def matrix(mask: npt.NDArray[np.bool_]) -> sp.csr_matrix:
        take = mask & np.isin(examples.users, users)
        rows, cols = np.searchsorted(users, examples.users[take]), examples.items[take]
        ones = np.ones(len(rows), dtype=np.float32)
        return sp.csr_matrix((ones, (rows, cols)), shape=(len(users), n_items)).sign()

    seen, relevant = matrix(before), matrix(~before)
    relevant = (relevant - relevant.multiply(seen)).tocsr()
    relevant.eliminate_zeros()
    keep = np.diff(relevant.indptr) > 0
    return Validation(users[keep], as_of, relevant[keep], seen[keep])


@torch.no_grad()
def validation_recall(model: TwoTower, features: FeatureBuilder, val: Validation) -> float:
    """Mean recall@100 of the held-out users: whole catalog minus what they had seen."""
    model.eval()
    items = model.item_tower(features.catalog(val.as_of))
    hits = np.zeros(len(val.user_rows))
    chunk = max(1, MAX_BATCH_CELLS // max(features.n_items, 1))  # bounded dense blocks
    for start in range(0, len(val.user_rows), chunk):
        part = slice(start, start + chunk)
        rows = val.user_rows[part]
        users = features.users(rows, np.full(len(rows), val.as_of), context=False)
        scores = model.user_tower(users) @ items.T
        scores = scores.masked_fill(torch.from_numpy(val.seen[part].toarray() > 0), -torch.inf)
        top = torch.topk(scores, min(VAL_K, features.n_items), dim=1).indices.numpy()
        hits[part] = np.take_along_axis(val.relevant[part].toarray(), top, axis=1).sum(axis=1)
    model.train()
    return float(np.mean(hits / np.diff(val.relevant.indptr)))


def time_batches(n: int, size: int, rng: np.random.Generator) -> list[IntArray]:
    """Runs of ``size`` consecutive examples (the first cut at a random offset), shuffled."""
    first = int(rng.integers(1, size + 1))
    bounds = np.unique(np.r_[0, np.arange(first, n, size), n])
    return [np.arange(bounds[i], bounds[i + 1]) for i in rng.permutation(len(bounds) - 1)]


def train_two_tower(
    config: TwoTowerConfig,
    features: FeatureBuilder,
    examples: Examples,
    *,
    epochs: int,
    val: Validation | None = None,
    progress: bool = False,
) -> tuple[TwoTower, InBatchSoftmax, list[dict[str, float]]]:
    """Train from scratch for up to ``epochs``; with ``val``, stop early and keep the best.

    Returns:
        The model (the best epoch's weights when validated), the objective, a log per epoch.
    """
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeds torch without touching the caller's RNG
        torch.manual_seed(config.seed)
        model, objective = TwoTower(config, features.encoding.sizes()), InBatchSoftmax(config)
    params = [*model.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    log: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            title = f"two-tower epoch {epoch}/{epochs}"
            task = bar.add_task(title, total=len(examples.items))
            advance = functools.partial(bar.advance, task)
            entry = {"epoch": float(epoch)}
            entry["loss"] = _train_epoch(
                model, objective, optimizer, features, examples, rng, advance
            )
            if val is not None:
                entry["val_recall@100"] = validation_recall(model, features, val)
                if best is None or entry["val_recall@100"] > best[0]:
                    best = (entry["val_recall@100"], epoch, copy.deepcopy(model.state_dict()))
            log.append(entry)
            scores = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch")
            bar.update(task, description=f"{title}: {scores}")
            if best is not None and epoch - best[1] >= config.patience:
                break
    if best is not None:
        model.load_state_dict(best[2])
    return model.eval(), objective.eval(), log


def _train_epoch(
    model: TwoTower,
    objective: InBatchSoftmax,
    optimizer: torch.optim.Optimizer,
    features: FeatureBuilder,
    examples: Examples,
    rng: np.random.Generator,
    advance: Callable[[float], None],
) -> float:
    """One pass over the examples in time-local batches; returns the mean batch loss."""
    config, n_items = features.config, features.n_items
    gap_us = int(config.history_gap_hours * US_PER_HOUR)
    model.train()
    losses = []
    for batch in time_batches(len(examples.items), config.batch_size, rng):
        now = int(examples.ts[batch[0]])  # the earliest time of the batch
        row_users = examples.users[batch]
        users = features.users(row_users, examples.ts[batch], context=True, gap_us=gap_us)
        negatives = rng.integers(0, n_items, config.n_random_negatives)
        candidates = np.concatenate([examples.items[batch], negatives])
        log_q = features.log_q(candidates, now, len(batch)) if config.logq_correction else None
        items = features.items(candidates, now)
        loss = objective(model, users, items, log_q, torch.from_numpy(row_users))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        advance(len(batch))
    return float(np.mean(losses))


WEIGHTS_FILE = "weights.pt"
META_FILE = "two_tower.json"
ARRAYS = ("item_ids", "item_categories", "user_ids", "user_attributes", "event_users",
          "event_items", "event_ts_us", "fallback_popularity", "item_embeddings")  # fmt: skip


class TwoTowerRetriever(Retriever):
    """The serving wrapper: fit on a window, embed the catalog once, embed users per request.

        retriever = TwoTowerRetriever(TwoTowerConfig(dim=32)).fit(train)
        items, scores = retriever.recommend(user_ids, 100)   # exact top-k, batch path
        index.add(retriever.item_embeddings_)                # serving: catalog → ANN index
        query = retriever.encode_users([recent_item_ids], [{"gender": "F"}], request_ts=now)

    Args:
        config: model and training hyperparameters.
        fallback: answers users with neither attributes nor history (fitted on a copy);
            ``None`` = ``PopularityRetriever()``.
        progress: show a progress bar per epoch during ``fit``.

    Attributes:
        item_ids_: ``(n_items,)`` sorted catalog ids, the row order of ``item_embeddings_``.
        item_embeddings_: ``(n_items, dim)`` float32 unit vectors, popularity as of the cutoff.
        user_ids_: ``(n_users,)`` every user the tower knows (users table ∪ event users).
        model_: the trained :class:`TwoTower`; ``objective_`` its :class:`InBatchSoftmax`.
        best_epoch_: the epoch early stopping picked (``max_epochs`` without validation).
        training_log_: one dict per epoch: phase, epoch, loss, val_recall@100.
        fallback_: the fitted popularity retriever for uninformed users.
        interactions_: users with attributes or history × items, what each has seen.
        encoding_: the id and attribute vocabularies; ``cutoff_`` the fit window's end.
    """

    name = "two_tower"

    item_ids_: IntArray
    item_embeddings_: FloatArray
    user_ids_: IntArray
    model_: TwoTower
    objective_: InBatchSoftmax
    best_epoch_: int
    training_log_: list[dict[str, Any]]
    fallback_: PopularityRetriever
    interactions_: InteractionMatrix
    encoding_: Encoding
    cutoff_: pd.Timestamp

    def __init__(
        self,
        config: TwoTowerConfig | None = None,
        *,
        fallback: PopularityRetriever | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config or TwoTowerConfig()
        self.fallback = fallback
        self.progress = progress

    def fit(self, train: RetrievalData) -> Self:
        encoding = build_encoding(train, self.config)
        examples = training_examples(train.events, encoding)
        self._set_state(encoding, examples, fit_fallback(self.fallback, train), train.cutoff)
        with torch_threads(self.config.threads):
            self.model_, self.objective_, self.training_log_, self.best_epoch_ = self._train()
            with torch.no_grad():
                catalog = self._features.catalog(int(to_us(self.cutoff_)[0]))
                self.item_embeddings_ = self.model_.item_tower(catalog).numpy()
        return self

    def _train(self) -> tuple[TwoTower, InBatchSoftmax, list[dict[str, Any]], int]:
        """Early stopping on the held-out tail (then an optional refit), or a plain fit."""
        config, features, examples = self.config, self._features, self._examples
        split = int(np.quantile(examples.ts, 1.0 - config.val_frac, method="lower"))
        val = None
        if config.val_frac > 0 and (examples.ts < split).any():
            with_attributes = np.flatnonzero(self.encoding_.user_attributes.any(axis=1))
            val = make_validation(examples, split, features.n_items, with_attributes)
        if val is None or len(val.user_rows) == 0:  # nothing to hold out: no early stopping
            model, objective, log = train_two_tower(
                config, features, examples, epochs=config.max_epochs, progress=self.progress
            )
            return model, objective, [{"phase": "full", **e} for e in log], config.max_epochs
        model, objective, log = train_two_tower(
            config, features, examples.take(examples.ts < split), epochs=config.max_epochs,
            val=val, progress=self.progress,
        )  # fmt: skip
        best_epoch = int(max(log, key=lambda e: e["val_recall@100"])["epoch"])
        entries = [{"phase": "validated", **e} for e in log]
        if config.refit:
            model, objective, log = train_two_tower(
                config, features, examples, epochs=best_epoch, progress=self.progress
            )
            entries += [{"phase": "refit", **e} for e in log]
        return model, objective, entries, best_epoch

    def _set_state(
        self,
        encoding: Encoding,
        examples: Examples,
        fallback: PopularityRetriever,
        cutoff: pd.Timestamp,
    ) -> None:
        """Everything but the weights: vocabularies, the event log, who has seen what."""
        self.encoding_, self.fallback_, self.cutoff_ = encoding, fallback, cutoff
        self.item_ids_, self.user_ids_ = encoding.item_ids, encoding.user_ids
        self._examples = examples
        log = EventLog(examples.users, examples.items, examples.ts)
        self._features = FeatureBuilder(encoding, log, self.config)
        # Users the tower can say something about (attributes or history); the rest, and users
        # unknown at fit time, get the fallback through ``recommend_from_scores``.
        with_attributes = np.flatnonzero(encoding.user_attributes.any(axis=1))
        self._informed = np.union1d(with_attributes, examples.users)
        ones = np.ones(len(examples.items), dtype=np.float32)
        rows = np.searchsorted(self._informed, examples.users)
        shape = (len(self._informed), len(encoding.item_ids))
        seen = sp.csr_matrix((ones, (rows, examples.items)), shape=shape)
        user_ids = encoding.user_ids[self._informed]
        self.interactions_ = InteractionMatrix(seen, user_ids, encoding.item_ids)

    def user_embeddings(
        self,
        user_ids: npt.ArrayLike,
        *,
        as_of: pd.Timestamp | None = None,
        request_ts: pd.Timestamp | Sequence[pd.Timestamp] | None = None,
    ) -> FloatArray:
        """``(n_users, dim)`` vectors from each user's attributes and history before ``as_of``.

        Args:
            user_ids: any ids; an unknown one gets the vector of "no attributes, no history".
            as_of: history cutoff; default and at most the fit cutoff (later events are unknown).
            request_ts: request time (one, or one per user) for the context; ``None`` averages.
        """
        check_fitted(self, "item_embeddings_")
        rows = rows_of(user_ids, self.user_ids_)
        known = (rows >= 0)[:, None]
        cutoff = to_us(self.cutoff_)[0]
        when = cutoff if as_of is None else min(to_us(pd.Timestamp(as_of))[0], cutoff)
        times = np.full(len(rows), when, dtype=np.int64)  # a naive as_of reads as UTC
        history = self._features.log.histories(np.maximum(rows, 0), times, self.config.history_len)
        attributes = self.encoding_.user_attributes[np.maximum(rows, 0)]
        return self._user_tower(history * known, attributes * known, request_ts)

    def encode_users(
        self,
        histories: Sequence[npt.ArrayLike],
        attributes: Sequence[Mapping[str, Any]] | None = None,
        *,
        request_ts: pd.Timestamp | Sequence[pd.Timestamp] | None = None,
    ) -> FloatArray:
        """The online path: ``(n, dim)`` user vectors from raw features (e.g. the online store).

        Args:
            histories: per user, the item ids they interacted with, oldest first; the last
                ``history_len`` in the catalog are read.
            attributes: per user, ``{column: value}`` static attributes; ``None`` = unknown.
            request_ts: request time (one, or one per user) for the context; ``None`` averages.
        """
        check_fitted(self, "item_embeddings_")
        length = self.config.history_len
        tokens = np.zeros((len(histories), length), dtype=np.int64)
        for i, items in enumerate(histories):
            rows = rows_of(items, self.item_ids_)
            rows = rows[rows >= 0][-length:]
            tokens[i, length - len(rows) :] = rows + 1
        raw = attributes if attributes is not None else [{}] * len(histories)
        return self._user_tower(tokens, self.encoding_.encode_attributes(raw), request_ts)

    def _user_tower(
        self,
        history: IntArray,
        attributes: IntArray,
        request_ts: pd.Timestamp | Sequence[pd.Timestamp] | None,
    ) -> FloatArray:
        n = len(history)
        if request_ts is None or n == 0:
            hour = weekday = np.full(n, -1, dtype=np.int64)
        else:
            stamps = [request_ts] * n if isinstance(request_ts, pd.Timestamp) else list(request_ts)
            hour, weekday = context_of(to_us(pd.Series(stamps)))
        features = UserFeatures(*map(torch.from_numpy, (history, attributes, hour, weekday)))
        with torch.no_grad(), torch_threads(self.config.threads):
            vectors: FloatArray = self.model_.user_tower(features).numpy()
        return vectors

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        """Exact top-``k`` by inner product over the whole catalog (the index is serving's).

        Users with attributes or history are scored by the towers (history up to the cutoff,
        context averaged); users with neither, or unknown at fit time, get the fallback.
        """
        check_fitted(self, "item_embeddings_")

        def score_rows(rows: IntArray) -> FloatArray:
            user_rows = self._informed[rows]
            times = np.full(len(rows), to_us(self.cutoff_)[0], dtype=np.int64)
            history = self._features.log.histories(user_rows, times, self.config.history_len)
            attributes = self.encoding_.user_attributes[user_rows]
            return self._user_tower(history, attributes, None) @ self.item_embeddings_.T

        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=score_rows,
            fallback_scores=self.fallback_.popularity_,
            exclude_seen=exclude_seen,
        )

    def save(self, directory: Path) -> Path:
        """Write ``weights.pt`` (state dicts), ``two_tower.json`` (config, vocabularies, log)
        and ``.npy`` arrays (ids, attributes, the window's events, embeddings)."""
        check_fitted(self, "item_embeddings_")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"towers": self.model_.state_dict(), "objective": self.objective_.state_dict()}
        torch.save(state, directory / WEIGHTS_FILE)
        enc, ex = self.encoding_, self._examples
        arrays = (enc.item_ids, enc.item_categories, enc.user_ids, enc.user_attributes, ex.users,
                  ex.items, ex.ts, self.fallback_.popularity_, self.item_embeddings_)  # fmt: skip
        for name, array in zip(ARRAYS, arrays, strict=True):
            np.save(directory / f"{name}.npy", np.asarray(array), allow_pickle=False)
        meta = {
            "config": self.config.to_dict(),
            "cutoff": self.cutoff_.isoformat(),
            "category_levels": enc.category_levels,
            "attribute_names": enc.attribute_names,
            "attribute_levels": enc.attribute_levels,
            "fallback_half_life_days": self.fallback_.half_life_days,
            "best_epoch": self.best_epoch_,
            "training_log": self.training_log_,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> TwoTowerRetriever:
        """Inverse of :meth:`save`; unpickles nothing (``weights_only``, ``allow_pickle=False``)."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise FileNotFoundError(f"{directory / META_FILE} not found: not a saved two-tower")
        meta = json.loads((directory / META_FILE).read_text())
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in ARRAYS}
        retriever = cls(TwoTowerConfig.from_dict(meta["config"]), progress=False)
        encoding = Encoding(
            arrays["item_ids"], arrays["item_categories"], tuple(meta["category_levels"]),
            arrays["user_ids"], arrays["user_attributes"], tuple(meta["attribute_names"]),
            tuple(tuple(levels) for levels in meta["attribute_levels"]),
        )  # fmt: skip
        examples = Examples(arrays["event_users"], arrays["event_items"], arrays["event_ts_us"])
        fallback = PopularityRetriever(meta["fallback_half_life_days"])
        fallback.popularity_ = arrays["fallback_popularity"]
        retriever._set_state(encoding, examples, fallback, pd.Timestamp(meta["cutoff"]))
        fallback.interactions_ = retriever.interactions_
        state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
        retriever.model_ = TwoTower(retriever.config, encoding.sizes())
        retriever.model_.load_state_dict(state["towers"])
        retriever.objective_ = InBatchSoftmax(retriever.config)
        retriever.objective_.load_state_dict(state["objective"])
        retriever.model_.eval()
        retriever.best_epoch_, retriever.training_log_ = (
            int(meta["best_epoch"]),
            meta["training_log"],
        )
        retriever.item_embeddings_ = arrays["item_embeddings"]
        return retriever
