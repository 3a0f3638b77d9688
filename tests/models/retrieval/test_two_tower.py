"""Two-tower retriever: the shared contract, the objective, point-in-time features, artifacts,
and the issue's bar: beat popularity on recall@100 on the ML-100K temporal protocol."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mlsd.data.sources.movielens import import_movielens
from mlsd.models.retrieval.base import RetrievalData, Retriever
from mlsd.models.retrieval.two_tower import (
    AttentionPooling,
    InBatchSoftmax,
    TwoTowerConfig,
    sampled_softmax_loss,
)
from mlsd.models.retrieval.two_tower_train import (
    EventLog,
    TwoTowerRetriever,
    to_us,
)
from tests.models.retrieval.contract import COLD_USER, RetrieverContract, frame

TINY = TwoTowerConfig(dim=16, history_len=10, batch_size=256, max_epochs=3, patience=1)


def tiny(**changes: Any) -> TwoTowerRetriever:
    return TwoTowerRetriever(dataclasses.replace(TINY, **changes), progress=False)


class TestTwoTowerContract(RetrieverContract):
    def make_retriever(self) -> Retriever:
        return tiny()


@pytest.fixture(scope="module")
def fitted(contract_data: RetrievalData) -> TwoTowerRetriever:
    return tiny().fit(contract_data)


# --- the objective ---------------------------------------------------------------------------


def test_logq_correction_lets_popular_items_score_higher() -> None:
    """Without the correction a popular item, a negative in many rows, is pushed down more than
    its share; with it, gradient descent (which moves a score by -grad) favours it instead."""
    candidates = torch.tensor([1, 2, 3, 4])
    log_q = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))  # item 1 is popular
    grads = {}
    for name, correction in (("corrected", log_q), ("plain", None)):
        scores = torch.zeros(4, 4, requires_grad=True)
        loss = sampled_softmax_loss(scores, candidates, temperature=1.0, log_q=correction)
        (grads[name],) = torch.autograd.grad(loss, scores)
    assert grads["corrected"][:, 0].sum() < grads["plain"][:, 0].sum()  # popular: pushed up
    assert grads["corrected"][:, 1].sum() > grads["plain"][:, 1].sum()  # rare: pushed down


def test_accidental_hits_and_same_user_positives_are_not_negatives() -> None:
    scores = torch.tensor([[2.0, 0.5, 1.0], [0.3, 1.5, 0.2], [0.1, 0.4, 3.0]])
    # Column 2 holds the same item as row 0's positive: row 0 must ignore it.
    with_hit = sampled_softmax_loss(scores, torch.tensor([7, 8, 7]), temperature=1.0)
    rows = torch.arange(3)
    manual = scores.clone()
    manual[0, 2] = manual[2, 0] = -torch.inf
    assert torch.isclose(with_hit, torch.nn.functional.cross_entropy(manual, rows))
    # Rows 0 and 1 belong to one user: each other's positive is masked too.
    users = torch.tensor([5, 5, 6])
    same_user = sampled_softmax_loss(
        scores, torch.tensor([1, 2, 3]), temperature=1.0, row_users=users
    )
    manual = scores.clone()
    manual[0, 1] = manual[1, 0] = -torch.inf
    assert torch.isclose(same_user, torch.nn.functional.cross_entropy(manual, rows))


def test_loss_decreases_and_groups_are_learned_on_a_planted_problem() -> None:
    """Two user groups, each only ever picks items of its own half of the catalog."""
    rng = np.random.default_rng(0)
    n_users, n_events = 60, 6000
    users = rng.integers(1, n_users + 1, n_events)
    items = rng.integers(1, 11, n_events) + 10 * (users % 2 == 0)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    ts = start + pd.to_timedelta(np.sort(rng.uniform(0, 30 * 86400, n_events)), unit="s")
    events = pd.DataFrame({"user_id": users, "item_id": items, "ts": ts})
    # Users 61 and 62 never acted: one is known by its group, the other by nothing at all.
    table = pd.DataFrame({"user_id": np.arange(1, n_users + 3)})
    table["group"] = np.where(table["user_id"] % 2 == 0, "b", "a")
    table.loc[table["user_id"] == n_users + 2, "group"] = None
    data = RetrievalData(
        events=events.assign(event="view", value=np.float32(1)),
        users=table,
        items=pd.DataFrame({"item_id": np.arange(1, 21)}),
        cutoff=start + pd.Timedelta(days=31),
    )
    model = tiny(max_epochs=8, val_frac=0.0, history_gap_hours=0.0).fit(data)
    losses = [entry["loss"] for entry in model.training_log_]
    assert losses[-1] < 0.9 * losses[0], losses
    recs, _ = model.recommend(np.array([1, 2, n_users + 1]), 5, exclude_seen=False)
    assert (recs[0] <= 10).all(), recs  # group a
    assert (recs[1] > 10).all(), recs  # group b
    assert (recs[2] <= 10).all(), recs  # a cold user of group a: attributes are enough
    nothing, _ = model.recommend(np.array([n_users + 2]), 5)
    popular, _ = model.fallback_.recommend(np.array([n_users + 2]), 5)
    np.testing.assert_array_equal(nothing, popular)  # no attributes, no history: fallback


# --- the towers ------------------------------------------------------------------------------


def test_a_fixed_temperature_is_used_as_set_and_a_learned_one_clamped() -> None:
    # The clamp to [0.01, 1] belongs to a learned temperature (which must start inside it);
    # a fixed temperature below 0.01 is the one trained with.
    for fixed in (0.05, 0.005, 0.001):
        objective = InBatchSoftmax(dataclasses.replace(TINY, temperature=fixed))
        assert float(objective.temperature) == pytest.approx(fixed, rel=1e-6)
    learned = InBatchSoftmax(dataclasses.replace(TINY, temperature=0.05, learn_temperature=True))
    with torch.no_grad():
        learned.log_temperature.fill_(math.log(0.001))
    assert float(learned.temperature.detach()) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"TwoTowerConfig.temperature=0.005: with learn_temp"):
        TwoTowerConfig(temperature=0.005, learn_temperature=True)


def test_attention_pooling_masks_padding_and_is_not_a_mean() -> None:
    torch.manual_seed(0)
    pool = AttentionPooling(dim=4, history_len=3, side_dim=2)
    items = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, True, True], [False, False, False]])
    side = torch.randn(2, 2)
    with torch.no_grad():
        pool.query.weight.zero_()
        pool.query.bias.zero_()  # a zero query: equal weights over the real items
        uniform = pool(items, mask, side)
        assert torch.allclose(uniform[0], items[0, 1:].mean(0), atol=1e-6)
        assert torch.equal(uniform[1], torch.zeros(4))  # an empty history pools to zeros
        pool.query.weight.normal_()
        pool.recency.normal_()
        attended = pool(items, mask, side)
    assert not torch.allclose(attended[0], uniform[0], atol=1e-3)
    assert torch.equal(attended[1], torch.zeros(4))


def test_attention_pooling_fits_and_differs_from_mean(
    contract_data: RetrievalData, fitted: TwoTowerRetriever
) -> None:
    attention = tiny(pooling="attention").fit(contract_data)
    users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:20]
    assert attention.user_embeddings(users).shape == (20, 16)
    assert np.isfinite(attention.item_embeddings_).all()
    assert np.isfinite(attention.encode_users([[]])).all()  # an empty history pools to zeros
    assert not np.allclose(attention.user_embeddings(users), fitted.user_embeddings(users))


# --- point-in-time features ------------------------------------------------------------------


def test_history_holds_only_items_strictly_before_the_event() -> None:
    events = frame(
        [
            (1, 10, "2024-01-01T10:00"),
            (1, 11, "2024-01-01T11:00"),
            (1, 12, "2024-01-01T11:00"),  # same instant as the one before: not its history
            (1, 13, "2024-01-01T12:00"),
            (2, 14, "2024-01-01T09:00"),
        ]
    )
    log = EventLog(
        user_rows=(events["user_id"].to_numpy() - 1),
        item_rows=(events["item_id"].to_numpy() - 10),
        ts_us=to_us(events["ts"]),
    )
    histories = log.histories(np.array([0, 0, 0, 0, 1]), to_us(events["ts"]), length=3)
    tokens = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 2, 3], [0, 0, 0]])  # item - 9
    np.testing.assert_array_equal(histories, tokens)
    # Popularity as of a time counts only what came strictly before it.
    at_11 = to_us(pd.Series([pd.Timestamp("2024-01-01T11:00", tz="UTC")] * 3))
    np.testing.assert_array_equal(log.counts_before(np.array([0, 1, 2]), at_11), [1, 0, 0])
    np.testing.assert_array_equal(log.total_before(at_11), [2, 2, 2])


def test_histories_of_every_training_event_precede_it(contract_data: RetrievalData) -> None:
    events = contract_data.events
    users = pd.factorize(events["user_id"])[0].astype(np.int64)
    items = events["item_id"].to_numpy(np.int64)
    ts = to_us(events["ts"])
    log = EventLog(users, items - 1, ts)
    histories = log.histories(users, ts, length=20)
    order = np.lexsort((ts, users))
    sample = np.random.default_rng(0).choice(len(events), 300, replace=False)
    for event in sample:
        mine = order[users[order] == users[event]]
        earlier = mine[ts[mine] < ts[event]][-20:]  # brute force, in time order
        expected = np.r_[np.zeros(20 - len(earlier), np.int64), items[earlier]]
        np.testing.assert_array_equal(histories[event], expected)


# --- serving ---------------------------------------------------------------------------------


def test_save_and_load_give_identical_recommendations(
    fitted: TwoTowerRetriever, contract_data: RetrievalData, tmp_path: Path
) -> None:
    fitted.save(tmp_path / "model")
    loaded = TwoTowerRetriever.load(tmp_path / "model")
    users = np.r_[contract_data.events["user_id"].drop_duplicates().to_numpy()[:30], COLD_USER]
    for exclude in (True, False):
        items, scores = fitted.recommend(users, 20, exclude_seen=exclude)
        items2, scores2 = loaded.recommend(users, 20, exclude_seen=exclude)
        np.testing.assert_array_equal(items, items2)
        np.testing.assert_array_equal(scores, scores2)
    assert loaded.config == fitted.config
    assert not list((tmp_path / "model").glob("*.pkl"))


def test_fit_is_deterministic_and_leaves_torch_as_it_was(
    contract_data: RetrievalData, fitted: TwoTowerRetriever
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    state = torch.random.get_rng_state()
    try:
        again = tiny(threads=1).fit(contract_data)
        assert torch.get_num_threads() == 3
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(again.item_embeddings_, fitted.item_embeddings_)


def test_a_naive_as_of_reads_as_utc(
    fitted: TwoTowerRetriever, contract_data: RetrievalData
) -> None:
    users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:5]
    middle = contract_data.events["ts"].sort_values().iloc[len(contract_data.events) // 2]
    aware = fitted.user_embeddings(users, as_of=middle)
    naive = fitted.user_embeddings(users, as_of=middle.tz_convert("UTC").tz_localize(None))
    np.testing.assert_array_equal(naive, aware)
    assert not np.allclose(aware, fitted.user_embeddings(users))  # an earlier history


def test_online_path_matches_the_batch_path(
    fitted: TwoTowerRetriever, contract_data: RetrievalData
) -> None:
    users = contract_data.events["user_id"].drop_duplicates().to_numpy()[:5]
    events = contract_data.events.sort_values("ts", kind="stable")
    histories = [events.loc[events["user_id"] == u, "item_id"].to_numpy() for u in users]
    table = contract_data.users.set_index("user_id")
    attributes = [table.loc[u].to_dict() for u in users]
    online = fitted.encode_users(histories, attributes)
    np.testing.assert_allclose(online, fitted.user_embeddings(users), atol=1e-6)
    # The context is read: a request at 3 am on a Sunday is not the averaged context.
    sunday = pd.Timestamp("2024-06-02T03:00", tz="UTC")
    assert not np.allclose(fitted.encode_users(histories, attributes, request_ts=sunday), online)


def test_cold_users_with_attributes_get_a_personal_answer(
    fitted: TwoTowerRetriever, contract_data: RetrievalData
) -> None:
    profiles = contract_data.users.iloc[:2].to_dict("records")
    vectors = fitted.encode_users([[], []], profiles)  # known by their attributes only
    catalog = fitted.item_embeddings_
    uninformed = fitted.encode_users([[]])
    assert not np.allclose(vectors @ catalog.T, uninformed @ catalog.T)
    # Unknown ids (no attributes, no history) get the popularity fallback, not the tower.
    items, _ = fitted.recommend(np.array([COLD_USER]), 10)
    fallback, _ = fitted.fallback_.recommend(np.array([COLD_USER]), 10)
    np.testing.assert_array_equal(items, fallback)


# --- the bar -------------------------------------------------------------------------


@pytest.mark.dataset
@pytest.mark.slow
def test_beats_popularity_on_ml100k_temporal_split(ml100k_dir: Path, tmp_path: Path) -> None:
    """Fit on events before t2 (80% quantile of time), score every test user's new items."""
    import_movielens("movielens-100k", source=ml100k_dir, out=tmp_path, progress=False)
    events = pq.read_table(tmp_path / "events.parquet").to_pandas()
    t2 = events["ts"].quantile(0.8)
    train = RetrievalData(
        events=events[events["ts"] < t2].reset_index(drop=True),
        users=pq.read_table(tmp_path / "users.parquet").to_pandas(),
        items=pq.read_table(tmp_path / "items.parquet").to_pandas(),
        cutoff=t2,
    )
    test = events[events["ts"] >= t2]
    seen = train.events.groupby("user_id")["item_id"].agg(set)
    relevant = {
        user: new
        for user, items in test.groupby("user_id")["item_id"].agg(set).items()
        if (new := items - seen.get(user, set()))
    }
    users = np.array(sorted(relevant))
    assert len(users) == 301  # DESIGN.md: 301 test users, 109 of them warm

    model = TwoTowerRetriever(TwoTowerConfig(dim=32, max_epochs=10), progress=False)
    recs, _ = model.fit(train).recommend(users, 100, exclude_seen=True)

    counts = train.events["item_id"].value_counts()
    ranked = counts.index.to_numpy()[np.lexsort((counts.index, -counts.to_numpy()))]
    popular = [[i for i in ranked if i not in seen.get(u, set())][:100] for u in users]

    def recall(lists: list[list[int]]) -> float:
        pairs = zip(users, lists, strict=True)
        return float(np.mean([len(set(row) & relevant[u]) / len(relevant[u]) for u, row in pairs]))

    two_tower, popularity = recall(recs.tolist()), recall(popular)
    assert two_tower > popularity, (two_tower, popularity)
