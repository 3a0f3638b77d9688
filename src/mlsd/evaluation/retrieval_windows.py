"""The windows of the retrieval protocol: train before a cutoff, targets after it.

:func:`make_task` turns the events of a contract directory into one :class:`EvalTask`: the
training data as of the cutoff and, per target user, the relevant items they had not
interacted with before it (see :mod:`mlsd.evaluation.retrieval` for the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from mlsd.data.schema import EVENTS_FILE, ITEMS_FILE, USERS_FILE
from mlsd.models.retrieval.base import IntArray, RetrievalData


@dataclass(frozen=True)
class EvalTask:
    """One window to score: the training data and each target user's relevant items.

    Attributes:
        train: events strictly before the cutoff and the catalog as of then.
        user_ids: ``(n_users,)`` users with at least one relevant item in the window.
        relevant: n_users arrays of relevant item ids.
        warm: ``(n_users,)`` whether the user has an event before the cutoff.
        n_active_users: users with any event in the window (before dropping those without
            a relevant item).
        exclude: per user, items kept out of every list besides those of ``train`` (a given
            split's validation items at test); ``None``: none.
    """

    train: RetrievalData
    user_ids: IntArray
    relevant: list[IntArray]
    warm: npt.NDArray[np.bool_]
    n_active_users: int
    exclude: list[IntArray] | None = None


def catalog_as_of(items: pd.DataFrame, before: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Items that exist at ``cutoff``: created before it, undated, or already interacted with."""
    if "created_ts" not in items.columns:
        return items
    created = pd.to_datetime(items["created_ts"], utc=True)
    exists = created.isna() | (created < cutoff) | items["item_id"].isin(before["item_id"])
    return items[exists.to_numpy()].reset_index(drop=True)


def make_task(
    events: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    *,
    cutoff: pd.Timestamp,
    end: pd.Timestamp | None,
    min_value: float | None = None,
) -> EvalTask:
    """Train on ``ts < cutoff``; targets are the events in ``[cutoff, end)`` (``end=None``: all)."""
    before = events[events["ts"] < cutoff]
    in_window = events["ts"] >= cutoff
    if end is not None:
        in_window &= events["ts"] < end
    window = events[in_window]
    n_active = int(window["user_id"].nunique())
    if min_value is not None:
        window = window[window["value"] >= min_value]
    pairs = window[["user_id", "item_id"]].drop_duplicates()
    seen = before[["user_id", "item_id"]].drop_duplicates()
    pairs = pairs.merge(seen, how="left", on=["user_id", "item_id"], indicator=True)
    pairs = pairs[pairs["_merge"] == "left_only"].sort_values(["user_id", "item_id"])
    user_ids = pairs["user_id"].drop_duplicates().to_numpy(dtype=np.int64)
    starts = np.searchsorted(pairs["user_id"].to_numpy(np.int64), user_ids)
    relevant = np.split(pairs["item_id"].to_numpy(np.int64), starts[1:])
    return EvalTask(
        train=RetrievalData(
            before.reset_index(drop=True), users, catalog_as_of(items, before, cutoff), cutoff
        ),
        user_ids=user_ids,
        relevant=relevant if len(user_ids) else [],
        warm=np.isin(user_ids, before["user_id"].to_numpy(np.int64)),
        n_active_users=n_active,
    )


def load_dataset(dataset_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``events``, ``users`` and ``items`` of a contract directory, events in time order."""
    dataset_dir = Path(dataset_dir)
    for name in (EVENTS_FILE, USERS_FILE, ITEMS_FILE):
        if not (dataset_dir / name).is_file():
            raise ValueError(
                f"{dataset_dir / name}: not found; --dataset must be a contract directory "
                "(create one with `mlsd data import ...` or `mlsd data synth ...`)"
            )
    events = pd.read_parquet(dataset_dir / EVENTS_FILE)
    events = events.sort_values("ts", kind="stable").reset_index(drop=True)
    return (
        events,
        pd.read_parquet(dataset_dir / USERS_FILE),
        pd.read_parquet(dataset_dir / ITEMS_FILE),
    )
