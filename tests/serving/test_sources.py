"""Serving candidate sources: exported, loaded, and answering as the offline ``recommend`` does.

Each retriever kind is fit on a small simulated world, exported and loaded back. A fit-time
user's query is rebuilt as the feature store would hold it at the cutoff (events before it in
time order, attributes from ``users.parquet``, now = the cutoff) and must get the offline list.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from implicit.cpu.als import AlternatingLeastSquares

from mlsd.data.sources.synthetic import WorldConfig
from mlsd.models.retrieval.base import PAD_ITEM, IntArray, RetrievalData, Retriever
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.export import export_source
from mlsd.models.retrieval.implicit_mf import ALSRetriever, BPRRetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.segment_popularity import SegmentPopularityRetriever
from mlsd.models.retrieval.two_tower import TwoTowerConfig
from mlsd.models.retrieval.two_tower_train import TwoTowerRetriever
from mlsd.serving.index import FlatIndex
from mlsd.serving.sources import (
    SOURCE_FILE,
    CandidateSource,
    FactorSource,
    RankedItems,
    TwoTowerSource,
    UserQuery,
    candidates_many,
    candidates_matrix,
    load_source,
)
from tests.feed_world import retrieval_world

K = 30
COLD_USER = 10**9
SCORE_TOL = 1e-5

FACTORIES: dict[str, Callable[[], Retriever]] = {
    "popularity": PopularityRetriever,
    "covisitation": CovisitationRetriever,
    "covisitation_short": lambda: CovisitationRetriever(
        last_n=3, recency_decay=0.5, normalize="none"
    ),
    "als": lambda: ALSRetriever(factors=16, iterations=5, num_threads=1),
    "bpr": lambda: BPRRetriever(factors=16, iterations=20, num_threads=1),
    "ease": lambda: EASERetriever(l2=50.0),
    "ease_decayed": lambda: EASERetriever(l2=50.0, half_life_days=7.0),
    "segment_popularity": lambda: SegmentPopularityRetriever(half_life_days=(30.0,)),
    "two_tower": lambda: TwoTowerRetriever(
        TwoTowerConfig(dim=16, history_len=20, max_epochs=2, batch_size=512, val_frac=0.0),
        progress=False,
    ),
}
EXACT = {"popularity", "covisitation", "covisitation_short", "ease", "segment_popularity"}
"""Same sparse arithmetic as offline: equal items and bit-equal scores. The others go through
Faiss or torch (other summation orders) or decay to whole seconds: float32 tolerance."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RetrievalData:
    config = WorldConfig(n_users=300, n_items=150, n_events=20_000, days=20, seed=3)
    return retrieval_world(tmp_path_factory.mktemp("sources-world"), config)


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def exported(
    request: pytest.FixtureRequest, data: RetrievalData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Retriever, Path]:
    kind: str = request.param
    retriever = FACTORIES[kind]().fit(data)
    path = export_source(retriever, tmp_path_factory.mktemp(kind) / "source", index="flat")
    return kind, retriever, path


def query_of(data: RetrievalData, user_id: int) -> tuple[UserQuery, IntArray]:
    """The user as the feature store knows them at the cutoff, and their seen items."""
    events = data.events[data.events["user_id"] == user_id].sort_values("ts", kind="stable")
    seconds = (events["ts"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    row = data.users[data.users["user_id"] == user_id]
    attributes = {
        str(c): str(v) for c, v in row.iloc[0].items() if c != "user_id" and pd.notna(v)
    } if len(row) else {}  # fmt: skip
    history = events["item_id"].to_numpy(np.int64)
    now_s = int(data.cutoff.timestamp())
    query = UserQuery(user_id, history, seconds.to_numpy(np.int64), attributes, now_s)
    return query, np.unique(history)


def sample_users(data: RetrievalData, n: int = 40, *, idle: bool = True) -> list[int]:
    """``n`` users with history, plus (``idle``) every user of the users table without any."""
    active = data.events["user_id"].unique()
    rng = np.random.default_rng(0)
    users = [int(u) for u in rng.choice(active, n, replace=False)]
    if idle:
        users += [int(u) for u in np.setdiff1d(data.users["user_id"].to_numpy(), active)]
    return users


def offline(retriever: Retriever, user_id: int, k: int) -> tuple[IntArray, np.ndarray]:
    items, scores = retriever.recommend(np.array([user_id]), k)
    real = items[0] != PAD_ITEM
    return items[0][real], scores[0][real]


def assert_same_answer(
    got: tuple[IntArray, np.ndarray], want: tuple[IntArray, np.ndarray], *, exact: bool
) -> None:
    got_items, got_scores = got
    want_items, want_scores = want
    assert got_items.dtype == np.int64
    assert got_scores.dtype == np.float32
    if exact:
        np.testing.assert_array_equal(got_items, want_items)
        np.testing.assert_array_equal(got_scores, want_scores)
        return
    assert len(got_items) == len(want_items)
    np.testing.assert_allclose(got_scores, want_scores, rtol=SCORE_TOL, atol=SCORE_TOL)
    want_score_of = dict(zip(want_items.tolist(), want_scores.tolist(), strict=True))
    for item, score in zip(got_items.tolist(), got_scores.tolist(), strict=True):
        # An item missing offline may only be a near-tie of the last place.
        reference = want_score_of.get(item, float(want_scores[-1]))
        assert abs(reference - score) <= SCORE_TOL * max(1.0, abs(score)), item


def test_fit_time_users_get_the_offline_answer(
    exported: tuple[str, Retriever, Path], data: RetrievalData
) -> None:
    kind, retriever, path = exported
    source = load_source(path)
    assert isinstance(source, CandidateSource)
    assert source.name == retriever.name
    for user in sample_users(data):
        query, seen = query_of(data, user)
        got = source.candidates(query, K, exclude=seen)
        assert_same_answer(got, offline(retriever, user, K), exact=kind in EXACT)


def test_unknown_user_without_history_gets_the_cold_answer(
    exported: tuple[str, Retriever, Path], data: RetrievalData
) -> None:
    _, retriever, path = exported
    source = load_source(path)
    now_s = int(data.cutoff.timestamp())
    empty = np.empty(0, dtype=np.int64)
    for user_id in (None, COLD_USER):
        got = source.candidates(UserQuery(user_id, empty, empty, {}, now_s), K, exclude=empty)
        assert_same_answer(got, offline(retriever, COLD_USER, K), exact=True)
    items, scores = source.candidates(UserQuery(None, empty, empty, {}, now_s), 0)
    assert items.shape == scores.shape == (0,)


def test_excluded_items_never_appear(
    exported: tuple[str, Retriever, Path], data: RetrievalData
) -> None:
    _, _, path = exported
    source = load_source(path)
    catalog = data.items["item_id"].to_numpy()
    rng = np.random.default_rng(1)
    for user in sample_users(data, n=10):
        query, seen = query_of(data, user)
        exclude = np.union1d(seen, rng.choice(catalog, 40, replace=False))
        items, scores = source.candidates(query, K, exclude=exclude)
        assert not np.isin(items, exclude).any()
        assert len(items) == min(K, len(catalog) - len(exclude))  # the catalog has enough
        assert len(set(items.tolist())) == len(items)
        assert (np.diff(scores) <= SCORE_TOL).all()


def assert_batch_is_the_single_answer(
    source: CandidateSource, queries: list[UserQuery], excludes: list[IntArray], k: int
) -> None:
    """Batch prediction's answers (padded rows, and the per-query lists) are, query by query,
    what a request gets: same items in the same order and bit-equal scores."""
    ids, scores = candidates_matrix(source, queries, k, excludes=excludes)
    assert ids.shape == scores.shape == (len(queries), k)
    assert ids.dtype == np.int64
    assert scores.dtype == np.float32
    listed = candidates_many(source, queries, k, excludes=excludes)
    for row, (query, exclude) in enumerate(zip(queries, excludes, strict=True)):
        want_items, want_scores = source.candidates(query, k, exclude=exclude)
        m = len(want_items)
        np.testing.assert_array_equal(ids[row, :m], want_items)
        np.testing.assert_array_equal(scores[row, :m], want_scores)
        assert (ids[row, m:] == PAD_ITEM).all()
        assert np.isneginf(scores[row, m:]).all()
        np.testing.assert_array_equal(listed[row][0], want_items)
        np.testing.assert_array_equal(listed[row][1], want_scores)


def test_batched_candidates_are_the_single_query_answers(
    exported: tuple[str, Retriever, Path], data: RetrievalData
) -> None:
    # Users with and without history, extra excludes of several lengths (so vector-index
    # sources search several widths), an anonymous and an unknown user.
    _, _, path = exported
    source = load_source(path)
    catalog = data.items["item_id"].to_numpy()
    rng = np.random.default_rng(2)
    queries, excludes = [], []
    for i, user in enumerate(sample_users(data, n=25)):
        query, seen = query_of(data, user)
        queries.append(query)
        excludes.append(np.union1d(seen, rng.choice(catalog, i % 7 * 5, replace=False)))
    empty = np.empty(0, dtype=np.int64)
    for user_id in (None, COLD_USER):
        queries.append(UserQuery(user_id, empty, empty, {}, int(data.cutoff.timestamp())))
        excludes.append(empty)
    assert_batch_is_the_single_answer(source, queries, excludes, K)
    assert_batch_is_the_single_answer(source, queries, excludes, len(catalog) + 5)  # runs out
    ids, scores = candidates_matrix(source, queries[:3], 0, excludes=excludes[:3])
    assert ids.shape == scores.shape == (3, 0)
    with pytest.raises(ValueError, match="exclude lists"):
        candidates_matrix(source, queries, K, excludes=excludes[:-1])


def test_hnsw_batch_searches_each_request_width(data: RetrievalData, tmp_path: Path) -> None:
    # An approximate index may answer a wider search differently (HNSW's efSearch follows
    # the width): the batch must search each user at the width their request searches.
    retriever = ALSRetriever(factors=16, iterations=5, num_threads=1).fit(data)
    source = load_source(export_source(retriever, tmp_path / "als", index="hnsw"))
    assert isinstance(source, FactorSource)
    rng = np.random.default_rng(3)
    catalog = data.items["item_id"].to_numpy()
    queries, excludes = [], []
    for i, user in enumerate(sample_users(data, n=30, idle=False)):
        query, seen = query_of(data, user)
        queries.append(query)
        excludes.append(np.union1d(seen, rng.choice(catalog, i % 5 * 3, replace=False)))
    assert_batch_is_the_single_answer(source, queries, excludes, 20)


def test_no_pickle_in_the_artifact(exported: tuple[str, Retriever, Path]) -> None:
    _, _, path = exported
    files = [f for f in path.rglob("*") if f.is_file()]
    assert {f.suffix for f in files} <= {".json", ".npz", ".npy", ".faiss", ".pt"}
    for file in files:
        if file.suffix in (".npz", ".npy"):
            loaded = np.load(file, allow_pickle=False)  # raises on object (pickled) arrays
            if file.suffix == ".npz":
                assert all(loaded[name].dtype != object for name in loaded.files)
        elif file.suffix == ".pt":
            state = torch.load(file, weights_only=True)
            assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_missing_or_corrupt_files_name_themselves(
    exported: tuple[str, Retriever, Path], tmp_path: Path
) -> None:
    _, _, path = exported
    for original in sorted(f for f in path.rglob("*") if f.is_file()):
        relative = original.relative_to(path)
        for damage in ("missing", "corrupt"):
            copy = tmp_path / f"{damage}-{relative.as_posix().replace('/', '_')}"
            shutil.copytree(path, copy)
            file = copy / relative
            if damage == "missing":
                file.unlink()
            else:
                file.write_bytes(b"\x00not an artifact\xff" * 3)
            with pytest.raises(ValueError, match=re.escape(str(copy))) as error:
                load_source(copy)
            message = str(error.value)
            assert str(file) in message or str(file.parent) in message, (damage, message)


def test_unknown_kind_and_version_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an exported candidate source"):
        load_source(tmp_path)
    (tmp_path / SOURCE_FILE).write_text('{"format_version": 1, "kind": "pickle"}')
    with pytest.raises(ValueError, match="unknown kind 'pickle'"):
        load_source(tmp_path)
    (tmp_path / SOURCE_FILE).write_text('{"format_version": 99, "kind": "popular"}')
    with pytest.raises(ValueError, match="format_version 99"):
        load_source(tmp_path)


def test_als_folds_in_an_unknown_user_as_implicit_does(data: RetrievalData, tmp_path: Path) -> None:
    retriever = ALSRetriever(factors=16, iterations=5, num_threads=1).fit(data)
    source = load_source(export_source(retriever, tmp_path / "als"))
    assert isinstance(source, FactorSource)
    model = AlternatingLeastSquares(
        factors=16, regularization=retriever.regularization, alpha=retriever.alpha
    )
    model.item_factors = retriever.item_factors_
    catalog = retriever.interactions_.item_ids
    overlaps = []
    for user in sample_users(data, n=10, idle=False):
        query, seen = query_of(data, user)
        anonymous = UserQuery(None, query.history, query.history_ts, {}, query.now_s)
        folded = source.user_vector(anonymous)
        assert folded is not None
        counts = np.bincount(np.searchsorted(catalog, query.history), minlength=len(catalog))
        row = sp.csr_matrix(counts[None, :].astype(np.float32))
        np.testing.assert_allclose(folded, model.recalculate_user(0, row), rtol=1e-3, atol=1e-4)
        items, _ = source.candidates(anonymous, 20, exclude=seen)
        overlaps.append(len(np.intersect1d(items, offline(retriever, user, 20)[0])) / 20)
    # The fold-in solves against the final item factors, the stored factor against the previous
    # sweep's: close, not equal.
    assert np.mean(overlaps) > 0.8, overlaps


def test_bpr_unknown_user_with_history_gets_the_fallback(
    data: RetrievalData, tmp_path: Path
) -> None:
    retriever = BPRRetriever(factors=8, iterations=5, num_threads=1).fit(data)
    source = load_source(export_source(retriever, tmp_path / "bpr"))
    query, seen = query_of(data, int(data.events["user_id"].iloc[0]))
    anonymous = UserQuery(None, query.history, query.history_ts, {}, query.now_s)
    got = source.candidates(anonymous, K, exclude=seen)
    cold_items, cold_scores = offline(retriever, COLD_USER, K + len(seen))
    keep = ~np.isin(cold_items, seen)
    assert_same_answer(got, (cold_items[keep][:K], cold_scores[keep][:K]), exact=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ALSRetriever(factors=8, iterations=3, num_threads=1, half_life_days=1.0),
        lambda: EASERetriever(l2=50.0, half_life_days=1.0),
    ],
    ids=["als", "ease"],
)
def test_a_user_whose_events_all_decayed_away_gets_the_fallback(
    make: Callable[[], Retriever], data: RetrievalData, tmp_path: Path
) -> None:
    # Events far older than the half-life weigh 0 in float32: the model learned nothing of
    # the user, whose scores are then all 0. The fallback answers, seen items excluded,
    # offline and at serving alike.
    user = int(data.events["user_id"].iloc[0])
    events = data.events.copy()
    mine = events["user_id"] == user
    events.loc[mine, "ts"] = events.loc[mine, "ts"] - pd.Timedelta(days=400)
    old = RetrievalData(events, data.users, data.items, data.cutoff)
    retriever = make().fit(old)
    source = load_source(export_source(retriever, tmp_path / "source", index="flat"))
    query, seen = query_of(old, user)
    cold_items, cold_scores = offline(retriever, COLD_USER, K + len(seen))
    keep = ~np.isin(cold_items, seen)
    fallback = (cold_items[keep][:K], cold_scores[keep][:K])
    assert_same_answer(offline(retriever, user, K), fallback, exact=True)
    assert_same_answer(source.candidates(query, K, exclude=seen), fallback, exact=True)
    other = int(data.events.loc[~mine, "user_id"].iloc[0])  # a user with recent events
    assert not np.array_equal(offline(retriever, other, K)[0], offline(retriever, COLD_USER, K)[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ALSRetriever(factors=8, iterations=3, num_threads=1),
        lambda: EASERetriever(l2=50.0),
        lambda: EASERetriever(l2=50.0, half_life_days=7.0),
    ],
    ids=["als", "ease", "ease_decayed"],
)
def test_a_history_of_items_without_training_events_gets_the_fallback(
    make: Callable[[], Retriever], data: RetrievalData, tmp_path: Path
) -> None:
    # Catalog items nobody touched before the cutoff: EASE has no row for them and ALS a zero
    # factor. A history of such items alone would score every item 0 (or fold in to the zero
    # vector), a list of arbitrary ties; offline the user is cold, so serving gives the
    # fallback, single and batched. One item the model knows is enough to leave it.
    untouched = data.items["item_id"].to_numpy(np.int64)[:3]
    events = data.events[~data.events["item_id"].isin(untouched)].reset_index(drop=True)
    train = RetrievalData(events, data.users, data.items, data.cutoff)
    retriever = make().fit(train)
    source = load_source(export_source(retriever, tmp_path / "source", index="flat"))
    now_s = int(data.cutoff.timestamp())
    history = untouched[[0, 1, 0]]
    query = UserQuery(None, history, np.full(3, now_s - 3_600, dtype=np.int64), {}, now_s)
    exclude = np.unique(history)
    cold_items, cold_scores = offline(retriever, COLD_USER, K + len(exclude))
    keep = ~np.isin(cold_items, exclude)
    fallback = (cold_items[keep][:K], cold_scores[keep][:K])
    assert_same_answer(source.candidates(query, K, exclude=exclude), fallback, exact=True)
    ids, scores = candidates_matrix(source, [query], K, excludes=[exclude])
    assert_same_answer((ids[0], scores[0]), fallback, exact=True)
    known = int(events["item_id"].iloc[0])
    mixed = UserQuery(None, np.r_[history, known], np.full(4, now_s - 3_600), {}, now_s)
    items, _ = source.candidates(mixed, K, exclude=np.r_[exclude, known])
    assert not np.array_equal(items, fallback[0])


def segment_world(data: RetrievalData) -> tuple[dict[str, str], RetrievalData]:
    """Attributes no user of ``data`` has in that combination (user 0's, another occupation),
    and ``data`` with a user of them added (no events: the fit's tables are ``data``'s)."""
    columns = ["age_bucket", "gender", "occupation", "region"]
    seen = set(map(tuple, data.users[columns].astype(str).to_numpy().tolist()))
    first = data.users.iloc[0]
    for occupation in data.users["occupation"].astype(str).unique():
        attributes = {c: str(first[c]) for c in columns} | {"occupation": occupation}
        if tuple(attributes[c] for c in columns) not in seen:
            break
    else:
        raise AssertionError("every occupation of user 0's other attributes is taken")
    newcomer = pd.DataFrame([{"user_id": COLD_USER, **attributes}]).astype(data.users.dtypes)
    users = pd.concat([data.users, newcomer], ignore_index=True)
    return attributes, RetrievalData(data.events, users, data.items, data.cutoff)


@pytest.mark.parametrize("missing", [None, "region"])
def test_segment_popularity_scores_an_unseen_attribute_combination_as_offline(
    missing: str | None, data: RetrievalData, tmp_path: Path
) -> None:
    # Offline, a user scores the mean of their columns' tables; serving knows more than the
    # combinations of fit-time users, so a new signup's (or one with an attribute missing)
    # gets the offline list, not the global one. Offline: the same fit with that user added.
    attributes, with_newcomer = segment_world(data)
    if missing is not None:
        attributes.pop(missing)
        with_newcomer.users.loc[with_newcomer.users["user_id"] == COLD_USER, missing] = None
    retriever = SegmentPopularityRetriever(half_life_days=(30.0,)).fit(data)
    source = load_source(export_source(retriever, tmp_path / "source"))
    reference = SegmentPopularityRetriever(half_life_days=(30.0,)).fit(with_newcomer)
    for ours, theirs in zip(retriever.segment_tables_, reference.segment_tables_, strict=True):
        np.testing.assert_array_equal(ours, theirs)  # the newcomer changes no table
    empty = np.empty(0, dtype=np.int64)
    query = UserQuery(None, empty, empty, attributes, int(data.cutoff.timestamp()))
    want = offline(reference, COLD_USER, K)
    assert not np.array_equal(want[0], offline(retriever, COLD_USER, K)[0])  # not the global
    assert_same_answer(source.candidates(query, K), want, exact=True)
    exclude = want[0][::3]
    want_items, want_scores = offline(reference, COLD_USER, K + len(exclude))
    keep = ~np.isin(want_items, exclude)
    got = source.candidates(query, K, exclude=exclude)
    assert_same_answer(got, (want_items[keep][:K], want_scores[keep][:K]), exact=True)


def test_segment_popularity_reads_past_a_short_profile_list_in_the_tables(
    data: RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A profile's stored list ends after SEGMENT_TOP_N items; a request that excludes many of
    # them (a heavy user) reads on in the tables, and gets as many items as offline.
    import mlsd.models.retrieval.export as export

    monkeypatch.setattr(export, "SEGMENT_TOP_N", 20)
    retriever = SegmentPopularityRetriever(half_life_days=(30.0,)).fit(data)
    source = load_source(export_source(retriever, tmp_path / "source"))
    for user in sample_users(data, n=10):
        query, seen = query_of(data, user)
        got = source.candidates(query, K, exclude=seen)
        assert_same_answer(got, offline(retriever, user, K), exact=True)


def test_segment_popularity_reads_the_tables_only_when_the_list_runs_short(
    data: RetrievalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many excludes outside a profile's list leave its top k whole: no pass over the catalog.
    import mlsd.serving.sources as sources

    retriever = SegmentPopularityRetriever(half_life_days=(30.0,)).fit(data)
    source = load_source(export_source(retriever, tmp_path / "source"))
    user = sample_users(data, n=1)[0]
    query, _ = query_of(data, user)
    listed = source.candidates(query, len(data.items))[0]  # every catalog item, best first
    not_top = listed[3 * K :]  # excluded, but none of the top 3K
    calls: list[int] = []
    table_top = sources.table_top
    monkeypatch.setattr(
        sources,
        "table_top",
        lambda *a: calls.append(1) or table_top(*a),  # type: ignore[func-returns-value]
    )
    got = source.candidates(query, K, exclude=not_top)
    np.testing.assert_array_equal(got[0], listed[:K])
    assert not calls


def test_segment_popularity_artifact_without_tables_answers_as_before(
    data: RetrievalData, tmp_path: Path
) -> None:
    # Artifacts exported before the tables: each profile's list, the global list otherwise.
    attributes, _ = segment_world(data)
    retriever = SegmentPopularityRetriever(half_life_days=(30.0,)).fit(data)
    path = export_source(retriever, tmp_path / "source")
    with np.load(path / "segments.npz") as npz:
        old = {n: npz[n] for n in ("profile_levels", "top_ids", "top_scores")}
    np.savez(path / "segments.npz", allow_pickle=False, **old)
    source = load_source(path)
    for user in sample_users(data, n=5):
        query, seen = query_of(data, user)
        got = source.candidates(query, K, exclude=seen)
        assert_same_answer(got, offline(retriever, user, K), exact=True)
    empty = np.empty(0, dtype=np.int64)
    query = UserQuery(None, empty, empty, attributes, int(data.cutoff.timestamp()))
    assert_same_answer(source.candidates(query, K), offline(retriever, COLD_USER, K), exact=True)


def test_query_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="one timestamp"):
        UserQuery(1, np.array([1, 2]), np.array([5]), {}, 10)


def test_two_tower_query_encoding_matches_the_training_code(
    data: RetrievalData, tmp_path: Path
) -> None:
    config = TwoTowerConfig(dim=8, history_len=10, max_epochs=1, batch_size=512, val_frac=0.0)
    retriever = TwoTowerRetriever(config, progress=False).fit(data)
    source = load_source(export_source(retriever, tmp_path / "tt"))
    assert isinstance(source, TwoTowerSource)
    for user in sample_users(data, n=5, idle=False):
        query, _ = query_of(data, user)
        for context in (False, True):
            source.request_context = context
            when = pd.Timestamp(query.now_s, unit="s", tz="UTC") if context else None
            want = retriever.encode_users([query.history], [query.attributes], request_ts=when)
            got = source.user_vector(query)
            assert got is not None
            np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)


def test_covisitation_product_is_scipys_to_the_bit() -> None:
    # The request path sums the history's rows with numpy; the offline scores (and so the
    # ranker's inputs) come from scipy's sparse product, which must give the same float32 bits.
    from mlsd.serving.sources import CovisitationSource, RankedItems

    rng = np.random.default_rng(3)
    n = 500
    matrix = sp.random(n, n, density=0.05, format="csr", dtype=np.float32, random_state=4)
    matrix.data = rng.random(matrix.nnz).astype(np.float32) ** 3  # spread the exponents
    source = CovisitationSource(
        np.arange(n, dtype=np.int64) * 7,
        matrix,
        RankedItems(np.arange(n, dtype=np.int64), np.ones(n, dtype=np.float32)),
        last_n=20,
        recency_decay=0.9,
    )
    for _ in range(200):
        cols = np.sort(rng.choice(n, int(rng.integers(1, 21)), replace=False))
        weights = rng.random(len(cols)).astype(np.float32)
        targets, scores = source.history_product(cols, weights)
        history = sp.csr_matrix((weights, cols, [0, len(cols)]), shape=(1, n))
        expected = np.asarray((history @ matrix).toarray(), dtype=np.float32).ravel()
        np.testing.assert_array_equal(targets, np.flatnonzero(matrix[cols].sum(axis=0) != 0))
        assert scores.dtype == np.float32
        np.testing.assert_array_equal(scores.view(np.int32), expected[targets].view(np.int32))


def test_covisitation_batch_recent_weights_are_each_querys() -> None:
    # Repeated items (the newest event counts), ids outside the catalog, empty histories and
    # histories longer than last_n: the batch's CSR rows are the per-query answers.
    from mlsd.serving.sources import CovisitationSource, RankedItems

    rng = np.random.default_rng(5)
    n = 60
    source = CovisitationSource(
        np.arange(n, dtype=np.int64) * 3,
        sp.identity(n, dtype=np.float32, format="csr"),
        RankedItems(np.arange(n, dtype=np.int64), np.ones(n, dtype=np.float32)),
        last_n=8,
        recency_decay=0.7,
    )
    empty = np.empty(0, dtype=np.int64)
    queries = []
    for length in (0, 1, 5, 8, 30, 0, 12, 3):
        history = rng.choice(np.arange(n + 10) * 3 + rng.integers(0, 2), length).astype(np.int64)
        queries.append(UserQuery(None, history, np.arange(length, dtype=np.int64), {}, 0))
    indptr, cols, weights = source.recent_weights_many(queries)
    assert len(indptr) == len(queries) + 1
    assert weights.dtype == np.float32
    for row, query in enumerate(queries):
        want_cols, want_weights = source.recent_weights(query)
        np.testing.assert_array_equal(cols[indptr[row] : indptr[row + 1]], want_cols)
        np.testing.assert_array_equal(weights[indptr[row] : indptr[row + 1]], want_weights)
    assert (np.diff(indptr) <= 8).all()
    assert np.diff(indptr).max() == 8
    none, _, _ = source.recent_weights_many([UserQuery(None, empty, empty, {}, 0)] * 2)
    np.testing.assert_array_equal(none, [0, 0, 0])


def test_covisitation_reads_events_of_one_second_in_the_order_they_came(
    data: RetrievalData, tmp_path: Path
) -> None:
    # Ratings land many to a second (on ML-100K three events in four share a user's second
    # with another). Serving's history runs oldest → newest in the order the events came, so
    # the later row is the newer; the fit must weigh the same items as the newest.
    coarse = data.events.copy()
    coarse["ts"] = coarse["ts"].dt.floor("6h")  # many of each user's events share a second
    tied = RetrievalData(coarse, data.users, data.items, data.cutoff)
    retriever = CovisitationRetriever(last_n=2, recency_decay=0.5, normalize="none").fit(tied)
    source = load_source(export_source(retriever, tmp_path / "source", index="flat"))
    users = sample_users(tied, idle=False)
    assert any(
        query_of(tied, u)[0].history_ts[-1] == query_of(tied, u)[0].history_ts[-2] for u in users
    )
    for user in users:
        query, seen = query_of(tied, user)
        assert_same_answer(
            source.candidates(query, K, exclude=seen), offline(retriever, user, K), exact=True
        )


def test_tied_scores_go_to_the_lower_item_id_in_a_request_and_a_batch() -> None:
    # ALS gives items without training events the same zero vector: at the end of a long
    # list they all tie, and offline lists keep the lowest ids among them.
    ids = np.arange(100, 110, dtype=np.int64)
    vectors = np.zeros((10, 2), np.float32)
    vectors[:, 0] = 1.0
    source = FactorSource(
        FlatIndex().build(ids, vectors),
        np.array([1, 2]),
        np.array([[1, 0], [1, 0]], np.float32),
        RankedItems(ids, np.zeros(10, np.float32)),
    )
    none = np.empty(0, np.int64)
    queries = [UserQuery(user, none, none, {}, 0) for user in (1, 2)]
    excludes = [none, np.arange(500, 507)]  # user 2's search is wider
    assert source.candidates(queries[0], 3, exclude=excludes[0])[0].tolist() == [100, 101, 102]
    batch, _ = candidates_matrix(source, queries, 3, excludes=excludes)
    assert batch.tolist() == [[100, 101, 102], [100, 101, 102]]
