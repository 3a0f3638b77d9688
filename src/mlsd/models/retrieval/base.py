"""The ``Retriever`` protocol every candidate source implements, and the data it is fit on.

scikit-learn style: hyperparameters in ``__init__``, ``fit(train) -> self``, learned state in
attributes ending in ``_``. ``recommend`` answers *every* user id it is given: users unseen at
fit time (cold users) get the retriever's fallback, popularity at least, so a metric over all
test users is comparable across methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

PAD_ITEM = -1
"""Item id filling a recommendation row that has fewer than ``k`` items."""


@dataclass(frozen=True)
class RetrievalData:
    """What a retriever is fit on: one window of the dataset contract.

    Attributes:
        events: ``user_id``, ``item_id``, ``ts``, ``event``, ``value`` (+ context columns),
            all strictly before ``cutoff``.
        users: ``users.parquet`` (``user_id`` + attributes).
        items: ``items.parquet`` (``item_id`` + attributes); the catalog that may be retrieved.
        cutoff: the time the retriever is "as of"; it may use nothing at or after it.
    """

    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    cutoff: pd.Timestamp

    def __post_init__(self) -> None:
        if len(self.events) and self.events["ts"].max() >= self.cutoff:
            raise ValueError(
                f"RetrievalData: events reach {self.events['ts'].max()}, at or after the "
                f"cutoff {self.cutoff}; pass only events strictly before the cutoff"
            )


@dataclass(frozen=True)
class InteractionMatrix:
    """Users × items matrix of a window, with the id ↔ row/column maps.

    Attributes:
        user_items: CSR (n_users × n_items), float32; entry = number of events (or a weight).
        user_ids: ``(n_users,)`` the user id of each row, sorted.
        item_ids: ``(n_items,)`` the item id of each column, sorted (the whole catalog).
    """

    user_items: sp.csr_matrix
    user_ids: IntArray
    item_ids: IntArray

    @classmethod
    def from_events(
        cls,
        events: pd.DataFrame,
        catalog: npt.ArrayLike,
        *,
        weight: str | None = None,
        users: npt.ArrayLike | None = None,
    ) -> InteractionMatrix:
        """Count (or sum ``weight`` of) events per (user, item); items outside ``catalog`` drop.

        Rows are the users with events, plus ``users`` (as empty rows when they have none).

        Raises:
            ValueError: ``catalog`` is empty (there would be no item to retrieve).
        """
        item_ids = np.unique(np.asarray(catalog, dtype=np.int64))
        if len(item_ids) == 0:
            raise ValueError(
                "InteractionMatrix.from_events: the catalog is empty (items.item_id has no rows), "
                "so there is nothing to retrieve; fit on a RetrievalData whose items table lists "
                "the items (the dataset's items.parquet: if it is empty, see quarantine.parquet "
                "for why its rows were set aside, or re-import the dataset)"
            )
        user_ids = np.unique(events["user_id"].to_numpy(dtype=np.int64))
        if users is not None:
            user_ids = np.union1d(user_ids, np.asarray(users, dtype=np.int64))
        cols = np.searchsorted(item_ids, events["item_id"].to_numpy(dtype=np.int64))
        cols = np.minimum(cols, max(len(item_ids) - 1, 0))
        in_catalog = item_ids[cols] == events["item_id"].to_numpy(dtype=np.int64)
        rows = np.searchsorted(user_ids, events["user_id"].to_numpy(dtype=np.int64))
        data = (
            np.ones(len(events), dtype=np.float32)
            if weight is None
            else events[weight].to_numpy(dtype=np.float32)
        )
        matrix = sp.csr_matrix(
            (data[in_catalog], (rows[in_catalog], cols[in_catalog])),
            shape=(len(user_ids), len(item_ids)),
            dtype=np.float32,
        )
        matrix.sum_duplicates()
        return cls(user_items=matrix, user_ids=user_ids, item_ids=item_ids)

    def rows_of(self, user_ids: npt.ArrayLike) -> IntArray:
        """Row of each user id, -1 for users not in the matrix (cold users)."""
        ids = np.asarray(user_ids, dtype=np.int64)
        if len(self.user_ids) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.user_ids, ids), len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == ids, pos, -1).astype(np.int64)


class Retriever(ABC):
    """A candidate source: ``fit`` on a window, then ``recommend`` for any users."""

    name: str = "retriever"

    @abstractmethod
    def fit(self, train: RetrievalData) -> Self:
        """Learn from ``train``; returns ``self``."""

    @abstractmethod
    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        """Top-``k`` items per user.

        Args:
            user_ids: ``(n_users,)`` ids; users unknown at fit time get the fallback.
            k: items per user.
            exclude_seen: leave out items the user interacted with before the cutoff.

        Returns:
            ``item_ids`` ``(n_users, k)`` int64, best first, padded with :data:`PAD_ITEM`;
            ``scores`` ``(n_users, k)`` float32, non-increasing per row, ``-inf`` at padding.
        """
