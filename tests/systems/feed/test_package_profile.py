"""The reference profile replays requests through the packaged model: its rows are what the
service computes for a request, at the moments users open the feed (session starts)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.config import load_feed_config
from mlsd.evaluation.retrieval import load_dataset
from mlsd.features.batch import feature_config_for
from mlsd.features.online import OnlineFeatures
from mlsd.monitoring.profile import ReferenceProfile
from mlsd.serving.feed import FeedRecommender
from mlsd.serving.feed_model import REFERENCE_PROFILE, FeedModel
from mlsd.serving.recommender import RecommendRequest
from mlsd.systems.feed.package import request_moments, served_rows
from tests.serving.test_feed import served

__all__ = ["served"]  # the module fixture: a trained, packaged model on a synthetic world

Served = tuple[Path, Path, Path]


def test_replayed_rows_equal_what_the_service_computes(served: Served) -> None:
    """Offline replay and the online path agree feature by feature when the store is current:
    the train/serve parity the profile rests on."""
    world, model_dir, config = served
    feed = load_feed_config(config)
    features = OnlineFeatures(
        feed.feature_store.repo_path(world), feature_config_for(world, **vars(feed.features))
    )
    model = FeedModel.load(model_dir)
    service = FeedRecommender(model, features=features, candidates_sample_rate=1.0).warm_up()
    events, _, _ = load_dataset(world)
    now = events["ts"].max().ceil("s") + pd.Timedelta(seconds=1)  # the store holds everything
    users = events["user_id"].drop_duplicates().sample(5, random_state=0).astype(int).tolist()
    moments = pd.DataFrame({"user_id": users, "ts": [now] * len(users)})
    offline, times = served_rows(model, world, moments)
    assert (times == now.value // 1_000).all()
    start = 0
    for user in users:
        answer = service.recommend(RecommendRequest(user, k=10, now=now.value / 1e9))
        assert answer.candidates is not None
        online = answer.candidates.features
        rows = offline.iloc[start : start + len(online)].reset_index(drop=True)
        start += len(online)
        assert list(rows.columns) == list(online.columns)
        for column in online.columns:
            np.testing.assert_allclose(
                rows[column].to_numpy(np.float64),
                online[column].to_numpy(np.float64),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"user {user}, {column}",
            )
    assert start == len(offline)


def test_the_profile_holds_requests_at_session_starts(served: Served) -> None:
    model_dir = served[1]
    profile = ReferenceProfile.load(model_dir / REFERENCE_PROFILE)
    # A session starts more than session_gap_s (1,800 s) after the user's previous event.
    since = profile.numeric["seconds_since_last_event"]
    assert since.min == -1.0 or since.min > math.log1p(1_800)
    assert all(v == -1.0 or v > math.log1p(1_800) for v in since.sample)
    assert profile.numeric["session_events_now"].max == 0.0  # the previous session has ended
    # The ~390 request moments of this small world are too few for a time PSI (fewer than
    # MIN_TREND_MOMENTS per half): no feature is marked as following the calendar.
    assert math.isnan(profile.numeric["item_age_days"].time_psi)
    assert not profile.numeric["category_affinity"].trending
    assert not profile.numeric["events_7d"].trending


def test_request_moments_are_session_starts_sampled_in_time_order() -> None:
    ts = pd.to_datetime(
        ["2024-01-01 00:00", "2024-01-01 00:10", "2024-01-01 01:00", "2024-01-01 02:00",
         "2024-01-01 00:05", "2024-01-01 03:00"], utc=True,
    )  # fmt: skip
    events = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "ts": ts})
    start = pd.Timestamp("2024-01-01 00:01", tz="UTC")
    moments = request_moments(events, start=start, session_gap_s=1_800, limit=10)
    # user 1: 00:10 is 10 min after 00:00 (same session); 01:00 and 02:00 start sessions;
    # user 2: 00:05 is the first event; 03:00 starts a session. 00:00 is before start.
    assert list(zip(moments["user_id"], moments["ts"].dt.strftime("%H:%M"), strict=True)) == [
        (2, "00:05"), (1, "01:00"), (1, "02:00"), (2, "03:00"),
    ]  # fmt: skip
    assert len(request_moments(events, start=start, session_gap_s=1_800, limit=2)) == 2
    with pytest.raises(KeyError):
        request_moments(events.drop(columns="ts"), start=start, session_gap_s=1, limit=1)
