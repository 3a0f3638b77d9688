"""The random per-user protocol: only to compare with published tables that use it.

Each user's interactions split at random (stratified per user), as Microsoft Recommenders'
``python_stratified_split`` does. It leaks the future (a user's test items interleave in time
with their training items), which is why mlsd's default is the global temporal split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlsd.data.schema import EVENTS_FILE, ITEMS_FILE, USERS_FILE
from mlsd.evaluation.retrieval import EvalTask, ProtocolConfig
from mlsd.evaluation.scoring import seen_by_user
from mlsd.models.retrieval.base import RetrievalData


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


def random_task(
    train: pd.DataFrame,
    test: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    protocol: ProtocolConfig,
    *,
    as_of: pd.Timestamp | None = None,
    hidden: pd.DataFrame | None = None,
) -> tuple[EvalTask, pd.Timestamp]:
    """An :class:`EvalTask` whose train is ``train`` and whose targets are ``test``'s items.

    ``as_of`` defaults to a second after the last event of ``train`` and ``test``. ``hidden``
    events (e.g. a validation split at test time) are neither trained on nor relevant: their
    items are the task's ``exclude``, kept out of every list as if seen.
    """
    if as_of is None:
        as_of = pd.Timestamp(max(train["ts"].max(), test["ts"].max())) + pd.Timedelta(seconds=1)
    window = test if protocol.min_value is None else test[test["value"] >= protocol.min_value]
    known = train if hidden is None else pd.concat([train, hidden], ignore_index=True)
    seen = known[["user_id", "item_id"]].drop_duplicates()
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
        exclude=None if hidden is None else seen_by_user(hidden, user_ids),
    )
    return task, as_of
