"""The shared contract every ``Retriever`` must meet; a new retriever's tests are a few lines.

class TestMyRetriever(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return MyRetriever(factors=8)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlsd.models.retrieval.base import PAD_ITEM, RetrievalData, Retriever

COLD_USER = 10**9


def _seen(data: RetrievalData, user_id: int) -> set[int]:
    return set(data.events.loc[data.events["user_id"] == user_id, "item_id"].tolist())


class RetrieverContract:
    """Inherit and implement :meth:`make_retriever`; every test here then runs for it.

    The ``contract_data`` fixture (a small simulated world cut at 80% of its time) comes from
    ``tests/models/retrieval/conftest.py``.
    """

    def make_retriever(self) -> Retriever:
        raise NotImplementedError

    @pytest.fixture
    def fitted(self, contract_data: RetrievalData) -> Retriever:
        retriever = self.make_retriever()
        assert retriever.fit(contract_data) is retriever
        return retriever

    def test_shapes_types_and_padding(
        self, fitted: Retriever, contract_data: RetrievalData
    ) -> None:
        users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:7]
        items, scores = fitted.recommend(users, 10)
        assert items.shape == scores.shape == (7, 10)
        assert items.dtype == np.int64
        assert scores.dtype == np.float32
        catalog = set(contract_data.items["item_id"].tolist()) | {PAD_ITEM}
        assert set(items.ravel().tolist()) <= catalog
        assert np.isneginf(scores[items == PAD_ITEM]).all()

    def test_scores_are_sorted_and_items_unique(
        self, fitted: Retriever, contract_data: RetrievalData
    ) -> None:
        users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:20]
        items, scores = fitted.recommend(users, 25)
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        for row in items:
            real = row[row != PAD_ITEM]
            assert len(real) == len(set(real.tolist()))

    def test_seen_items_are_excluded(self, fitted: Retriever, contract_data: RetrievalData) -> None:
        users = contract_data.events["user_id"].value_counts().index.to_numpy()[:10]
        items, _ = fitted.recommend(users, 30, exclude_seen=True)
        for user, row in zip(users, items, strict=True):
            assert not (set(row.tolist()) & _seen(contract_data, int(user)))
            assert (row != PAD_ITEM).sum() == 30  # the catalog has enough unseen items

    def test_cold_users_get_a_full_fallback(
        self, fitted: Retriever, contract_data: RetrievalData
    ) -> None:
        items, scores = fitted.recommend(np.array([COLD_USER, COLD_USER + 1]), 10)
        assert (items != PAD_ITEM).all()
        assert np.isfinite(scores).all()

    def test_k_beyond_the_catalog_pads(
        self, fitted: Retriever, contract_data: RetrievalData
    ) -> None:
        n_items = contract_data.items["item_id"].nunique()
        items, _ = fitted.recommend(np.array([COLD_USER]), n_items + 5, exclude_seen=False)
        assert items.shape == (1, n_items + 5)
        assert (items[0, n_items:] == PAD_ITEM).all()

    def test_no_users_gives_an_empty_answer(self, fitted: Retriever) -> None:
        items, scores = fitted.recommend(np.array([], dtype=np.int64), 5)
        assert items.shape == scores.shape == (0, 5)

    def test_an_empty_catalog_is_a_clear_error(self, contract_data: RetrievalData) -> None:
        """No items to retrieve: a ValueError naming the items table, not an IndexError."""
        train = RetrievalData(
            contract_data.events,
            contract_data.users,
            contract_data.items.iloc[:0],
            contract_data.cutoff,
        )
        with pytest.raises(ValueError, match=r"items\.item_id"):
            self.make_retriever().fit(train)

    def test_recommendations_are_personal_or_popular(
        self, fitted: Retriever, contract_data: RetrievalData
    ) -> None:
        """Warm users' lists overlap what they go on to do more than a random list would."""
        later = contract_data.events  # a weak sanity check on training data itself
        top_user = int(later["user_id"].value_counts().index[0])
        items, _ = fitted.recommend(np.array([top_user]), 20, exclude_seen=False)
        counts = later["item_id"].value_counts()
        random_hits = 20 * len(_seen(contract_data, top_user)) / len(contract_data.items)
        hits = len(set(items[0].tolist()) & _seen(contract_data, top_user))
        assert hits > random_hits, (hits, random_hits, counts.head())


def frame(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    """Events from (user, item, ISO time) triples, for hand-made cases."""
    users, items, times = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": np.array(users, dtype=np.int64),
            "item_id": np.array(items, dtype=np.int64),
            "ts": pd.to_datetime(list(times), utc=True),
            "event": "view",
            "value": np.float32(1.0),
        }
    )
