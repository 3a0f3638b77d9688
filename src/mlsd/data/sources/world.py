"""The simulated world: users, items and the ground-truth click model behind the synthetic dataset.

A :class:`World` is fully described by its config and a handful of arrays (saved as
``world.json`` + ``world.npz``, no pickle), so any later step can ask for the *true* click
probability of a (user, item, time) triple and compare a model against it.

Who the users and items are (vocabularies, demographics, tastes, item catalogue) is drawn in
:mod:`mlsd.data.sources.population`.

How the world exposes items (used by :mod:`mlsd.data.sources.synthetic` and by simulators):

1. **When**: activity follows a daily x weekly profile (:data:`HOURLY_ACTIVITY`,
   :data:`WEEKDAY_ACTIVITY`); times are drawn by inverse CDF over an hourly grid.
2. **Who**: users are drawn in proportion to a log-normal activity level.
3. **Which category**: each user has a Dirichlet taste over categories, centred on a prior of
   their age bucket and gender, so demographics carry signal.
4. **Which item**: within the category, in proportion to a power-law (Zipf) popularity among the
   items that already exist at that time, boosted while an item is new and drifting slowly up or
   down over the span (re-evaluated per day).

The click model is logistic and linear in :data:`FEATURE_NAMES`::

    P(click | user, item, ts) = sigmoid(click_bias + click_features(user, item, ts) @ click_weights)

and 0 before the item's creation (it does not exist yet), so a logistic regression on those
features is well specified for the exposures the world makes. Drift (``drift_at``) switches
tastes (``"tastes"``: both exposure and clicks change) or who is active (``"feature"``: the age
mix of events shifts, P(click | features) does not) from ``drift_at`` on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# The vocabularies and PREHISTORY_DAYS live in population.py; the `X as X` form re-exports them
# so that imports from this module keep working (and satisfy mypy's no_implicit_reexport).
from mlsd.data.sources.population import AGE_BUCKETS as AGE_BUCKETS
from mlsd.data.sources.population import AGE_SHARES as AGE_SHARES
from mlsd.data.sources.population import CATEGORY_NAMES as CATEGORY_NAMES
from mlsd.data.sources.population import FEATURE_DRIFT_AGE_BOOST as FEATURE_DRIFT_AGE_BOOST
from mlsd.data.sources.population import GENDER_SHARES as GENDER_SHARES
from mlsd.data.sources.population import GENDERS as GENDERS
from mlsd.data.sources.population import OCCUPATIONS as OCCUPATIONS
from mlsd.data.sources.population import PREHISTORY_DAYS as PREHISTORY_DAYS
from mlsd.data.sources.population import REGIONS as REGIONS
from mlsd.data.sources.population import category_names as category_names
from mlsd.data.sources.population import draw_drift, draw_items, draw_users

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR

WORLD_JSON = "world.json"
WORLD_NPZ = "world.npz"
WORLD_FORMAT = 1

DRIFT_KINDS = ("tastes", "feature")
FEATURE_NAMES = (
    "category_affinity",  # log1p(n_categories * user's taste for the item's category)
    "latent_match",  # user_factors . item_factors / sqrt(n_factors), ~N(0, 1)
    "item_quality",  # per item, ~N(0, 1), correlated with popularity
    "item_freshness",  # exp(-item age in days / FRESHNESS_DAYS); P(click) is 0 before creation
    "evening",  # cos(2*pi*(hour of day - 20) / 24): people click more in the evening
    "weekend",  # 1.0 on Saturday and Sunday (UTC)
)
CLICK_WEIGHTS = (0.8, 0.6, 0.5, 0.8, 0.25, 0.2)
FRESHNESS_DAYS = 7.0

# Activity multipliers by hour of day (UTC) and by weekday (Monday first). Night is quiet, there
# is a lunch bump and an evening peak; weekends are busier.
HOURLY_ACTIVITY = (
    *(0.35, 0.2, 0.12, 0.08, 0.07, 0.1, 0.25, 0.5, 0.7, 0.75, 0.8, 0.9),
    *(1.0, 0.95, 0.85, 0.85, 0.9, 1.0, 1.2, 1.45, 1.6, 1.55, 1.2, 0.7),
)
WEEKDAY_ACTIVITY = (0.95, 0.92, 0.93, 0.97, 1.05, 1.2, 1.25)

# Item popularity drift: a new item's weight is boosted (1 + NOVELTY_BOOST) times, decaying
# with NOVELTY_DAYS; each item also trends up or down by about exp(+-TREND_SCALE) over the span.
NOVELTY_BOOST = 4.0
NOVELTY_DAYS = 5.0
TREND_SCALE = 1.0


def _parse_utc_us(value: str, field_name: str) -> int:
    """ISO date or datetime (naive means UTC) -> µs since the epoch."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"{field_name}={value!r}: expected an ISO date such as 2024-01-01"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


@dataclass
class WorldConfig:
    """Everything that defines a simulated world and the events it emits.

    Attributes:
        n_users, n_items, n_events: sizes; ``n_events`` counts rows of ``events.parquet``
            (views and clicks together).
        seed: the output is a pure function of this config (``chunk_events`` aside).
        n_categories: item categories; every category has at least one item from the start.
        start, days: the event span ``[start, start + days)``, UTC.
        drift_at: from this UTC time on, the drift of ``drift_kind`` applies (``None``: no drift).
        drift_kind: ``"tastes"`` (each user's category taste moves ``drift_strength`` of the way
            to a fresh draw) or ``"feature"`` (activity shifts towards young users).
        drift_strength: in (0, 1]; how much changes at ``drift_at``.
        chunk_events: rows per Parquet row group, i.e. the write batch; bounds memory, does not
            change the rows.
        block_events: rows generated per time block; part of the world's definition.
        taste_concentration: Dirichlet concentration per category; smaller is pickier.
        popularity_exponent: Zipf exponent of item popularity (1 is the classic long tail).
        new_item_fraction: share of items created during the span rather than before it.
        mean_session_views: mean views per session (geometric).
        mean_view_gap_s: mean seconds between views of a session.
        session_stickiness: probability that a view stays in the session's category.
        target_ctr: the click bias is calibrated so the mean click probability of exposures
            is this.
        n_factors: dimension of the user and item latent factors.
    """

    n_users: int = 10_000
    n_items: int = 2_000
    n_events: int = 1_000_000
    seed: int = 0
    n_categories: int = 20
    start: str = "2024-01-01"
    days: int = 90
    drift_at: str | None = None
    drift_kind: str = "tastes"
    drift_strength: float = 0.8
    chunk_events: int = 2_000_000
    block_events: int = 262_144
    taste_concentration: float = 0.3
    popularity_exponent: float = 1.0
    new_item_fraction: float = 0.25
    mean_session_views: float = 6.0
    mean_view_gap_s: float = 30.0
    session_stickiness: float = 0.5
    target_ctr: float = 0.05
    n_factors: int = 8

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)!r}: {expected}")

        for name in ("n_users", "n_items", "n_events", "n_categories", "days", "n_factors"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("chunk_events", "block_events"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        check("seed", self.seed >= 0, "must be >= 0")
        # Days and categories are radix-sorted as 16-bit keys when items are drawn.
        check("days", self.days <= 10_000, "must be <= 10000")
        check("n_categories", self.n_categories <= 10_000, "must be <= 10000")
        check("n_items", self.n_items >= self.n_categories, "must be >= n_categories")
        check("drift_kind", self.drift_kind in DRIFT_KINDS, f"must be one of {DRIFT_KINDS}")
        check("drift_strength", 0.0 < self.drift_strength <= 1.0, "must lie in (0, 1]")
        check("target_ctr", 0.0 < self.target_ctr < 1.0, "must lie in (0, 1)")
        for name in ("new_item_fraction", "session_stickiness"):
            check(name, 0.0 <= getattr(self, name) < 1.0, "must lie in [0, 1)")
        for name in ("taste_concentration", "popularity_exponent"):
            check(name, getattr(self, name) > 0.0, "must be > 0")
        check("mean_session_views", self.mean_session_views >= 1.0, "must be >= 1")
        check("mean_view_gap_s", self.mean_view_gap_s > 1.0, "must be > 1 (seconds)")
        start = _parse_utc_us(self.start, "WorldConfig.start")
        if self.drift_at is not None:
            drift = _parse_utc_us(self.drift_at, "WorldConfig.drift_at")
            if not start < drift < start + self.days * US_PER_DAY:
                raise ValueError(
                    f"WorldConfig.drift_at={self.drift_at!r}: must fall inside the event span "
                    f"({self.start} + {self.days} days)"
                )

    @property
    def start_us(self) -> int:
        return _parse_utc_us(self.start, "WorldConfig.start")

    @property
    def end_us(self) -> int:
        """End of the span (exclusive), µs since the epoch."""
        return self.start_us + self.days * US_PER_DAY

    @property
    def drift_us(self) -> int | None:
        if self.drift_at is None:
            return None
        return _parse_utc_us(self.drift_at, "WorldConfig.drift_at")


def as_us(ts: npt.ArrayLike) -> IntArray:
    """Timestamps -> int64 µs since the epoch.

    Accepts int64 µs, numpy datetime64 of any unit, Arrow timestamps and pandas datetimes
    (time-zone aware ones are converted to UTC).
    """
    if hasattr(ts, "dt") or hasattr(ts, "tz"):  # pandas Series / DatetimeIndex
        import pandas as pd

        index = pd.DatetimeIndex(ts)
        if index.tz is not None:
            index = index.tz_convert(None)
        return np.asarray(index.as_unit("us").asi8, dtype=np.int64)
    arr = np.asarray(ts)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[us]").view(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ts: expected datetime64 or int64 µs since the epoch, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic
    return out


def _cdf(weights: FloatArray) -> FloatArray:
    cdf = np.cumsum(weights)
    out: FloatArray = cdf / cdf[-1]
    return out


def _row_cdf(taste: FloatArray) -> npt.NDArray[np.float32]:
    """Row-wise CDFs (float32 halves the bytes gathered per draw), last column exactly 1."""
    cdf = np.cumsum(taste, axis=1).astype(np.float32)
    cdf[:, -1] = 1.0  # so r < 1 always finds a category
    return cdf


@dataclass(eq=False)
class World:
    """Users, items and the true click model; build with :meth:`World.create` or :meth:`load`.

    Ids are 1-based: user ``u`` is row ``u - 1`` of the ``user_*`` arrays, likewise items.
    Categorical user attributes are codes into :data:`AGE_BUCKETS`, :data:`GENDERS`,
    :data:`OCCUPATIONS` and :data:`REGIONS`; item categories are codes into
    :func:`category_names`.
    """

    config: WorldConfig
    click_bias: float
    click_weights: FloatArray  # (n_features,)
    user_age: npt.NDArray[np.int8]
    user_gender: npt.NDArray[np.int8]
    user_occupation: npt.NDArray[np.int8]
    user_region: npt.NDArray[np.int8]
    user_activity: FloatArray  # (n_users,) relative session rate before drift_at
    user_activity_after: FloatArray  # (n_users,) from drift_at on
    user_taste: FloatArray  # (n_users, n_categories), rows sum to 1, before drift_at
    user_taste_after: FloatArray  # (n_users, n_categories) from drift_at on
    user_factors: npt.NDArray[np.float32]  # (n_users, n_factors)
    item_category: npt.NDArray[np.int32]
    item_second_category: npt.NDArray[np.int32]  # -1: none
    item_created_us: IntArray  # µs since the epoch; item ids are in creation order
    item_popularity: FloatArray  # Zipf base weight
    item_trend: FloatArray  # popularity trend over the span, ~N(0, 1)
    item_quality: FloatArray
    item_factors: npt.NDArray[np.float32]  # (n_items, n_factors)

    def __post_init__(self) -> None:
        cfg = self.config
        self._start = cfg.start_us
        self._drift = cfg.drift_us
        self._taste_cdf = _row_cdf(self.user_taste)
        self._taste_cdf_after = (
            self._taste_cdf
            if self.user_taste_after is self.user_taste
            else _row_cdf(self.user_taste_after)
        )
        self._activity_cdf = _cdf(self.user_activity)
        self._activity_cdf_after = (
            self._activity_cdf
            if self.user_activity_after is self.user_activity
            else _cdf(self.user_activity_after)
        )
        # Items ordered by (category, creation time): the items of category c that exist at
        # time t are a prefix of c's segment, found with one searchsorted on a combined key.
        self._item_order = np.argsort(self.item_category, kind="stable")
        cats = self.item_category[self._item_order].astype(np.int64)
        origin = int(self.item_created_us.min())
        self._key_origin = origin
        self._key_scale = cfg.end_us - origin + 1
        self._item_keys = cats * self._key_scale + (self.item_created_us[self._item_order] - origin)
        self._segment_start = np.searchsorted(cats, np.arange(cfg.n_categories))
        self._popularity_cache: dict[int, FloatArray] = {}
        self._popularity_lock = threading.Lock()  # blocks are simulated on several threads
        # Activity CDF over the hours of the span; times are interpolated inside an hour.
        clock_hour = cfg.start_us // US_PER_HOUR + np.arange(cfg.days * 24)  # hours since 1970
        weekday = (clock_hour // 24 + 3) % 7  # 1970-01-01 was a Thursday
        rate = np.asarray(HOURLY_ACTIVITY)[clock_hour % 24] * np.asarray(WEEKDAY_ACTIVITY)[weekday]
        self._time_cdf = np.concatenate([[0.0], np.cumsum(rate) / rate.sum()])
        self._time_grid = np.arange(cfg.days * 24 + 1, dtype=np.float64) * US_PER_HOUR

    @property
    def n_features(self) -> int:
        return len(self.click_weights)

    # -- the click model ------------------------------------------------------------------

    def click_features(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts: npt.ArrayLike
    ) -> FloatArray:
        """The features of the true click model, in :data:`FEATURE_NAMES` order.

        Args:
            user_ids, item_ids: (n,) ids.
            ts: (n,) datetime64 or int64 µs since the epoch (tastes depend on drift_at).

        Returns:
            (n, n_features) float64.
        """
        users = self._index(user_ids, self.config.n_users, "user_ids")
        items = self._index(item_ids, self.config.n_items, "item_ids")
        ts_us = as_us(ts)
        cats = self.item_category[items]
        taste = self.user_taste[users, cats]
        if self._drift is not None and self.user_taste_after is not self.user_taste:
            after = ts_us >= self._drift
            taste[after] = self.user_taste_after[users[after], cats[after]]
        features = np.empty((len(users), len(FEATURE_NAMES)))
        features[:, 0] = np.log1p(self.config.n_categories * taste)
        latent = np.einsum("ij,ij->i", self.user_factors[users], self.item_factors[items])
        features[:, 1] = latent / math.sqrt(self.config.n_factors)
        features[:, 2] = self.item_quality[items]
        # An item has no age before its creation; its features there are those at creation,
        # and click_probability, not the features, says it cannot be clicked yet.
        age_days = np.maximum(ts_us - self.item_created_us[items], 0) / US_PER_DAY
        features[:, 3] = np.exp(-age_days / FRESHNESS_DAYS)
        hour = (ts_us % US_PER_DAY) / US_PER_HOUR
        features[:, 4] = np.cos(2 * np.pi * (hour - 20.0) / 24.0)
        features[:, 5] = (ts_us // US_PER_DAY + 3) % 7 >= 5
        return features

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts: npt.ArrayLike
    ) -> FloatArray:
        """True P(click | exposure) = sigmoid(click_bias + features @ click_weights), shape (n,).

        0 for an item at a time before its creation: it does not exist yet. The world never
        shows one (:meth:`sample_items` draws among the items created by then), but a service
        asked at a simulated time before its catalog's newest items can, and the freshness
        feature, clamped there, would make such an item the freshest of all.
        """
        logits = self.click_bias + self.click_features(user_ids, item_ids, ts) @ self.click_weights
        created = self.item_created_us[self._index(item_ids, self.config.n_items, "item_ids")]
        out: FloatArray = np.where(as_us(ts) < created, 0.0, _sigmoid(logits))
        return out

    @staticmethod
    def _index(ids: npt.ArrayLike, n: int, name: str) -> IntArray:
        idx = np.asarray(ids, dtype=np.int64) - 1
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"{name}: ids must lie in [1, {n}], got {idx.min() + 1}..{idx.max() + 1}"
            )
        return idx

    # -- how the world exposes items ------------------------------------------------------

    def time_at_quantile(self, q: npt.ArrayLike) -> IntArray:
        """Inverse CDF of activity over the span: quantiles in [0, 1] -> µs since the epoch."""
        rel = np.interp(np.asarray(q, dtype=np.float64), self._time_cdf, self._time_grid)
        return self._start + rel.astype(np.int64)

    def sample_times(
        self, rng: np.random.Generator, n: int, q0: float = 0.0, q1: float = 1.0
    ) -> IntArray:
        """(n,) sorted activity times (µs) between activity quantiles q0 and q1."""
        return self.time_at_quantile(np.sort(q0 + (q1 - q0) * rng.random(n)))

    def sample_users(self, ts_us: IntArray, rng: np.random.Generator) -> IntArray:
        """(n,) user ids drawn by activity, under the regime (before/after drift) at ``ts_us``."""
        r = rng.random(len(ts_us))
        idx = np.searchsorted(self._activity_cdf, r, side="right")
        if self._drift is not None and self._activity_cdf_after is not self._activity_cdf:
            after = ts_us >= self._drift
            idx[after] = np.searchsorted(self._activity_cdf_after, r[after], side="right")
        return np.minimum(idx, self.config.n_users - 1) + 1

    def sample_categories(
        self, user_ids: IntArray, ts_us: IntArray, rng: np.random.Generator
    ) -> IntArray:
        """(n,) category codes drawn from each user's taste at ``ts_us`` (inverse CDF)."""
        users = user_ids - 1
        r = rng.random(len(users), dtype=np.float32)
        # Gathering each user's CDF row and taking the first entry above r beats a binary
        # search over all users' rows: the rows are short and the reads sequential.
        cats = np.argmax(self._taste_cdf[users] > r[:, None], axis=1)
        if self._drift is not None and self._taste_cdf_after is not self._taste_cdf:
            after = np.flatnonzero(ts_us >= self._drift)
            cdf_after = self._taste_cdf_after[users[after]]
            cats[after] = np.argmax(cdf_after > r[after, None], axis=1)
        out: IntArray = cats.astype(np.int64)
        return out

    def sample_items(
        self, categories: IntArray, ts_us: IntArray, rng: np.random.Generator
    ) -> IntArray:
        """(n,) item ids: within each category, by that day's popularity among existing items."""
        r = rng.random(len(categories))
        day = (ts_us - self._start) // US_PER_DAY
        # Work in (day, category) order: each day is one slice, and sorted queries keep the
        # binary searches below in cache. Both sorts are radix sorts on 16-bit keys.
        order = np.argsort(categories.astype(np.int16), kind="stable")
        order = order[np.argsort(day[order].astype(np.int16), kind="stable")]
        cats, ts_sorted, day = categories[order], ts_us[order], day[order]
        keys = cats * self._key_scale + (ts_sorted - self._key_origin)
        stop = np.searchsorted(self._item_keys, keys, side="right")  # end of existing prefix
        begin = self._segment_start[cats]
        r = r[order]
        pos = np.empty(len(order), dtype=np.int64)
        days = (int(day[0]), int(day[-1])) if len(day) else (0, -1)
        bounds = np.searchsorted(day, np.arange(days[0], days[1] + 2))
        for d in range(days[0], days[1] + 1):
            rows = slice(bounds[d - days[0]], bounds[d - days[0] + 1])
            if rows.start == rows.stop:
                continue
            cdf = self._popularity_cdf(d)
            lo, hi = cdf[begin[rows]], cdf[stop[rows]]
            found = np.searchsorted(cdf, lo + r[rows] * (hi - lo), side="right") - 1
            # Rounding can land one step outside [begin, stop); clip back into the prefix.
            pos[rows] = np.clip(found, begin[rows], stop[rows] - 1)
        out = np.empty(len(order), dtype=np.int64)
        out[order] = self._item_order[pos] + 1
        return out

    def _popularity_cdf(self, day: int) -> FloatArray:
        """Cumulative popularity (length n_items + 1) in (category, created) order on ``day``."""
        with self._popularity_lock:
            cached = self._popularity_cache.get(day)
            if cached is not None:
                return cached
            order = self._item_order
            noon = self._start + (day + 0.5) * US_PER_DAY
            age_days = np.maximum(noon - self.item_created_us[order], 0) / US_PER_DAY
            novelty = 1.0 + NOVELTY_BOOST * np.exp(-age_days / NOVELTY_DAYS)
            progress = (day + 0.5) / self.config.days - 0.5
            trend = np.exp(TREND_SCALE * progress * self.item_trend[order])
            cdf = np.concatenate([[0.0], np.cumsum(self.item_popularity[order] * novelty * trend)])
            # Blocks move forward in time: keep the latest days, within about 64 MB.
            if len(self._popularity_cache) >= max(8, 8_000_000 // len(cdf)):
                del self._popularity_cache[min(self._popularity_cache)]
            self._popularity_cache[day] = cdf
            return cdf

    def sample_interactions(
        self, n: int, *, seed: int
    ) -> tuple[IntArray, IntArray, npt.NDArray[np.datetime64]]:
        """n random exposures (user_ids, item_ids, ts as datetime64[us]), sorted by ts.

        Drawn the way the world exposes items (activity over time, users by activity, category
        by taste, item by popularity), without sessions.
        """
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
        ts = self.sample_times(rng, n)
        users = self.sample_users(ts, rng)
        items = self.sample_items(self.sample_categories(users, ts, rng), ts, rng)
        return users, items, ts.view("datetime64[us]")

    # -- creation and persistence ---------------------------------------------------------

    @classmethod
    def create(cls, config: WorldConfig) -> World:
        """Draw a world from ``config`` (deterministic for ``config.seed``).

        The drift arrays come from their own random stream and the click bias is calibrated on
        the pre-drift regime, so a world with ``drift_at`` is the world without it until
        ``drift_at`` (same users, items and click probabilities; and the same events up to the
        block of events that holds ``drift_at``).
        """
        base = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
        arrays = {**draw_users(base, config), **draw_items(base, config)}
        no_drift = cls(
            config=dataclasses.replace(config, drift_at=None),
            click_bias=0.0,
            click_weights=np.asarray(CLICK_WEIGHTS, dtype=np.float64),
            user_taste_after=arrays["user_taste"],
            user_activity_after=arrays["user_activity"],
            **arrays,
        )
        no_drift.click_bias = no_drift._calibrated_bias(config.target_ctr)
        if config.drift_at is None:
            return no_drift
        drift = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1,)))
        return cls(
            config=config,
            click_bias=no_drift.click_bias,
            click_weights=no_drift.click_weights,
            **draw_drift(drift, config, arrays),
            **arrays,
        )

    def _calibrated_bias(self, target_ctr: float, n: int = 20_000) -> float:
        """The bias whose mean click probability over exposures is ``target_ctr`` (bisection)."""
        users, items, ts = self.sample_interactions(n, seed=self.config.seed)
        scores = self.click_features(users, items, ts) @ self.click_weights
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _sigmoid(mid + scores).mean() < target_ctr else (lo, mid)
        return 0.5 * (lo + hi)

    def save(self, directory: Path) -> None:
        """Write ``world.json`` (config, click model, category names) and ``world.npz``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": WORLD_FORMAT,
            "config": dataclasses.asdict(self.config),
            "click_bias": self.click_bias,
            "click_weights": [float(w) for w in self.click_weights],
            "feature_names": list(FEATURE_NAMES),
            "categories": category_names(self.config.n_categories),
            "age_buckets": list(AGE_BUCKETS),
            "genders": list(GENDERS),
            "occupations": list(OCCUPATIONS),
            "regions": list(REGIONS),
        }
        (directory / WORLD_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        # Without drift the "after" arrays are the "before" ones; store them once.
        if self.user_taste_after is self.user_taste:
            del arrays["user_taste_after"]
        if self.user_activity_after is self.user_activity:
            del arrays["user_activity_after"]
        np.savez(directory / WORLD_NPZ, **arrays)

    @classmethod
    def load(cls, directory: Path) -> World:
        """Read a world written by :meth:`save`."""
        directory = Path(directory)
        path = directory / WORLD_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found; a simulated world is saved by `mlsd data synth` (World.save)"
            )
        meta: dict[str, Any] = json.loads(path.read_text())
        if meta.get("format") != WORLD_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')}, expected {WORLD_FORMAT}")
        with np.load(directory / WORLD_NPZ, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        arrays.setdefault("user_taste_after", arrays["user_taste"])
        arrays.setdefault("user_activity_after", arrays["user_activity"])
        return cls(
            config=WorldConfig(**meta["config"]),
            click_bias=float(meta["click_bias"]),
            click_weights=np.asarray(meta["click_weights"], dtype=np.float64),
            **arrays,
        )


_ARRAY_FIELDS = tuple(
    f.name for f in dataclasses.fields(World) if f.name.startswith(("user_", "item_"))
)
