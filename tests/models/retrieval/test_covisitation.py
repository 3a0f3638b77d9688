"""Co-visitation: sessions, windows, recency, and a planted pair it must recover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mlsd.models.retrieval.base import RetrievalData, Retriever
from mlsd.models.retrieval.covisitation import (
    CovisitationRetriever,
    covisitation_matrix,
    session_keys,
    top_per_row,
)
from mlsd.models.retrieval.popularity import PopularityRetriever
from tests.models.retrieval.contract import RetrieverContract, frame
from tests.models.retrieval.test_popularity import hand_made, ml100k_temporal, recall_at_k


class TestCovisitationRetriever(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return CovisitationRetriever(window=5, last_n=10)


def planted() -> RetrievalData:
    """Items 1 and 2 are viewed back to back by six users; item 7 is more popular than 2."""
    rows = []
    for user in range(1, 7):
        day = f"2024-01-{10 + user:02d}"
        rows += [(user, 1, f"{day} 10:00"), (user, 2, f"{day} 10:01"), (user, 4, f"{day} 14:00")]
    rows += [(user, 7, "2024-01-20 09:00") for user in range(10, 20)]
    rows += [(7, 5, "2024-01-25 08:00"), (7, 1, "2024-01-29 20:00")]
    return hand_made(rows, n_items=8)


def pair(model: CovisitationRetriever, a: int, b: int) -> float:
    cols = np.searchsorted(model.interactions_.item_ids, [a, b])
    return float(model.covisitation_[cols[0], cols[1]])


def test_a_planted_pair_is_recovered_ahead_of_popularity() -> None:
    data = planted()
    items, scores = CovisitationRetriever().fit(data).recommend([7], 3)
    popular, _ = PopularityRetriever().fit(data).recommend([7], 3)
    assert items[0, 0] == 2
    assert popular[0, 0] == 7  # what the fallback alone would have said
    assert scores[0, 0] > 0 >= scores[0, 1] >= -1  # then the backfill, in popularity order
    assert items[0, 1:].tolist() == [7, 4]


def test_time_gaps_split_sessions_when_events_have_no_session_id() -> None:
    model = CovisitationRetriever(session_gap_minutes=30).fit(planted())
    assert pair(model, 1, 2) > 0
    assert pair(model, 2, 1) == pair(model, 1, 2)
    assert pair(model, 2, 4) == 0  # four hours later: another session
    wider = CovisitationRetriever(session_gap_minutes=6 * 60).fit(planted())
    assert pair(wider, 2, 4) > 0


def test_session_id_decides_when_the_events_carry_it() -> None:
    events = frame(
        [(1, 1, "2024-01-10 10:00"), (1, 2, "2024-01-10 10:01"), (1, 3, "2024-01-10 13:00")]
    )
    events["session_id"] = np.array([7, 8, 7], dtype=np.int64)
    data = RetrievalData(
        events=events, users=planted().users, items=planted().items, cutoff=planted().cutoff
    )
    model = CovisitationRetriever(session_gap_minutes=30).fit(data)
    assert pair(model, 1, 3) > 0  # same session_id, three hours apart
    assert pair(model, 1, 2) == 0  # a minute apart, other session


def test_a_null_session_id_never_joins_events_of_other_users() -> None:
    # session_id is optional per event: a null one is no session, and the events without one
    # split by time gaps per user (they used to share one key across all users).
    events = frame(
        [
            (1, 1, "2024-01-10 10:00"),
            (1, 2, "2024-01-10 10:01"),  # user 1, no session id: one sitting with item 1
            (2, 3, "2024-01-10 10:02"),  # user 2, no session id, a minute later
            (2, 4, "2024-01-10 10:03"),  # user 2, session 7
            (1, 5, "2024-01-10 10:04"),  # user 1, session 7 (numbered per user)
        ]
    )
    events["session_id"] = np.array([np.nan, np.nan, np.nan, 7.0, 7.0])
    keys = session_keys(events, gap_seconds=1800.0)
    assert keys[0] == keys[1]
    assert len(set(keys[1:].tolist())) == 4
    assert (keys >= 0).all()
    data = RetrievalData(
        events=events, users=planted().users, items=planted().items, cutoff=planted().cutoff
    )
    model = CovisitationRetriever(session_gap_minutes=30).fit(data)
    assert pair(model, 1, 2) > 0
    assert pair(model, 2, 3) == pair(model, 3, 4) == pair(model, 4, 5) == pair(model, 2, 5) == 0


def test_pairs_beyond_the_window_do_not_count_and_nearer_pairs_weigh_more() -> None:
    sessions = np.zeros(4, dtype=np.int64)
    items = np.array([0, 1, 2, 3], dtype=np.int64)
    seconds = np.array([0.0, 1.0, 2.0, 3.0])
    pairs = covisitation_matrix(sessions, items, seconds, 4, window=2, normalize="none").toarray()
    assert pairs[0].tolist() == [0.0, 1.0, 0.5, 0.0]
    np.testing.assert_array_equal(pairs, pairs.T)
    assert np.diag(pairs).tolist() == [0.0] * 4


def test_a_repeated_item_counts_once_per_session() -> None:
    sessions = np.zeros(3, dtype=np.int64)
    items = np.array([0, 0, 1], dtype=np.int64)
    pairs = covisitation_matrix(sessions, items, np.arange(3.0), 2, window=5, normalize="none")
    assert pairs.toarray().tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_row_normalised_rows_sum_to_one() -> None:
    model = CovisitationRetriever(normalize="row").fit(planted())
    sums = np.asarray(model.covisitation_.sum(axis=1)).ravel()
    np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-6)


def test_the_latest_items_vote_louder() -> None:
    """User 7 saw 6 long ago and 1 last; ten users paired 6 with 8, six paired 1 with 2."""
    extra = [(u, i, f"2024-01-02 10:0{i}") for u in range(30, 40) for i in (6, 8)]
    events = pd.concat([planted().events, frame([*extra, (7, 6, "2024-01-03 09:00")])])
    data = RetrievalData(
        events=events.reset_index(drop=True),
        users=planted().users,
        items=planted().items,
        cutoff=planted().cutoff,
    )
    recent_first = CovisitationRetriever(normalize="none", recency_decay=0.5).fit(data)
    all_alike = CovisitationRetriever(normalize="none", recency_decay=1.0).fit(data)
    assert recent_first.recommend([7], 2)[0][0].tolist() == [2, 8]
    assert all_alike.recommend([7], 2)[0][0].tolist() == [8, 2]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="normalize must be"):
        CovisitationRetriever(normalize="max").fit(planted())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window must be >= 1"):
        CovisitationRetriever(window=0).fit(planted())


@pytest.mark.dataset
def test_ml100k_warm_users_get_their_own_candidates(ml100k_dir: Path, tmp_path: Path) -> None:
    """MovieLens has no session ids: ratings in one sitting form a session.

    Recall@100 of the 109 warm test users measured 0.313 (chance: 0.06); fed other users'
    histories the same retriever scores 0.272, popularity 0.335 (it is not required to win).
    """
    train, relevant = ml100k_temporal(ml100k_dir, tmp_path)
    warm = [u for u in relevant if u in set(train.events["user_id"].tolist())]
    recall = recall_at_k(CovisitationRetriever().fit(train), relevant, 100, users=warm)
    assert recall > 0.29, recall


def test_top_per_row_keeps_each_rows_strongest_pairs() -> None:
    dense = np.array(
        [[0.0, 5.0, 1.0, 3.0, 2.0], [4.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0, 9.0]]
    )
    kept = top_per_row(sp.csr_matrix(dense), 2).toarray()
    expected = np.array(
        [[0.0, 5.0, 0.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 9.0]]
    )  # ties (row 2: three 1.0s) go to the lowest column
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(top_per_row(sp.csr_matrix(dense), 4).toarray(), dense)
    with pytest.raises(ValueError, match="max_neighbours"):
        top_per_row(sp.csr_matrix(dense), 0)


def test_max_neighbours_bounds_the_rows_a_request_reads() -> None:
    rng = np.random.default_rng(0)
    sessions = np.sort(rng.integers(0, 100, 3000))
    items = rng.integers(0, 200, 3000)
    seconds = np.arange(3000, dtype=np.float64)
    full = covisitation_matrix(sessions, items, seconds, 200, window=5, normalize="row")
    capped = covisitation_matrix(
        sessions, items, seconds, 200, window=5, normalize="row", max_neighbours=5
    )
    assert np.diff(full.indptr).max() > 5
    assert np.diff(capped.indptr).max() == 5
    # Each kept weight is one of its row's largest (normalised before capping: same values).
    for row in range(200):
        expected = np.sort(full[row].data)[::-1][:5]
        np.testing.assert_allclose(np.sort(capped[row].data)[::-1], expected)
