"""What simulated users want: the models a simulation draws their clicks from.

A click on an item shown at 0-based position ``p`` takes two things (the position-based model):
the user examines that position, with probability ``examination(p)``, by default
:func:`log_examination` ``= 1 / log2(p + 2)`` (1, 0.63, 0.5, ... the DCG discount), and clicks
the examined item with its true preference probability. :func:`mlsd.evaluation.simulator.simulate`
draws both for every exposure; this module holds the models.

**Whose preferences** (:class:`Preferences`: who is active when, and P(click | examined)):

- :class:`WorldPreferences`, the simulated world's ground truth (:meth:`World.click_probability`
  at the simulated time), read from ``world.json`` + ``world.npz`` beside the dataset. A world
  with ``drift_at`` changes tastes (or who is active) when the simulated clock passes it; to
  simulate one regime whatever the clock, pass ``force_regime="before"`` or ``"after"``.
- :class:`OraclePreferences` for a real dataset: EASE fitted on *all* its events, test period
  included, plays the users (see the class for the score → probability mapping).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from mlsd.data.schema import EVENTS_FILE, ContractError
from mlsd.data.sources.world import World, as_us

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Regime = Literal["before", "after"]


def log_examination(position: int) -> float:
    """P(the user looks at 0-based ``position``) = ``1 / log2(position + 2)``."""
    return 1.0 / math.log2(position + 2)


class Preferences(Protocol):
    """What users want: who is active when, and the true click probability of an exposure."""

    name: str

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        """All user ids and their relative activity at ``ts_us`` (µs since the epoch).

        The ids (and their order) must not depend on the time; only the weights may.
        """
        ...

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        """(n,) P(click | the user examines the item) at ``ts_us``; unknown ids give 0."""
        ...


# ---------------------------------------------------------------- the simulated world


class WorldPreferences:
    """The simulated world's ground truth.

    Args:
        world: the world, e.g. ``World.load(dataset_dir)``.
        force_regime: ``None`` follows the clock (a world with ``drift_at`` switches when the
            simulated time passes it); ``"before"`` / ``"after"`` use that regime's tastes and
            activity at every time (``"after"`` needs a world with ``drift_at``). The time of
            day, weekday and item freshness still follow the clock.

    An item the world creates after the simulated time has probability 0, as an unknown id
    does (:meth:`World.click_probability`): a service whose catalog is newer than the clock
    (``mlsd feed simulate --start`` before the dataset's end) can show it, nobody can click it.
    """

    def __init__(self, world: World, *, force_regime: Regime | None = None) -> None:
        if force_regime not in (None, "before", "after"):
            raise ValueError(f"force_regime={force_regime!r}: expected None, 'before' or 'after'")
        if force_regime == "after" and world.config.drift_at is None:
            raise ValueError(
                "force_regime='after': this world has no drift_at; synthesize one with "
                "WorldConfig(drift_at=...) (mlsd data synth --drift-at ...)"
            )
        self.force_regime = force_regime
        self.world = world if force_regime is None else _fixed_regime(world, force_regime)
        self.name = "world" if force_regime is None else f"world ({force_regime} drift)"
        self._user_ids = np.arange(1, world.config.n_users + 1, dtype=np.int64)

    @classmethod
    def from_dataset(cls, directory: Path, *, force_regime: Regime | None = None) -> Self:
        """Load the world saved beside a synthetic dataset (``world.json`` + ``world.npz``)."""
        return cls(World.load(Path(directory)), force_regime=force_regime)

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        world = self.world
        drift = world.config.drift_us
        after = drift is not None and ts_us >= drift
        return self._user_ids, world.user_activity_after if after else world.user_activity

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        users, items = np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)
        ts = np.broadcast_to(as_us(ts_us), users.shape)
        cfg = self.world.config
        known = (users >= 1) & (users <= cfg.n_users) & (items >= 1) & (items <= cfg.n_items)
        probs = np.zeros(len(users))
        probs[known] = self.world.click_probability(users[known], items[known], ts[known])
        return probs


def _fixed_regime(world: World, regime: Regime) -> World:
    """A copy of ``world`` without drift whose tastes and activity are those of ``regime``."""
    taste = world.user_taste_after if regime == "after" else world.user_taste
    activity = world.user_activity_after if regime == "after" else world.user_activity
    # The click bias stays: World.create calibrates it on the pre-drift regime for both.
    return dataclasses.replace(
        world,
        config=dataclasses.replace(world.config, drift_at=None),
        user_taste=taste,
        user_taste_after=taste,
        user_activity=activity,
        user_activity_after=activity,
    )


# ---------------------------------------------------------------- an oracle for real data


@dataclass(frozen=True)
class OracleConfig:
    """How the oracle scores and calibrates.

    Attributes:
        l2: EASE's ridge weight λ.
        sharpness: slope of the logistic on the user-standardised score; larger means users
            tell good from bad items more sharply.
        target_ctr: mean P(click | examined) over the oracle's own top-``calibration_k`` lists.
        calibration_k: the list length of that mean.
        calibration_users: users (drawn uniformly, weighted by activity) the bias is fitted on.
        max_items: refuse catalogs above this (EASE inverts an items × items matrix).
        event_types: only these events are interactions (e.g. ``("click",)``); ``None``: all.
        seed: for the calibration sample.
    """

    l2: float = 200.0
    sharpness: float = 0.5
    target_ctr: float = 0.05
    calibration_k: int = 10
    calibration_users: int = 1_000
    max_items: int = 20_000
    event_types: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"OracleConfig.target_ctr={self.target_ctr}: must lie in (0, 1)")
        if self.sharpness <= 0 or self.l2 <= 0:
            raise ValueError("OracleConfig.sharpness and OracleConfig.l2 must be > 0")
        if self.calibration_k < 1 or self.calibration_users < 1:
            raise ValueError("OracleConfig.calibration_k and calibration_users must be >= 1")


class OraclePreferences:
    """A model fitted on *all* of a dataset's events plays its users' preferences.

    The model is EASE (:func:`mlsd.models.retrieval.ease.ease_weights`) on the binary users ×
    items matrix of every event, test period included; a user's raw score of item ``i`` is
    ``s = x_u · B[:, i]``. Raw scores grow with the user's history, so each is standardised
    over the catalog for its user, ``z = (s - mean_u) / std_u``, and mapped to a probability
    with one monotone logistic::

        P(click | examined) = sigmoid(bias_ + sharpness * z)

    ``bias_`` is found by bisection so that the mean probability over the oracle's own top-10
    (``calibration_k``) lists, averaged over users weighted by their event counts, equals
    ``target_ctr`` — a perfect recommender gets that CTR at examined positions, any real list
    less. ``sharpness`` sets how much worse: on ML-100K with the defaults (fit in about 0.5 s)
    the mean P(click | examined) is 0.05 on the oracle's top-10, 0.033 on the ten most popular
    items a user had not rated before the last 20% of time, 0.023 on the user's items rated in
    that last 20%, and 0.005 on random items.

    Users are drawn in proportion to their event counts; the activity does not change in time.
    Ids the oracle never saw (users or items without events) have probability 0.
    """

    name = "oracle (EASE on all events)"

    user_ids_: IntArray  # (n_users,) sorted
    item_ids_: IntArray  # (n_items,) sorted, items with events
    user_events_: FloatArray  # (n_users,) events per user: the activity
    user_items_: sp.csr_matrix  # (n_users, n_items) binary float32
    weights_: npt.NDArray[np.float32]  # (n_items, n_items) EASE B
    score_mean_: FloatArray  # (n_users,) mean raw score over the catalog
    score_std_: FloatArray  # (n_users,)
    bias_: float

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config or OracleConfig()

    @classmethod
    def from_dataset(cls, directory: Path, config: OracleConfig | None = None) -> Self:
        """Fit on ``events.parquet`` of a contract directory."""
        path = Path(directory) / EVENTS_FILE
        if not path.is_file():
            raise ContractError(f"{path}: not found; is {directory} a dataset contract directory?")
        events = pd.read_parquet(path, columns=["user_id", "item_id", "event"])
        return cls(config).fit(events)

    def fit(self, events: pd.DataFrame) -> Self:
        """Fit on ``events`` (``user_id``, ``item_id``; ``event`` when filtering by type)."""
        from threadpoolctl import threadpool_limits

        from mlsd.models.retrieval.ease import ease_weights

        cfg = self.config
        if cfg.event_types is not None:
            events = events[events["event"].isin(cfg.event_types)]
        if events.empty:
            raise ValueError("OraclePreferences.fit: no events (of the chosen event_types)")
        users, user_rows = np.unique(events["user_id"].to_numpy(np.int64), return_inverse=True)
        items, item_cols = np.unique(events["item_id"].to_numpy(np.int64), return_inverse=True)
        if len(items) > cfg.max_items:
            raise ValueError(
                f"OraclePreferences: {len(items):,} items have events, above max_items="
                f"{cfg.max_items:,}; EASE needs {len(items) ** 2 * 4 / 1e9:.1f} GB. Raise "
                "OracleConfig.max_items if the memory is there, or use a smaller dataset."
            )
        counts = sp.csr_matrix(
            (np.ones(len(events), np.float32), (user_rows, item_cols)),
            shape=(len(users), len(items)),
        )
        self.user_events_ = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        counts.data[:] = 1.0  # binary: repeated events of a pair count once
        self.user_ids_, self.item_ids_, self.user_items_ = users, items, counts
        with threadpool_limits(limits=1, user_api="blas"):  # see EASERetriever.num_threads
            self.weights_ = ease_weights(counts, cfg.l2)
            self._fit_standardisation()
            self.bias_ = self._calibrated_bias()
        return self

    def _score_rows(self, rows: IntArray) -> npt.NDArray[np.float32]:
        return np.asarray(self.user_items_[rows] @ self.weights_)

    def _fit_standardisation(self, chunk: int = 1024) -> None:
        mean, std = np.empty(len(self.user_ids_)), np.empty(len(self.user_ids_))
        for start in range(0, len(self.user_ids_), chunk):
            scores = self._score_rows(np.arange(start, min(start + chunk, len(mean))))
            mean[start : start + len(scores)] = scores.mean(axis=1)
            std[start : start + len(scores)] = scores.std(axis=1)
        self.score_mean_, self.score_std_ = mean, np.maximum(std, 1e-12)

    def _calibrated_bias(self) -> float:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.calibration_users, len(self.user_ids_))
        rows = np.sort(rng.choice(len(self.user_ids_), n, replace=False))
        k = min(cfg.calibration_k, len(self.item_ids_))
        z = self._standardised(rows[:, None], self._score_rows(rows))
        top = -np.partition(-z, k - 1, axis=1)[:, :k]
        weights = self.user_events_[rows] / self.user_events_[rows].sum()
        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            mean = float(weights @ _sigmoid(mid + cfg.sharpness * top).mean(axis=1))
            lo, hi = (mid, hi) if mean < cfg.target_ctr else (lo, mid)
        return 0.5 * (lo + hi)

    def _standardised(self, rows: IntArray, scores: npt.ArrayLike) -> FloatArray:
        out: FloatArray = (np.asarray(scores, np.float64) - self.score_mean_[rows]) / (
            self.score_std_[rows]
        )
        return out

    def scores(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, *, chunk: int = 2048
    ) -> FloatArray:
        """(n,) user-standardised scores z of known (user, item) pairs; NaN for unknown ids."""
        users, items = np.asarray(user_ids, np.int64), np.asarray(item_ids, np.int64)
        rows, cols = _lookup(self.user_ids_, users), _lookup(self.item_ids_, items)
        known = (rows >= 0) & (cols >= 0)
        out = np.full(len(users), np.nan)
        where = np.flatnonzero(known)
        for start in range(0, len(where), chunk):  # a chunk gathers chunk x n_items weights
            pairs = where[start : start + chunk]
            r, c = rows[pairs], cols[pairs]
            raw = self.user_items_[r].multiply(self.weights_[:, c].T).sum(axis=1)
            out[pairs] = self._standardised(r, np.asarray(raw).ravel())
        return out

    def top_items(self, user_ids: npt.ArrayLike, k: int) -> IntArray:
        """(n, k) the oracle's best items per (known) user, best first; seen items included."""
        rows = _lookup(self.user_ids_, np.asarray(user_ids, np.int64))
        if (rows < 0).any():
            raise ValueError("OraclePreferences.top_items: unknown user ids")
        scores = self._score_rows(rows)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out: IntArray = self.item_ids_[top]
        return out

    def population(self, ts_us: int) -> tuple[IntArray, FloatArray]:
        return self.user_ids_, self.user_events_

    def click_probability(
        self, user_ids: npt.ArrayLike, item_ids: npt.ArrayLike, ts_us: npt.ArrayLike
    ) -> FloatArray:
        z = self.scores(user_ids, item_ids)
        probs = _sigmoid(self.bias_ + self.config.sharpness * np.nan_to_num(z))
        out: FloatArray = np.where(np.isnan(z), 0.0, probs)
        return out


def _lookup(sorted_ids: IntArray, ids: IntArray) -> IntArray:
    """Position of each id in ``sorted_ids``, -1 when absent."""
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def _sigmoid(x: npt.ArrayLike) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))
    return out
