"""The feed's request path on a trained model and a materialized feature store (no mocks)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from mlsd.config import load_feed_config
from mlsd.evaluation.retrieval import load_dataset
from mlsd.features.batch import feature_config_for
from mlsd.features.online import OnlineFeatures
from mlsd.models.ranking.bundle import BUNDLE_JSON
from mlsd.models.ranking.gbdt import LightGBMRanker
from mlsd.models.retrieval.merge import QUOTAS, Fusion, merge_by_segment, merge_candidates
from mlsd.serving.feed import FeedRecommender
from mlsd.serving.feed_model import FeedModel
from mlsd.serving.recommender import RecommendRequest
from mlsd.serving.rerank import FreshnessClock
from mlsd.serving.sources import UserQuery
from mlsd.systems.feed.package import package_model
from tests.feed_world import materialized_world

CONFIG = """
[retrieval]
sources = ["popularity", "covisitation", "als"]
n_bootstrap = 20

[retrieval.merge]
quota_step = 0.25

[retrieval.als]
factors = 16
iterations = 5

[ranking]
rankers = ["logistic", "lightgbm"]
ranker = "lightgbm"  # the trees: what compiling changes
n_candidates = 100
ranker_windows = 1

[ranking.lightgbm]
n_estimators = 40
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(world, model directory, config): trained, packaged, feature store materialized."""
    root = tmp_path_factory.mktemp("feed")
    world, config = materialized_world(root, CONFIG, seed=4)
    model, _ = package_model(world, root / "model", load_feed_config(config), version="v-test")
    return world, model, config


@pytest.fixture(scope="module")
def recommender(served: tuple[Path, Path, Path]) -> FeedRecommender:
    world, model, config = served
    feed = load_feed_config(config)
    features = OnlineFeatures(
        feed.feature_store.repo_path(world), feature_config_for(world, **vars(feed.features))
    )
    return FeedRecommender(FeedModel.load(model), features=features).warm_up()


def _seen(world: Path, user_id: int) -> set[int]:
    events, _, _ = load_dataset(world)
    return set(events.loc[events["user_id"] == user_id, "item_id"].astype(int))


def test_known_user_gets_ranked_unseen_items(
    recommender: FeedRecommender, served: tuple[Path, Path, Path]
) -> None:
    world = served[0]
    user = 7
    result = recommender.recommend(RecommendRequest(user, k=10, explain=True))
    assert result.path == "online"
    assert result.model_version == "v-test"
    assert result.fallbacks == ()
    ids = [r.item_id for r in result.items]
    assert len(ids) == 10
    assert len(set(ids)) == 10
    recent = set(recommender.history(user, 50))
    assert not set(ids) & recent  # the re-ranker removes what the user just saw
    scores = [r.score for r in result.items]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)  # calibrated probabilities
    assert {r.source for r in result.items} <= {"popularity", "covisitation", "als"}
    assert all(r.reasons for r in result.items)
    assert {"features", "retrieval", "merge", "ranking", "rerank", "total"} <= set(result.stage_ms)
    assert _seen(world, user)  # a known user


def test_serving_scores_match_the_offline_ranker(
    recommender: FeedRecommender, served: tuple[Path, Path, Path]
) -> None:
    # Train/serve consistency: the ranker's view of the candidates at serving equals the batch
    # features computed for the same user and time, column by column.
    from mlsd.models.ranking.candidates import (
        SourceLists,
        candidate_columns,
        pair_features,
        ranker_frame,
        request_columns,
    )
    from mlsd.models.retrieval.merge import merge_candidates

    world = served[0]
    model = recommender.model
    bundle = model.ranking
    user = 11
    events, _, _ = load_dataset(world)
    as_of = events["ts"].max() + pd.Timedelta(microseconds=1)
    features = recommender.features
    assert features is not None
    stored = features.user_features(user)
    query = recommender._query(RecommendRequest(user, now=as_of.timestamp()), stored)
    exclude = np.unique(query.history)
    lists = {
        name: source.candidates(query, model.n_candidates, exclude=exclude)
        for name, source in model.sources.items()
    }
    pad = model.n_candidates

    def row(values: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((1, pad), fill, dtype=np.float64 if fill != -1 else np.int64)
        out[0, : len(values)] = values
        return out

    scored = SourceLists(
        {n: row(i, -1) for n, (i, _) in lists.items()},
        {n: row(s, -np.inf) for n, (_, s) in lists.items()},
    )
    merged = merge_candidates(scored.items, model.quotas, pad)
    pairs = candidate_columns([user], merged, scored)
    item_ids = pairs["item_id"]
    batch = features.features_for(stored, item_ids, now=as_of)
    online = request_columns(
        pairs,
        user=batch.user,
        items=batch.items,
        derived=batch.derived,
        extras=model.snapshot.extras(user, item_ids, as_of.timestamp()),
        layout=bundle.layout,
        config=bundle.feature_config,
    )
    offline = pair_features(
        pd.DataFrame(pairs),
        dataset_dir=world,
        train_events=events,
        as_of=as_of,
        config=bundle.feature_config,
        items=load_dataset(world)[2],
    )
    x_online, _ = ranker_frame(online, bundle.layout, bundle.vocabulary, bundle.feature_config)
    x_offline, _ = ranker_frame(offline, bundle.layout, bundle.vocabulary, bundle.feature_config)
    pd.testing.assert_frame_equal(x_online, x_offline, check_dtype=False, atol=1e-4)


def test_the_request_path_scores_the_ranker_frame(
    recommender: FeedRecommender, served: tuple[Path, Path, Path]
) -> None:
    # recommend() scores ranker_inputs' float block without building a DataFrame; the rows it
    # logs (built from that block) and its probabilities must be, to the bit, ranker_frame's
    # and the bundle's on that frame, the training path's functions.
    from mlsd.models.ranking.candidates import (
        SourceLists,
        candidate_columns,
        ranker_frame,
        request_columns,
    )
    from mlsd.models.retrieval.merge import merge_candidates

    model, bundle, features = recommender.model, recommender.model.ranking, recommender.features
    assert features is not None
    logged = FeedRecommender(model, features=features, candidates_sample_rate=1.0)
    now = 1_900_000_123.5
    pad = model.n_candidates

    def row(values: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((1, pad), fill, dtype=np.float64 if fill != -1 else np.int64)
        out[0, : len(values)] = values
        return out

    for user in (11, 12, None):
        request = RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        result = logged.recommend(request)
        assert result.candidates is not None
        stored = features.default_user() if user is None else features.user_features(user)
        query = recommender._query(request, stored)
        exclude = np.union1d(query.history, model.snapshot.seen(user))
        lists = {
            name: source.candidates(query, pad, exclude=exclude)
            for name, source in model.sources.items()
        }
        scored = SourceLists(
            {n: row(i, -1) for n, (i, _) in lists.items()},
            {n: row(s, -np.inf) for n, (_, s) in lists.items()},
        )
        merged = merge_candidates(scored.items, model.quotas, pad)
        pairs = candidate_columns([-1 if user is None else user], merged, scored)
        when = pd.Timestamp(now, unit="s", tz="UTC")
        batch = features.features_for(stored, pairs["item_id"], now=when)
        columns = request_columns(
            pairs,
            user=batch.user,
            items=batch.items,
            derived=batch.derived,
            extras=model.snapshot.extras(user, pairs["item_id"], when.value / 1e9),
            layout=bundle.layout,
            config=bundle.feature_config,
        )
        frame, _ = ranker_frame(columns, bundle.layout, bundle.vocabulary, bundle.feature_config)
        pd.testing.assert_frame_equal(result.candidates.features, frame, check_exact=True)
        np.testing.assert_array_equal(result.candidates.item_ids, pairs["item_id"])
        np.testing.assert_array_equal(result.candidates.scores, bundle.probabilities(frame))


def test_items_seen_before_the_recent_window_are_never_recommended(
    recommender: FeedRecommender, served: tuple[Path, Path, Path]
) -> None:
    # The online store keeps a user's last history_len items; offline evaluation excludes
    # every item seen before its cutoff, so serving must too, or a heavy user is shown what
    # they consumed long ago (and the evaluation never scored such a list).
    world = served[0]
    events, _, _ = load_dataset(world)
    distinct = events.groupby("user_id")["item_id"].nunique()
    heavy = [int(u) for u in distinct[distinct > 50].index]  # more than the recent window
    assert len(heavy) >= 3
    snapshot = recommender.model.snapshot
    for user in heavy:
        assert snapshot.seen(user).tolist() == sorted(_seen(world, user))
    assert len(snapshot.seen(10_000_000)) == 0
    assert len(snapshot.seen(None)) == 0
    now = 1_900_000_000.0
    forgetful = FeedRecommender(
        dataclasses.replace(
            recommender.model,
            snapshot=dataclasses.replace(
                snapshot, seen_indptr=np.zeros(1, np.int64), seen_items=np.zeros(0, np.int64)
            ),
        ),
        features=recommender.features,
    )
    shown_again = 0
    for user, (batch_items, _) in zip(
        heavy, recommender.recommend_many(heavy, k=60, now=now), strict=True
    ):
        request = RecommendRequest(user, k=60, now=now, allow_precomputed=False)
        online = [r.item_id for r in recommender.recommend(request).items]
        assert not set(online) & _seen(world, user), user
        assert not set(batch_items.tolist()) & _seen(world, user), user
        shown_again += len(
            {r.item_id for r in forgetful.recommend(request).items} & _seen(world, user)
        )
    assert shown_again > 0  # the recent items alone would let older ones back in


def test_snapshot_lookups_by_table_are_the_binary_searches(
    recommender: FeedRecommender,
) -> None:
    snapshot = recommender.model.snapshot
    ids = snapshot.item_ids
    probe = np.concatenate([ids[::7], [ids.max() + 1, ids.max() + 10**6, -5], ids[:3] + 1])
    extras = snapshot.extras(3, probe, 1.8e9)
    users = snapshot._lookup(probe, ids, snapshot.item_users_all, 0.0)
    created = snapshot._lookup(probe, ids, snapshot.item_created_days_ref, np.nan)
    np.testing.assert_array_equal(extras["item_users_all"], users)
    np.testing.assert_array_equal(
        extras["item_created_days"],
        np.where(np.isnan(created), -1.0, (1.8e9 - created) / 86_400),
    )


def test_batch_path_answers_what_the_online_path_answers(recommender: FeedRecommender) -> None:
    # Batch prediction runs every stage over many users at once (one store read, one index
    # search, one ranker call); each user's list must be the one a request at that time gets.
    now = 1_900_000_000.0
    users = [3, 4, 5, 11, 12, 40, 10_000_000]  # warm users and one the store does not know
    batch = recommender.recommend_many(users, k=10, now=now)
    assert len(batch) == len(users)
    for user, (items, scores) in zip(users, batch, strict=True):
        online = recommender.recommend(
            RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        )
        assert online.path == "online"
        assert not online.fallbacks
        assert items.tolist() == [r.item_id for r in online.items], user
        np.testing.assert_allclose(scores, [r.score for r in online.items], rtol=1e-6)
    assert recommender.recommend_many([], k=10) == []


def test_the_ranker_orders_the_list_and_the_calibrator_only_labels_it(
    recommender: FeedRecommender,
) -> None:
    # Offline evaluation orders candidates by the ranker's own scores. An isotonic calibrator
    # is a step function whose probabilities tie where the scores do not; ordering by them
    # would serve the ties in merge order, a list the evaluation never scored. With a
    # calibrator that maps every score to one probability, both paths must serve the same
    # items as with the real one, labelled with that probability.
    from mlsd.models.ranking.calibration import Calibrator

    flat = Calibrator.from_dict(
        {"method": "isotonic", "x_thresholds": [-1e9, 1e9], "y_thresholds": [0.25, 0.25]}
    )
    model = recommender.model
    tied = FeedRecommender(
        dataclasses.replace(model, ranking=dataclasses.replace(model.ranking, calibrator=flat)),
        features=recommender.features,
    )
    now = 1_900_000_000.0
    users = [3, 4, 11, 40]
    batch = tied.recommend_many(users, k=10, now=now)
    for user, (items, scores) in zip(users, batch, strict=True):
        request = RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        expected = [r.item_id for r in recommender.recommend(request).items]
        served = tied.recommend(request)
        assert [r.item_id for r in served.items] == expected, user
        assert [r.score for r in served.items] == [0.25] * 10
        assert items.tolist() == expected, user
        np.testing.assert_array_equal(scores, 0.25)


def test_batch_rows_are_each_requests_rows_to_the_bit(recommender: FeedRecommender) -> None:
    # prepare_many builds the ranker rows of many users as one float block (user features
    # repeated per candidate only where read); each user's rows must be, to the bit, those a
    # request at that time scores and logs, and rank_many must score the block as the bundle
    # scores its DataFrame.
    from mlsd.serving.rerank import PAD_ID

    model, bundle, features = recommender.model, recommender.model.ranking, recommender.features
    logged = FeedRecommender(model, features=features, candidates_sample_rate=1.0)
    now = 1_900_000_000  # whole seconds: the batch runs at one int time
    users = [3, 4, 5, 11, 12, 40, 10_000_000]
    batch = recommender.prepare_many(users, now=now)
    assert batch.features.flags.c_contiguous
    assert batch.features.shape == (
        int((batch.candidates != PAD_ID).sum()),
        len(batch.schema.columns),
    )
    owner = np.nonzero(batch.candidates != PAD_ID)[0]
    frame = batch.frame
    for row, user in enumerate(users):
        request = RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        result = logged.recommend(request)
        assert result.candidates is not None, user
        mine = batch.candidates[row][batch.candidates[row] != PAD_ID]
        np.testing.assert_array_equal(mine, result.candidates.item_ids)
        pd.testing.assert_frame_equal(
            frame[owner == row].reset_index(drop=True), result.candidates.features, check_exact=True
        )
    np.testing.assert_array_equal(
        bundle.calibrated(bundle.scores_matrix(batch.features, batch.schema)),
        bundle.probabilities(frame),
    )


def test_anonymous_and_unknown_users_get_an_answer(recommender: FeedRecommender) -> None:
    anonymous = recommender.recommend(RecommendRequest(None, k=5, recent_items=[3, 4]))
    assert len(anonymous.items) == 5
    assert not {3, 4} & {r.item_id for r in anonymous.items}
    unknown = recommender.recommend(RecommendRequest(10_000_000, k=5))
    assert len(unknown.items) == 5
    assert unknown.path == "online"


def test_feedback_moves_into_the_history(recommender: FeedRecommender) -> None:
    user = 21
    item = 99
    accepted = recommender.record_events(
        [{"user_id": user, "item_id": item, "event": "click", "value": 1.0, "ts": time.time()}]
    )  # now: after the world's events (a future event would be refused)
    assert accepted == 1
    assert recommender.history(user, 5)[0] == item
    ids = [r.item_id for r in recommender.recommend(RecommendRequest(user, k=10)).items]
    assert item not in ids


def test_a_broken_source_degrades_instead_of_failing(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    model = FeedModel.load(served[1])

    class Broken:
        name = "als"

        def candidates(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
            raise RuntimeError("index shard down")

    model.sources["als"] = Broken()
    degraded = FeedRecommender(model, features=recommender.features)
    result = degraded.recommend(RecommendRequest(7, k=10))
    assert result.path == "online"
    assert "source:als" in result.fallbacks
    assert len(result.items) == 10


def test_a_request_that_waited_past_its_budget_degrades(recommender: FeedRecommender) -> None:
    """The wait for a model thread counts in the deadline and shows as the ``queue`` stage."""
    waited = RecommendRequest(7, k=5, allow_precomputed=False, arrived=time.perf_counter() - 1)
    result = recommender.recommend(waited)
    assert result.stage_ms["queue"] >= 1000
    assert "ranker:deadline" in result.fallbacks
    fresh = recommender.recommend(RecommendRequest(7, k=5, allow_precomputed=False))
    assert "queue" not in fresh.stage_ms
    assert "ranker:deadline" not in fresh.fallbacks


def test_readiness_reads_a_failing_store_again_until_it_answers(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    """Readiness was a flag only a request's read set: a store down from the start was
    "ready", and a replica a failed read took out of rotation (so no request came) stayed
    out after the store came back."""
    down = {"now": True}
    assert recommender.features is not None
    real = recommender.features.user_features

    def user_features(user_id: int) -> dict[str, np.ndarray]:
        if down["now"]:
            raise ConnectionError("feature store down")
        return real(user_id)

    features = mock.Mock(wraps=recommender.features, user_features=user_features)
    fresh = FeedRecommender(FeedModel.load(served[1]), features=features)
    clock = [1000.0]
    with mock.patch("mlsd.serving.feed.time.monotonic", side_effect=lambda: clock[0]):
        assert not fresh.ready()  # down from the start: not ready, before any request
        down["now"] = False
        assert not fresh.ready()  # read again only after READY_PROBE_S
        clock[0] += 5.0
        assert fresh.ready()  # the store answers: back, with no request
        down["now"] = True
        result = fresh.recommend(RecommendRequest(7, k=5, allow_precomputed=False))
        assert "features" in result.fallbacks
        assert not fresh.ready()  # the request's failed read
        down["now"] = False
        clock[0] += 5.0
        assert fresh.ready()


def test_the_last_fallbacks_keep_the_blocklist_and_the_seen_items_out(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    # When every source comes back empty the answer is the popular items: still never what
    # policy blocks (a legal takedown) nor what the user just consumed.
    from mlsd.serving.precomputed import Precomputed

    model = FeedModel.load(served[1])
    popular = model.sources["popularity"]
    query = UserQuery(None, np.zeros(0, np.int64), np.zeros(0, np.int64), {}, 0)
    top = popular.candidates(query, 8, exclude=np.zeros(0, np.int64))[0].tolist()

    class EmptyOnce:
        """The source's first call (the retrieval stage's) finds nothing; later ones answer."""

        def __init__(self, source: object) -> None:
            self.source, self.calls = source, 0

        def candidates(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
            self.calls += 1
            if self.calls == 1:
                return np.zeros(0, np.int64), np.zeros(0)
            return self.source.candidates(*args, **kwargs)  # type: ignore[attr-defined, no-any-return]

    sources: dict[str, Any] = {name: EmptyOnce(source) for name, source in model.sources.items()}
    blocked = dataclasses.replace(model.rerank, blocklist=frozenset(top[1:3]))
    degraded = FeedRecommender(
        dataclasses.replace(model, sources=sources, rerank=blocked),
        features=recommender.features,
    )
    result = degraded.recommend(RecommendRequest(None, k=5, recent_items=(top[0],)))
    assert result.path == "fallback:popular"
    assert [r.item_id for r in result.items] == top[3:8]
    # A precomputed list skips what the online path would: the blocklist, what the user
    # consumed since the batch, the request's recent items and (the stale fallback) ``seen``.
    listed = Precomputed(
        np.array(top[:8]), np.ones(8, np.float32), degraded.version, 0.0, k=8,
        consumed=np.array([top[4]]),
    )  # fmt: skip
    request = RecommendRequest(7, k=2, recent_items=(top[5],))
    served_list = degraded._served(listed, request, seen=np.array([top[0]]))
    assert served_list is not None
    assert [r.item_id for r in served_list] == [top[3], top[6]]
    # 3 items are left of a list cut at 8: not the model's answer for 4 (the online path's)
    wider = dataclasses.replace(request, k=4)
    assert degraded._served(listed, wider, seen=np.array([top[0]])) is None


@pytest.mark.parametrize("inline", [False, True])
def test_compiled_trees_serve_the_same_answers(
    served: tuple[Path, Path, Path], recommender: FeedRecommender, inline: bool
) -> None:
    model = FeedModel.load(served[1], compile_trees=True, inline_trees=inline)
    trees = [
        ranker.compiled_
        for ranker in (
            model.ranking.ranker,
            *getattr(model.ranking.ranker, "members_", {}).values(),
        )
        if isinstance(ranker, LightGBMRanker)
    ]
    assert trees
    assert all(compiled is not None and compiled.inline is inline for compiled in trees)
    compiled = FeedRecommender(model, features=recommender.features)
    users = [7, 11, 10_000_000]  # warm users and an unknown one
    batch = compiled.recommend_many(users, k=20, now=4.0e9)
    for row, user in enumerate(users):
        request = RecommendRequest(user, k=20, now=4.0e9)
        want, got = recommender.recommend(request), compiled.recommend(request)
        assert got.path == want.path == "online"
        assert [r.item_id for r in got.items] == [r.item_id for r in want.items]
        np.testing.assert_allclose(
            [r.score for r in got.items], [r.score for r in want.items], rtol=0, atol=1e-9
        )
        assert batch[row][0].tolist() == [r.item_id for r in want.items]


def test_a_ranker_that_cannot_compile_serves_uncompiled(
    served: tuple[Path, Path, Path],
    recommender: FeedRecommender,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import lleaves

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise ValueError("compiled trees differ from LightGBM by 1 (probe row 0)")

    with mock.patch.object(lleaves.Model, "compile", refuse), caplog.at_level("WARNING"):
        model = FeedModel.load(served[1], compile_trees=True)
    assert "ranker not compiled, LightGBM scores it" in caplog.text
    assert "probe row 0" in caplog.text
    result = FeedRecommender(model, features=recommender.features).recommend(
        RecommendRequest(7, k=5)
    )
    assert result.path == "online"
    assert len(result.items) == 5


def test_a_corrupt_model_directory_is_a_clear_error(
    served: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"model\.json"):
        FeedModel.load(tmp_path)
    broken = tmp_path / "model"
    import shutil

    shutil.copytree(served[1], broken)
    (broken / "snapshot.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="snapshot"):
        FeedModel.load(broken)


@pytest.mark.integration
def test_batch_predictions_are_served_as_the_precomputed_path(
    recommender: FeedRecommender, redis_server: str
) -> None:

    from mlsd.serving.batch import batch_predict
    from mlsd.serving.precomputed import PrecomputedStore

    store = PrecomputedStore.from_url(f"redis://{redis_server}/0", prefix="test:feed")
    written, rate = batch_predict(recommender, store, [3, 4, 5], k=10)
    assert written == 3
    assert rate > 0
    online = recommender.recommend(RecommendRequest(4, k=10, allow_precomputed=False))
    served = FeedRecommender(recommender.model, features=recommender.features, precomputed=store)
    hit = served.recommend(RecommendRequest(4, k=10))
    assert hit.path == "precomputed"
    assert [r.item_id for r in hit.items] == [r.item_id for r in online.items]
    # each item keeps the candidate source the online answer names (the log's source column)
    assert [r.source for r in hit.items] == [r.source for r in online.items]
    assert {r.source for r in hit.items} <= set(recommender.model.sources)
    assert served.recommend(RecommendRequest(4, k=10, allow_precomputed=False)).path == "online"
    miss = served.recommend(RecommendRequest(6, k=10))  # no list for this user
    assert miss.path == "online"
    # On the event loop: the same list, and None wherever the thread path must answer.
    fast = asyncio.run(served.recommend_fast(RecommendRequest(4, k=10)))
    assert fast is not None
    assert fast.path == "precomputed"
    assert [(r.item_id, r.score) for r in fast.items] == [(r.item_id, r.score) for r in hit.items]
    for declined in (RecommendRequest(4, k=10, allow_precomputed=False), RecommendRequest(6)):
        assert asyncio.run(served.recommend_fast(declined)) is None
    assert asyncio.run(recommender.recommend_fast(RecommendRequest(4, k=10))) is None  # no store


@pytest.mark.integration
def test_a_precomputed_list_answers_only_as_the_online_path_would(
    recommender: FeedRecommender, redis_server: str
) -> None:
    """Not for more items than the batch kept, nor with explanations, nor for a moment before
    the batch; and never with an item the user consumed after it or names in the request."""
    from mlsd.serving.batch import batch_predict
    from mlsd.serving.precomputed import PrecomputedStore

    store = PrecomputedStore.from_url(f"redis://{redis_server}/0", prefix="test:feed:since")
    user, now = 37, time.time()
    batch_predict(recommender, store, [user], k=10, now=now)
    listed = store.lookup(user, model_version=recommender.version).result
    assert listed is not None
    assert listed.k == 10
    ids = listed.item_ids.tolist()
    served = FeedRecommender(recommender.model, features=recommender.features, precomputed=store)

    def both(request: RecommendRequest) -> tuple[str, list[int]]:
        thread = served.recommend(request)
        fast = asyncio.run(served.recommend_fast(request))
        if thread.path == "precomputed":
            assert fast is not None
            assert [r.item_id for r in fast.items] == [r.item_id for r in thread.items]
        else:
            assert fast is None
        return thread.path, [r.item_id for r in thread.items]

    assert both(RecommendRequest(user, k=5)) == ("precomputed", ids[:5])
    assert both(RecommendRequest(user, k=20))[0] == "online"  # the batch kept 10
    assert both(RecommendRequest(user, k=5, explain=True))[0] == "online"  # reasons
    assert both(RecommendRequest(user, k=5, now=now - 86_400))[0] == "online"  # before it
    assert both(RecommendRequest(user, k=5, recent_items=(ids[1],))) == (
        "precomputed", [ids[0], *ids[2:6]]
    )  # fmt: skip
    # the user clicks the top item after the batch: no path serves it again
    assert served.record_events([{"user_id": user, "item_id": ids[0], "event": "click"}]) == 1
    assert both(RecommendRequest(user, k=5)) == ("precomputed", ids[1:6])
    assert both(RecommendRequest(user, k=10))[0] == "online"  # 9 left of a list of 10
    assert ids[0] not in both(RecommendRequest(user, k=10))[1]


@pytest.mark.integration
def test_batch_predict_writes_what_each_request_answers(
    recommender: FeedRecommender, redis_server: str
) -> None:
    # Chunks of 2, three worker threads taking chunks end to end at once: each stored list is
    # the online answer at the batch's time, whichever thread wrote it.
    import redis

    from mlsd.serving.batch import batch_predict
    from mlsd.serving.precomputed import PrecomputedStore

    host, port = redis_server.split(":")
    store = PrecomputedStore(redis.Redis(host=host, port=int(port)), prefix="test:feed:chunks")
    users = [3, 4, 5, 11, 12, 40, 10_000_000]
    now = 1_900_000_000.0
    written, _ = batch_predict(recommender, store, users, k=10, chunk=2, workers=3, now=now)
    assert written == len(users)
    found = store.lookup_many(users, model_version=recommender.version, now=now)
    for user, hit in zip(users, found, strict=True):
        assert hit.result is not None, user
        assert (hit.result.computed_at, hit.result.k) == (now, 10)  # as of the batch's time
        online = recommender.recommend(
            RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        )
        assert hit.result.item_ids.tolist() == [r.item_id for r in online.items], user
        np.testing.assert_allclose(hit.result.scores, [r.score for r in online.items], rtol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        batch_predict(recommender, store, users, k=10, chunk=0)
    with pytest.raises(ValueError, match="workers"):
        batch_predict(recommender, store, users, k=10, workers=0)


@pytest.mark.integration
def test_batch_predict_processes_write_what_each_request_answers(
    recommender: FeedRecommender, redis_server: str
) -> None:
    # Two children forked from the loaded model, each on its own SQLite connection and Redis
    # connection: every stored list is the online answer, and the parent still reads after.
    import redis

    from mlsd.serving.batch import batch_predict_processes
    from mlsd.serving.precomputed import PrecomputedStore
    from mlsd.serving.process import free_port

    host, port = redis_server.split(":")
    client = redis.Redis(host=host, port=int(port))
    store = PrecomputedStore(client, prefix="test:feed:forked")
    users = [3, 4, 5, 11, 12, 40, 10_000_000]
    now = 1_900_000_000.0
    recommender.recommend(RecommendRequest(3, k=10, now=now, allow_precomputed=False))
    written, rate = batch_predict_processes(
        recommender, store, users, k=10, processes=2, chunk=2, now=now
    )
    assert written == len(users)
    assert rate > 0
    found = store.lookup_many(users, model_version=recommender.version, now=now)
    for user, hit in zip(users, found, strict=True):
        assert hit.result is not None, user
        online = recommender.recommend(
            RecommendRequest(user, k=10, now=now, allow_precomputed=False)
        )
        assert online.path == "online"
        assert hit.result.item_ids.tolist() == [r.item_id for r in online.items], user
        np.testing.assert_allclose(hit.result.scores, [r.score for r in online.items], rtol=1e-6)
    # A child that fails (here: no Redis to write to) fails the call, naming the worker.
    nowhere = PrecomputedStore(redis.Redis(host=host, port=free_port()), prefix="test:feed:x")
    with pytest.raises(RuntimeError, match=r"batch worker \d/2 .* exited with code 1"):
        batch_predict_processes(recommender, nowhere, users, k=10, processes=2, now=now)
    with pytest.raises(ValueError, match="processes"):
        batch_predict_processes(recommender, store, users, k=10, processes=0)


def test_the_models_fusion_merges_requests_and_batches(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    model = FeedModel.load(served[1])
    assert model.fusion == model.ranking.fusion  # the bundle's: the ranker learned from it
    fusion = Fusion("rrf", rank_constant=5.0)
    quotas, cold_quotas = {"covisitation": 0.5, "als": 0.5}, {"als": 1.0}
    fused = dataclasses.replace(model, quotas=quotas, cold_quotas=cold_quotas, fusion=fusion)
    rng = np.random.default_rng(0)
    n = model.n_candidates
    lists = {
        name: np.stack([rng.permutation(3 * n)[:n] for _ in range(3)]).astype(np.int64)
        for name in ("covisitation", "als")
    }
    history = np.array([1, 2], dtype=np.int64)
    queries = [
        UserQuery(u, h, np.zeros(len(h), np.int64), {}, 0)
        for u, h in ((1, history), (2, history[:0]), (3, history))
    ]
    one = fused.merge({k: v[:1] for k, v in lists.items()}, queries[:1])
    expected = merge_candidates({k: v[:1] for k, v in lists.items()}, quotas, n, fusion=fusion)
    np.testing.assert_array_equal(one.item_ids, expected.item_ids)
    batch = fused.merge(lists, queries)  # the user without history: the cold weights
    cold = np.array([False, True, False])
    np.testing.assert_array_equal(
        batch.item_ids,
        merge_by_segment(
            lists, quotas, n, cold=cold, cold_quotas=cold_quotas, fusion=fusion
        ).item_ids,
    )
    quota_merge = dataclasses.replace(fused, fusion=QUOTAS).merge(lists, queries)
    assert not np.array_equal(batch.item_ids[0], quota_merge.item_ids[0])
    # Served end to end, a request and a batch of one give the same answer.
    split = FeedRecommender(fused, features=recommender.features)
    answer = split.recommend(RecommendRequest(7, k=20, now=4.0e9))
    assert split.recommend_many([7], k=20, now=4.0e9)[0][0].tolist() == [
        r.item_id for r in answer.items
    ]


def test_a_user_without_history_is_merged_with_the_cold_quotas(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    model = FeedModel.load(served[1])
    meta = json.loads((served[1] / "ranking" / BUNDLE_JSON).read_text())
    assert model.quotas == meta["quotas"]
    assert model.cold_quotas == meta["cold_quotas"]  # what training tuned (or None)
    cold = dataclasses.replace(model, quotas={"covisitation": 1.0}, cold_quotas={"als": 1.0})
    split = FeedRecommender(cold, features=recommender.features)
    unknown, warm = 10_000_000, 7
    answers = {
        user: split.recommend(RecommendRequest(user, k=20, now=4.0e9)) for user in (unknown, warm)
    }
    # No history: every source answers with its fallback, and the cold quotas give ALS's.
    assert {r.source for r in answers[unknown].items} == {"als"}
    assert "covisitation" in {r.source for r in answers[warm].items}
    # Batch prediction merges each user with the quotas a request would use.
    batch = split.recommend_many([unknown, warm], k=20, now=4.0e9)
    for row, user in enumerate((unknown, warm)):
        assert batch[row][0].tolist() == [r.item_id for r in answers[user].items]


def test_freshness_boost_counts_age_from_the_catalog_creation_time(
    served: tuple[Path, Path, Path], recommender: FeedRecommender
) -> None:
    # An item the catalog created a moment ago is brand new whatever its first event says:
    # the "created" clock boosts it to the top; the "first_event" clock ignores the catalog.
    model = FeedModel.load(served[1])
    now = float(int(time.time()))  # batch prediction's clock is in whole seconds
    user = 7
    plain = [r.item_id for r in recommender.recommend(RecommendRequest(user, k=10, now=now)).items]
    new_item = plain[-1]
    snapshot = model.snapshot
    created = np.full(len(snapshot.item_ids), np.nan)
    created[np.searchsorted(snapshot.item_ids, new_item)] = now
    snapshot = dataclasses.replace(snapshot, item_created_days_ref=created)

    def answer(clock: FreshnessClock) -> tuple[list[int], list[int]]:
        rerank = dataclasses.replace(model.rerank, freshness_weight=1.0, freshness_clock=clock)
        served_model = dataclasses.replace(model, rerank=rerank, snapshot=snapshot)
        serving = FeedRecommender(served_model, features=recommender.features)
        online = serving.recommend(RecommendRequest(user, k=10, now=now))
        assert online.path == "online"
        assert online.fallbacks == ()
        ((batch, _),) = serving.recommend_many([user], k=10, now=now)
        return [r.item_id for r in online.items], batch.tolist()

    online, batch = answer("created")
    assert online[0] == new_item != plain[0]
    assert batch == online  # batch prediction reads the same clock
    online, batch = answer("first_event")
    assert online[0] != new_item  # the world's first events are far older than a half-life
    assert batch == online
