"""PopularRecommender: popularity by distinct users, seen items excluded, feedback remembered."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.serving.popular import PopularRecommender, RecentItems
from mlsd.serving.recommender import BadRequestError, Recommender, RecommendRequest


@pytest.fixture(scope="module")
def contract_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("popular") / "synthetic"
    synthesize(WorldConfig(n_users=200, n_items=100, n_events=10_000, days=10), out, progress=False)
    return out


@pytest.fixture(scope="module")
def events(contract_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(contract_dir / "events.parquet")


@pytest.fixture(scope="module")
def model(contract_dir: Path) -> PopularRecommender:
    return PopularRecommender.from_dataset(contract_dir)


def _top(model: PopularRecommender, user_id: int | None, k: int = 10, **kw: object) -> list[int]:
    result = model.recommend(RecommendRequest(user_id, k, **kw))  # type: ignore[arg-type]
    return [r.item_id for r in result.items]


def test_is_a_recommender_and_always_ready(model: PopularRecommender) -> None:
    assert isinstance(model, Recommender)
    assert model.ready()
    assert model.version.startswith("popular:")


def test_ranks_by_distinct_users(model: PopularRecommender, events: pd.DataFrame) -> None:
    users_per_item = events.groupby("item_id")["user_id"].nunique()
    result = model.recommend(RecommendRequest(user_id=None, k=20))
    scores = [r.score for r in result.items]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == users_per_item.max()
    for rec in result.items:
        assert rec.score == users_per_item[rec.item_id]
        assert rec.source == "popular"
    assert result.path == "fallback:popular"
    assert result.fallbacks == ()
    assert result.stage_ms["popular"] >= 0


def test_window_counts_only_the_last_days(contract_dir: Path, events: pd.DataFrame) -> None:
    recent = events[events["ts"] >= events["ts"].max() - pd.Timedelta(days=2)]
    expected = recent.groupby("item_id")["user_id"].nunique()
    model = PopularRecommender.from_dataset(contract_dir, days=2)
    result = model.recommend(RecommendRequest(user_id=None, k=10, explain=True))
    assert [r.score for r in result.items] == sorted(expected, reverse=True)[:10]
    assert "last 2 days" in result.items[0].reasons[0]


def test_event_types_filter(contract_dir: Path, events: pd.DataFrame) -> None:
    clicks = events[events["event"] == "click"]
    model = PopularRecommender.from_dataset(contract_dir, event_types=["click"])
    result = model.recommend(RecommendRequest(user_id=None, k=1))
    assert result.items[0].score == clicks.groupby("item_id")["user_id"].nunique().max()


def test_excludes_seen_items(model: PopularRecommender, events: pd.DataFrame) -> None:
    for user_id in events["user_id"].unique()[:20]:
        seen = set(events.loc[events["user_id"] == user_id, "item_id"])
        top = _top(model, int(user_id), k=20)
        assert not seen & set(top)
        assert len(top) == min(20, events["item_id"].nunique() - len(seen))


def test_unknown_user_gets_the_overall_top(model: PopularRecommender) -> None:
    assert _top(model, 10**12) == _top(model, None)


def test_recent_items_are_excluded(model: PopularRecommender) -> None:
    overall = _top(model, None, k=5)
    assert not set(overall[:2]) & set(_top(model, None, k=5, recent_items=overall[:2]))


def test_the_blocklist_holds_for_every_user(contract_dir: Path, model: PopularRecommender) -> None:
    """The service's fallback answers when the model fails: a takedown must hold there too."""
    overall = _top(model, None, k=6)
    blocked = PopularRecommender.from_dataset(contract_dir, blocklist=overall[1:3])
    assert _top(blocked, None, k=4) == [overall[0], *overall[3:6]]
    assert not set(overall[1:3]) & set(_top(blocked, 7, k=20))


def test_explain_adds_reasons_only_when_asked(model: PopularRecommender) -> None:
    plain = model.recommend(RecommendRequest(user_id=None, k=3))
    explained = model.recommend(RecommendRequest(user_id=None, k=3, explain=True))
    assert all(r.reasons == () for r in plain.items)
    assert all("users interacted" in r.reasons[0] for r in explained.items)


def test_k_below_one_is_a_value_error(model: PopularRecommender) -> None:
    with pytest.raises(BadRequestError, match="k must be at least 1"):
        model.recommend(RecommendRequest(user_id=None, k=0))


def test_history_is_newest_first(model: PopularRecommender, events: pd.DataFrame) -> None:
    user_id = int(events["user_id"].iloc[0])
    mine = events[events["user_id"] == user_id].sort_values("ts", ascending=False)
    expected = list(dict.fromkeys(mine["item_id"].tolist()))[:5]
    assert model.history(user_id, 5) == expected
    assert model.history(10**12) == []


def test_feedback_reaches_history_and_recommendations(contract_dir: Path) -> None:
    model = PopularRecommender.from_dataset(contract_dir)
    user_id = 10**9  # unknown: gets the overall top
    first, second = _top(model, user_id, k=2)
    accepted = model.record_events(
        [
            {"user_id": user_id, "item_id": second, "event": "click", "ts": 2.0},
            {"user_id": user_id, "item_id": first, "event": "click", "ts": 1.0},
            {"user_id": "x", "item_id": 1, "event": "click"},  # not an id: not accepted
        ]
    )
    assert accepted == 2
    assert model.history(user_id) == [second, first]  # ordered by ts, newest first
    assert not {first, second} & set(_top(model, user_id, k=10))


def test_recent_items_are_bounded() -> None:
    recent = RecentItems(max_users=2, max_items=3)
    for item in range(5):
        recent.add(1, item)
    assert recent.get(1) == [4, 3, 2]  # the newest max_items
    recent.add(2, 7)
    recent.add(3, 8)  # user 1 was least recently active: forgotten
    assert recent.get(1) == []
    assert recent.get(2) == [7]
    recent.add(2, 9)
    assert recent.get(2) == [9, 7]


def test_sample_users_have_history(model: PopularRecommender) -> None:
    users = model.sample_users(5)
    assert len(users) == 5
    assert all(model.history(u) for u in users)
