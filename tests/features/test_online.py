"""The online path: user reads, the item cache, request assembly and pushes of new events."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlsd.data.schema import EVENTS_FILE, ITEMS_FILE, USERS_FILE, ContractError
from mlsd.features import batch, derive
from mlsd.features.definitions import (
    EVENT_TS_ALLOWANCE_S,
    NEVER,
    UNKNOWN,
    FeatureConfig,
    feature_set,
)
from mlsd.features.online import FeatureBatch, OnlineFeatures
from mlsd.features.store import FeatureStoreConfig, apply, generate_repo, materialize, open_store
from mlsd.models.ranking.candidates import FeatureLayout, request_columns

AS_OF = pd.Timestamp("2024-01-15 12:00:00", tz="UTC")
UNKNOWN_ID = 10**9

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("redis", id="redis", marks=pytest.mark.integration),
]


def make_repo(
    request: pytest.FixtureRequest, root: Path, world: Path, config: FeatureConfig, backend: str
) -> Path:
    """A generated, applied repository materialized as of AS_OF (a fresh Feast project)."""
    project = f"t_{uuid.uuid4().hex[:10]}"
    if backend == "redis":
        store = FeatureStoreConfig(
            online_store="redis",
            redis_connection=request.getfixturevalue("redis_server"),
            project=project,
        )
    else:
        store = FeatureStoreConfig(project=project)
    repo = generate_repo(root / "repo", feature_set(config), store)
    apply(repo)
    materialize(world, repo, as_of=AS_OF, config=config)
    return repo


@pytest.fixture(scope="module")
def sqlite_repo(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    world: Path,
    config: FeatureConfig,
) -> Path:
    """Shared by the read-only tests."""
    return make_repo(request, tmp_path_factory.mktemp("sqlite"), world, config, "sqlite")


@pytest.fixture(params=BACKENDS)
def fresh_repo(
    request: pytest.FixtureRequest, tmp_path: Path, world: Path, config: FeatureConfig
) -> Path:
    """A repository of its own, for tests that write."""
    return make_repo(request, tmp_path, world, config, request.param)


def active_user(world: Path, before: pd.Timestamp, after: pd.Timestamp) -> tuple[int, pd.DataFrame]:
    """A user with history before AS_OF and events in [before, after); those events."""
    events = pq.read_table(world / EVENTS_FILE).to_pandas()
    window = events[(events["ts"] >= before) & (events["ts"] < after)]
    history = set(events.loc[events["ts"] < AS_OF, "user_id"])
    counts = window[window["user_id"].isin(history)]["user_id"].value_counts()
    user_id = int(counts.index[0])
    return user_id, window[window["user_id"] == user_id].reset_index(drop=True)


def test_the_request_equals_the_batch_computation(
    sqlite_repo: Path, world: Path, config: FeatureConfig
) -> None:
    """No train/serve skew: what serving assembles is what the batch path computes."""
    online = OnlineFeatures(sqlite_repo, config)
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    item_ids = np.array([3, 1, 4, 1, 5, 9, 26, 53, 58, 97], dtype=np.int64)
    got = online.get_online_features(user_id, item_ids, now=AS_OF)

    user = batch.stored_user_features(
        world, pd.DataFrame({"user_id": [user_id], "ts": AS_OF}), config
    )
    items = batch.stored_item_features(
        world, pd.DataFrame({"item_id": item_ids, "ts": AS_OF}), config
    )
    dynamic = feature_set(config).names("user_dynamic")
    want_user = derive.user_arrays({n: list(user[n]) for n in dynamic}, config, known=[1])
    for name, want in want_user.items():
        np.testing.assert_array_equal(got.user[name], want, err_msg=name)
    for name in config.user_attributes:
        assert got.user[name].tolist() == user[name].tolist()
    for name in [*feature_set(config).names("item"), "category_index", "item_known"]:
        assert got.items[name].tolist() == items[name].tolist(), name
    want_items = derive.item_arrays({n: list(items[n]) for n in items.columns}, item_ids, config)
    want_derived = derive.derive(want_user, want_items, now_s=int(AS_OF.timestamp()), config=config)
    assert got.derived.keys() == want_derived.keys()
    for name, want in want_derived.items():
        np.testing.assert_array_equal(got.derived[name], want, err_msg=name)
    assert got.derived["user_known"].tolist() == [1] * len(item_ids)


def test_unknown_users_and_items_get_defaults(sqlite_repo: Path, config: FeatureConfig) -> None:
    online = OnlineFeatures(sqlite_repo, config)
    item_ids = np.array([-5, UNKNOWN_ID, 3], dtype=np.int64)
    got = online.get_online_features(UNKNOWN_ID, item_ids, now=AS_OF)
    assert got.user["user_known"].tolist() == [0]
    assert got.user["last_event_ts"].tolist() == [NEVER]
    assert got.user["recent_item_ids"].shape == (1, config.history_len)
    assert (got.user["recent_item_ids"] == -1).all()
    assert got.user[f"cat_count_{config.windows_days[0]}d"].shape == (1, len(config.categories))
    for name in config.user_attributes:
        assert got.user[name].tolist() == [UNKNOWN]
    assert got.items["item_known"].tolist() == [0, 0, 1]
    assert got.items["category"].tolist()[:2] == [UNKNOWN, UNKNOWN]
    assert got.items["category_index"].tolist()[:2] == [-1, -1]
    assert got.items["item_first_ts"].tolist()[:2] == [NEVER, NEVER]
    assert got.derived["seconds_since_last_event"].tolist() == [-1.0] * 3
    assert got.derived["item_known"].tolist() == [0, 0, 1]
    empty = online.get_online_features(UNKNOWN_ID, np.zeros(0, dtype=np.int64), now=AS_OF)
    assert empty.matrix(["item_known"]).shape == (0, 1)


def test_the_item_cache_equals_the_store(sqlite_repo: Path, config: FeatureConfig) -> None:
    online = OnlineFeatures(sqlite_repo, config)
    n = online.refresh_item_cache()
    item_ids = pq.read_table(sqlite_repo / "data" / "items.parquet").column("item_id").to_pylist()
    assert n == len(item_ids) > 0
    names = feature_set(config).names("item")
    stored = (
        open_store(sqlite_repo)
        .get_online_features(
            features=[f"item_history:{name}" for name in names], entity_rows={"item_id": item_ids}
        )
        .to_dict()
    )
    got = online.get_online_features(0, np.array(item_ids[::-1]), now=AS_OF)
    for name in names:
        want = np.asarray(stored[name][::-1], dtype=got.items[name].dtype)
        np.testing.assert_array_equal(got.items[name], want, err_msg=name)
    assert got.items["item_known"].sum() == n


def test_the_item_cache_is_refreshed_in_the_background_after_a_materialization(
    request: pytest.FixtureRequest, tmp_path: Path, world: Path, config: FeatureConfig
) -> None:
    repo = make_repo(request, tmp_path, world, config, "sqlite")
    item_ids = np.arange(0, 100, dtype=np.int64)
    unchecked = OnlineFeatures(repo, config, item_cache_check_s=3600.0)  # never looks
    watching = OnlineFeatures(repo, config, item_cache_check_s=0.0)  # looks at every request
    expiring = OnlineFeatures(repo, config, item_cache_ttl_s=0.0, item_cache_check_s=3600.0)
    before = unchecked.get_online_features(0, item_ids, now=AS_OF).items["item_events_30d"]
    for online in (watching, expiring):
        online.get_online_features(0, item_ids, now=AS_OF)
    for _ in range(3):  # nothing changed: the watcher reads nothing again
        watching.get_online_features(0, item_ids, now=AS_OF)
    assert watching._refresher is None
    later = AS_OF + pd.Timedelta(days=3)
    materialize(world, repo, as_of=later, config=config)
    want = batch.stored_item_features(
        world, pd.DataFrame({"item_id": item_ids, "ts": later}), config
    )["item_events_30d"].to_numpy()
    assert not np.array_equal(before, want)
    cached = unchecked.get_online_features(0, item_ids, now=later).items["item_events_30d"]
    np.testing.assert_array_equal(cached, before)  # it did not look at the registry
    # The registry changed (or the ttl passed): a request is served from the old cache while
    # the new one is read in the background.
    for online in (watching, expiring):
        served = online.get_online_features(0, item_ids, now=later).items["item_events_30d"]
        np.testing.assert_array_equal(served, before)
        online.wait_for_refresh(timeout=30)
        refreshed = online.get_online_features(0, item_ids, now=later).items["item_events_30d"]
        np.testing.assert_array_equal(refreshed, want)
    unchecked.refresh_item_cache()  # on demand
    on_demand = unchecked.get_online_features(0, item_ids, now=later).items["item_events_30d"]
    np.testing.assert_array_equal(on_demand, want)


def test_the_matrix_broadcasts_the_user_in_the_given_order() -> None:
    batch_ = FeatureBatch(
        user={"last_event_ts": np.array([7]), "recent_item_ids": np.array([[1, 2]])},
        items={"item_mean_value": np.array([0.5, 1.5, 2.5], dtype=np.float32)},
        derived={"seen_recently": np.array([1, 0, 1]), "category": np.array(["a", "b", "c"])},
        item_ids=np.array([10, 11, 12]),
    )
    got = batch_.matrix(["seen_recently", "last_event_ts", "item_mean_value"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1, 7, 0.5], [0, 7, 1.5], [1, 7, 2.5]])
    assert batch_.matrix(["item_mean_value", "seen_recently"])[:, 0].tolist() == [0.5, 1.5, 2.5]
    for name in ("recent_item_ids", "category", "nope"):
        with pytest.raises(ValueError, match=name):
            batch_.matrix([name])


def test_a_request_matrix_has_one_row_per_candidate(
    sqlite_repo: Path, config: FeatureConfig
) -> None:
    online = OnlineFeatures(sqlite_repo, config)
    got = online.get_online_features(1, np.array([5, 6, 7]), {"session_id": 12}, now=AS_OF)
    names = ["item_events_7d", "events_7d", "category_affinity", "session_id"]
    x = got.matrix(names)
    assert x.shape == (3, 4)
    np.testing.assert_array_equal(x[:, 0], got.items["item_events_7d"])
    np.testing.assert_array_equal(x[:, 1], np.repeat(got.user["events_7d"], 3))
    np.testing.assert_array_equal(x[:, 2], got.derived["category_affinity"])
    assert x[:, 3].tolist() == [12.0] * 3


def test_pushed_events_show_up_in_the_next_read(
    fresh_repo: Path, world: Path, config: FeatureConfig
) -> None:
    online = OnlineFeatures(fresh_repo, config)
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    before = online.get_online_features(user_id, np.array([0]), now=AS_OF).user
    categories = online.get_online_features(user_id, np.arange(100), now=AS_OF).items
    item_id = int(np.flatnonzero(categories["category_index"] >= 0)[-1])
    category = int(categories["category_index"][item_id])
    ts = pd.Timestamp(int(before["last_event_ts"][0]), unit="s", tz="UTC") + pd.Timedelta(hours=2)
    event = pd.DataFrame(
        {"user_id": [user_id], "item_id": [item_id], "ts": [ts], "event": ["click"], "value": [1.0]}
    )
    assert online.push_events(event) == 1

    after = online.get_online_features(user_id, np.array([item_id]), now=ts).user
    assert after["recent_item_ids"][0, 0] == item_id
    np.testing.assert_array_equal(
        after["recent_item_ids"][0, 1:], before["recent_item_ids"][0, :-1]
    )
    assert after["recent_ts"][0, 0] == int(ts.timestamp())
    assert after["last_event_ts"][0] == int(ts.timestamp())
    assert after["session_events"][0] == 1  # two hours later: a new session
    for w in config.windows_days:
        assert after[f"events_{w}d"][0] == before[f"events_{w}d"][0] + 1
        bumped = before[f"cat_count_{w}d"].copy()
        bumped[0, category] += 1
        np.testing.assert_array_equal(after[f"cat_count_{w}d"], bumped)
    derived = online.get_online_features(user_id, np.array([item_id]), now=ts).derived
    assert derived["seen_recently"].tolist() == [1]
    assert derived["session_events_now"].tolist() == [1]

    # A second event in the same session counts on.
    second = event.assign(ts=ts + pd.Timedelta(seconds=30), item_id=item_id - 1)
    online.push_events(second)
    again = online.get_online_features(user_id, np.array([item_id]), now=ts).user
    assert again["recent_item_ids"][0, :2].tolist() == [item_id - 1, item_id]
    assert again["session_events"][0] == 2


def test_pushes_agree_with_the_batch_computation(
    fresh_repo: Path, world: Path, config: FeatureConfig
) -> None:
    """Replaying the log's next hour through pushes gives the batch features an hour later."""
    end = AS_OF + pd.Timedelta(hours=1)
    user_id, events = active_user(world, AS_OF, end)
    online = OnlineFeatures(fresh_repo, config)
    before = online.get_online_features(user_id, np.array([0]), now=AS_OF).user
    half = len(events) // 2
    assert online.push_events(events.iloc[:half]) + online.push_events(events.iloc[half:]) == len(
        events
    )
    got = online.get_online_features(user_id, np.array([0]), now=end).user
    want = batch.stored_user_features(
        world, pd.DataFrame({"user_id": [user_id], "ts": end}), config
    )
    dynamic = feature_set(config).names("user_dynamic")
    want_arrays = derive.user_arrays({n: list(want[n]) for n in dynamic}, config, known=[1])
    for name in ("recent_item_ids", "recent_ts", "last_event_ts", "session_events"):
        np.testing.assert_array_equal(got[name], want_arrays[name], err_msg=name)
    for w in config.windows_days:  # windows only grow until the next materialization
        assert got[f"events_{w}d"][0] == before[f"events_{w}d"][0] + len(events)


def test_one_push_of_many_users_interleaved_gives_each_the_batch_features(
    fresh_repo: Path, world: Path, config: FeatureConfig
) -> None:
    """A push splits its events by user: every user's state is theirs alone, as the batch
    computation has it an hour later, however the users' events interleave in the push."""
    end = AS_OF + pd.Timedelta(hours=1)
    events = pq.read_table(world / EVENTS_FILE).to_pandas()
    window = events[(events["ts"] >= AS_OF) & (events["ts"] < end)]
    history = set(events.loc[events["ts"] < AS_OF, "user_id"])
    users = window.loc[window["user_id"].isin(history), "user_id"].drop_duplicates()[:12]
    pushed = window[window["user_id"].isin(users)].sample(frac=1.0, random_state=0)
    assert pushed["user_id"].nunique() == len(users) > 5
    online = OnlineFeatures(fresh_repo, config)
    assert online.push_events(pushed) == len(pushed)
    want = batch.stored_user_features(
        world, pd.DataFrame({"user_id": users.to_numpy(), "ts": end}), config
    )
    dynamic = feature_set(config).names("user_dynamic")
    for row, user_id in enumerate(users.tolist()):
        got = online.get_online_features(user_id, np.array([0]), now=end).user
        stored = {n: [want[n].iloc[row]] for n in dynamic}
        want_arrays = derive.user_arrays(stored, config, known=[1])
        for name in ("recent_item_ids", "recent_ts", "last_event_ts", "session_events"):
            np.testing.assert_array_equal(got[name], want_arrays[name], err_msg=f"{user_id} {name}")


def test_pushes_of_unknown_users_and_bad_events(
    sqlite_repo: Path, tmp_path: Path, config: FeatureConfig
) -> None:
    online = OnlineFeatures(sqlite_repo, config)
    new_user = UNKNOWN_ID + 1
    ts = AS_OF + pd.Timedelta(minutes=5)
    event = pd.DataFrame(
        {
            "user_id": [new_user],
            "item_id": [UNKNOWN_ID],
            "ts": [ts],
            "event": ["view"],
            "value": [1.0],
        }
    )
    assert online.push_events(event) == 1
    got = online.get_online_features(new_user, np.array([UNKNOWN_ID]), now=ts)
    assert got.user["recent_item_ids"][0, 0] == UNKNOWN_ID
    assert got.user["user_known"].tolist() == [1]
    assert got.user["events_1d"].tolist() == [1.0]
    assert got.user["cat_count_1d"].sum() == 0  # the item's category is unknown
    assert got.items["item_known"].tolist() == [0]
    with pytest.raises(ContractError, match="item_id"):
        online.push_events(event.drop(columns=["item_id"]))
    assert online.push_events(event.iloc[:0]) == 0


def test_another_config_is_refused(sqlite_repo: Path, config: FeatureConfig) -> None:
    other = FeatureConfig(
        history_len=config.history_len,
        windows_days=(1, 2),
        categories=config.categories,
        user_attributes=config.user_attributes,
    )
    with pytest.raises(ContractError, match="windows_days"):
        OnlineFeatures(sqlite_repo, other)


def test_a_config_without_user_attributes_has_no_static_view(
    tmp_path: Path, world: Path, config: FeatureConfig
) -> None:
    bare = FeatureConfig(categories=config.categories, windows_days=(1, 7))
    repo = generate_repo(tmp_path / "repo", feature_set(bare), FeatureStoreConfig())
    apply(repo)
    materialize(world, repo, as_of=AS_OF, config=bare)
    assert {v.name for v in open_store(repo).list_feature_views()} == {
        "user_dynamic",
        "item_history",
    }
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    got = OnlineFeatures(repo, bare).get_online_features(user_id, np.array([1, 2]), now=AS_OF)
    assert got.user["user_known"].tolist() == [1]
    assert "events_30d" not in got.user
    assert got.user["events_7d"][0] > 0


def test_reads_equal_feasts_sdk_read_field_by_field(
    fresh_repo: Path, world: Path, config: FeatureConfig
) -> None:
    # The request path reads through the online store's own online_read; Feast's
    # get_online_features over the same views must give the same values, pushed rows too.
    online = OnlineFeatures(fresh_repo, config)
    user_id, window = active_user(world, AS_OF, AS_OF + pd.Timedelta(days=2))
    online.push_events(window.iloc[:2])
    events = pq.read_table(world / EVENTS_FILE).to_pandas()
    users = [user_id, *events["user_id"].drop_duplicates().head(5).tolist(), UNKNOWN_ID]
    items = [*events["item_id"].drop_duplicates().head(5).tolist(), UNKNOWN_ID]
    store = open_store(fresh_repo)
    features = feature_set(config)
    user_names = {f.name for f in (*features.group("user_static"), *features.group("user_dynamic"))}
    item_names = {f.name for f in features.group("item")}
    for join_key, ids, declared in (("user_id", users, user_names), ("item_id", items, item_names)):
        views = online._user_views if join_key == "user_id" else online._item_views
        refs = [f"{view}:{name}" for view, names in views.items() for name in names]
        expected = store.get_online_features(features=refs, entity_rows={join_key: ids}).to_dict()
        got, written = online._read(views, join_key, ids)
        assert set(got) == declared
        for name in declared:
            assert got[name] == expected[name], name
        for times in written.values():
            assert len(times) == len(ids)
    # The write time a push must beat: the stored row's, as the SDK's response carries it.
    response = store.get_online_features(
        features=["user_dynamic:last_event_ts"], entity_rows={"user_id": [user_id]}
    ).proto
    columns = list(response.metadata.feature_names.val)
    ts = response.results[columns.index("last_event_ts")].event_timestamps[0]
    _, stored = online._read_dynamic([user_id])
    assert stored[0] == pd.Timestamp(ts.seconds * 10**9 + ts.nanos, unit="ns", tz="UTC")
    assert abs(stored[0] - window["ts"].iloc[1]) < pd.Timedelta(seconds=1)  # the push's newest


def test_stored_values_convert_as_feast_converts_them() -> None:
    """The fast path of ``_python`` (plain scalars and lists) and the kinds it hands to Feast
    give what Feast's own conversion gives, type included."""
    from feast.protos.feast.types.Value_pb2 import (
        DoubleList,
        FloatList,
        Int64List,
        Null,
        StringList,
    )
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.type_map import feast_value_type_to_python_type

    from mlsd.features.online import _python

    values = [
        ValueProto(int64_val=7),
        ValueProto(int32_val=-3),
        ValueProto(double_val=0.25),
        ValueProto(float_val=1.5),
        ValueProto(string_val="comedy"),
        ValueProto(bool_val=True),
        ValueProto(bytes_val=b"\x00\x01"),
        ValueProto(int64_list_val=Int64List(val=[3, 1, 2])),
        ValueProto(double_list_val=DoubleList(val=[0.5])),
        ValueProto(float_list_val=FloatList(val=[])),
        ValueProto(string_list_val=StringList(val=["a", "b"])),
        ValueProto(unix_timestamp_val=1_700_000_000),
        ValueProto(null_val=Null.NULL),
        ValueProto(),
    ]
    for value in values:
        expected = feast_value_type_to_python_type(value)
        got = _python(value)
        assert got == expected, value
        assert type(got) is type(expected), value
    assert _python(None) is None


def _log_with(world: Path, root: Path, pushed: pd.DataFrame) -> Path:
    """A contract directory: the log before AS_OF (what the store was materialized from)
    plus ``pushed``, without the duplicate rows validation quarantines."""
    events = pq.read_table(world / EVENTS_FILE).to_pandas()
    events = events.loc[events["ts"] < AS_OF, ["user_id", "item_id", "ts", "event", "value"]]
    pushed = pushed.assign(ts=pd.to_datetime(pushed["ts"], utc=True))[list(events.columns)]
    log = pd.concat([events, pushed.astype(events.dtypes.to_dict())], ignore_index=True)
    log = log.drop_duplicates(["user_id", "item_id", "ts", "event"])
    root.mkdir(parents=True)
    log.to_parquet(root / EVENTS_FILE, index=False)
    for name in (USERS_FILE, ITEMS_FILE):
        shutil.copy(world / name, root / name)
    return root


def _assert_as_batch(
    online: OnlineFeatures, log: Path, user_id: int, at: pd.Timestamp, config: FeatureConfig
) -> None:
    """The user's online dynamic features equal the batch computation of ``log`` at ``at``."""
    got = online.user_features(user_id)
    want = batch.stored_user_features(log, pd.DataFrame({"user_id": [user_id], "ts": at}), config)
    dynamic = feature_set(config).names("user_dynamic")
    want_arrays = derive.user_arrays({n: list(want[n]) for n in dynamic}, config, known=[1])
    names = ["recent_item_ids", "recent_ts", "last_event_ts", "session_events"]
    names += [f"{kind}_{w}d" for w in config.windows_days for kind in ("events", "cat_count")]
    for name in names:
        np.testing.assert_allclose(got[name], want_arrays[name], err_msg=name)


def _event(user_id: int, item_id: int, ts: pd.Timestamp, event: str = "click") -> pd.DataFrame:
    return pd.DataFrame(
        {"user_id": [user_id], "item_id": [item_id], "ts": [ts], "event": [event], "value": [1.0]}
    )


@pytest.mark.parametrize(
    ("backend", "replicas"),
    [
        pytest.param("sqlite", 1, id="sqlite"),
        pytest.param("redis", 1, id="redis", marks=pytest.mark.integration),
        pytest.param("redis", 2, id="redis-two-replicas", marks=pytest.mark.integration),
    ],
)
def test_concurrent_pushes_for_one_user_lose_no_event(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    backend: str,
    replicas: int,
) -> None:
    """POST /v1/events runs on a thread pool: two streams for one user, and reads meanwhile;
    with two replicas (each its own OnlineFeatures and Redis client), one stream each. Each
    push also carries an event of a user of its own stream (a push of several users is one
    compare-and-set on Redis, redone user by user when another writer got in between)."""
    repo = make_repo(request, tmp_path, world, config, backend)
    writers = [OnlineFeatures(repo, config) for _ in range(replicas)]
    online = writers[0]
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    before = online.user_features(user_id)
    own = [10**9 + 1, 10**9 + 2]  # new users, one per stream
    n = 40
    errors: list[BaseException] = []
    applied = [0, 0]
    done = threading.Event()

    def push(k: int) -> None:
        try:
            for i in range(n):
                ts = AS_OF + pd.Timedelta(seconds=10 * (2 * i + k))
                writer = writers[k % replicas]
                both = pd.concat([_event(user_id, 11 + k, ts, "view"), _event(own[k], 5, ts)])
                applied[k] += writer.push_events(both)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                user = online.user_features(user_id)
                # A consistent state: the list and its times have one length, and every
                # window counts the same events (all pushed ones are in every window).
                assert len(user["recent_item_ids"][0]) == len(user["recent_ts"][0])
                grown = {user[f"events_{w}d"][0] - before[f"events_{w}d"][0] for w in (1, 30)}
                assert len(grown) == 1, grown
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    pushers = [threading.Thread(target=push, args=(k,)) for k in range(2)]
    for thread in pushers:
        thread.start()
    for thread in pushers:
        thread.join()
    done.set()
    reader.join()
    assert errors == []
    assert applied == [2 * n, 2 * n]
    after = online.user_features(user_id)
    for w in config.windows_days:
        assert after[f"events_{w}d"][0] == before[f"events_{w}d"][0] + 2 * n
    for k in range(2):
        assert online.user_features(own[k])["events_30d"][0] == n
    assert after["last_event_ts"][0] == int(
        (AS_OF + pd.Timedelta(seconds=10 * (2 * n - 1))).timestamp()
    )


def test_a_retried_event_counts_once(
    fresh_repo: Path, world: Path, config: FeatureConfig, tmp_path: Path
) -> None:
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    online = OnlineFeatures(fresh_repo, config)
    before = online.user_features(user_id)
    ts = AS_OF + pd.Timedelta(minutes=15, microseconds=250)
    event = _event(user_id, 7, ts)
    assert online.push_events(pd.concat([event, event])) == 1  # a duplicate row in one call
    assert online.push_events(event) == 0  # a retry: already stored
    after = online.user_features(user_id)
    for w in config.windows_days:
        assert after[f"events_{w}d"][0] == before[f"events_{w}d"][0] + 1
    log = _log_with(world, tmp_path / "log", pd.concat([event, event, event]))
    want = batch.stored_user_features(
        log, pd.DataFrame({"user_id": [user_id], "ts": ts + pd.Timedelta(minutes=1)}), config
    )
    assert after["session_events"][0] == want["session_events"][0]
    assert after["recent_item_ids"][0, :2].tolist() == list(want["recent_item_ids"][0][:2])
    # The same item a second later is another event.
    assert online.push_events(event.assign(ts=ts + pd.Timedelta(seconds=1))) == 1


def test_a_late_event_counts_only_in_the_windows_it_falls_in(
    fresh_repo: Path, world: Path, config: FeatureConfig, tmp_path: Path
) -> None:
    """Pushed after the materialization as of AS_OF, an event five days before it is in the
    7- and 30-day windows, not the 1-day one, and leaves the session alone: as in batch."""
    assert config.windows_days == (1, 7, 30)
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    online = OnlineFeatures(fresh_repo, config)
    late = _event(user_id, 3, AS_OF - pd.Timedelta(days=5, hours=4), "view")
    assert online.push_events(late) == 1
    _assert_as_batch(online, _log_with(world, tmp_path / "log", late), user_id, AS_OF, config)


def test_a_session_gap_of_1800_5_s_is_one_session_online_and_in_batch(
    fresh_repo: Path, world: Path, config: FeatureConfig, tmp_path: Path
) -> None:
    """session_gap_s = 1800 s; the second event is 1800.5 s after the first but 1800 whole
    seconds (the stored times): online and batch agree that it continues the session."""
    assert config.session_gap_s == 1800
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    online = OnlineFeatures(fresh_repo, config)
    first = _event(user_id, 4, AS_OF + pd.Timedelta(hours=3, milliseconds=100))
    second = _event(user_id, 5, first["ts"][0] + pd.Timedelta(seconds=1800.5), "view")
    online.push_events(first)
    online.push_events(second)
    assert online.user_features(user_id)["session_events"][0] == 2
    log = _log_with(world, tmp_path / "log", pd.concat([first, second]))
    at = second["ts"][0] + pd.Timedelta(seconds=1)
    got = online.user_features(user_id)
    want = batch.stored_user_features(log, pd.DataFrame({"user_id": [user_id], "ts": at}), config)
    for name in ("session_events", "last_event_ts"):
        assert got[name][0] == want[name][0], name
    assert got["recent_ts"][0, :3].tolist() == list(want["recent_ts"][0][:3])


def test_context_keys_never_override_stored_or_model_features(
    sqlite_repo: Path, world: Path, config: FeatureConfig
) -> None:
    """Unknown context keys are passed on (mlsd.serving.recommender.RecommendRequest); a key
    naming a stored, derived or ranker column is ignored: the stored value stands."""
    online = OnlineFeatures(sqlite_repo, config)
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    user = online.user_features(user_id)
    item_ids = np.array([1, 2])
    plain = online.features_for(user, item_ids, now=AS_OF)
    context = {
        "events_7d": 0,  # stored (user)
        "item_events_7d": 1e6,  # stored (item)
        "hour_of_day": 23,  # derived
        "user_events_all": -5,  # a ranker column from the model's snapshot
        "device": "mobile",  # unknown: passed on
    }
    got = online.features_for(user, item_ids, context, now=AS_OF)
    assert got.derived["device"].tolist() == ["mobile", "mobile"]
    assert set(got.derived) == set(plain.derived) | {"device", "user_events_all"}
    np.testing.assert_array_equal(got.derived["hour_of_day"], plain.derived["hour_of_day"])
    layout = FeatureLayout(
        numeric=("events_7d", "item_events_7d", "hour_of_day", "user_events_all"), categorical=()
    )
    pairs = {"user_id": np.full(2, user_id), "item_id": item_ids}
    extras = {"user_events_all": np.array([3.0, 3.0])}
    columns, want = (
        request_columns(
            pairs, user=batch.user, items=batch.items, derived=batch.derived, extras=extras,
            layout=layout, config=config,
        )
        for batch in (got, plain)
    )  # fmt: skip
    for name in layout.numeric:
        np.testing.assert_array_equal(columns[name], want[name], err_msg=name)
    assert columns["user_events_all"].tolist() == [3.0, 3.0]


def test_a_future_event_is_refused_and_nothing_is_written(
    fresh_repo: Path, world: Path, config: FeatureConfig
) -> None:
    """More than EVENT_TS_ALLOWANCE_S after the clock: the whole call is refused, naming the
    row, and the user's stored state is untouched; within the allowance it is applied."""
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    online = OnlineFeatures(fresh_repo, config)
    before = online.user_features(user_id)
    now = (AS_OF + pd.Timedelta(hours=1)).timestamp()
    soon = _event(user_id, 8, AS_OF + pd.Timedelta(hours=1, seconds=EVENT_TS_ALLOWANCE_S - 10))
    later = _event(user_id, 9, AS_OF + pd.Timedelta(hours=1, seconds=EVENT_TS_ALLOWANCE_S + 10))
    both = pd.concat([soon, later], ignore_index=True)
    with pytest.raises(ContractError, match=r"1 event\(s\) dated more than 300 s .*row 1"):
        online.push_events(both, now=now)
    after = online.user_features(user_id)
    for name in ("events_1d", "session_events", "last_event_ts"):
        assert after[name][0] == before[name][0], name
    assert online.push_events(soon, now=now) == 1
    # Against the system clock (years after AS_OF), both are in the past.
    assert online.push_events(later) == 1


@pytest.mark.parametrize(
    ("column", "bad"),
    [
        ("user_id", None),
        ("item_id", np.nan),
        ("ts", pd.NaT),
        ("value", None),
        ("value", np.inf),
        ("value", 1e39),  # finite, but infinite as the float32 the features keep
    ],
)
def test_an_event_with_a_missing_field_is_refused_and_nothing_is_written(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    column: str,
    bad: object,
) -> None:
    """A null id would be applied to user -2**63, a null value writes NaN into the category
    means, a NaT time fails deep in the store: the call is refused first, naming the row and
    the field, and no event of it is applied."""
    repo = make_repo(request, tmp_path, world, config, "sqlite")
    user_id, _ = active_user(world, AS_OF - pd.Timedelta(days=1), AS_OF)
    online = OnlineFeatures(repo, config)
    before = online.user_features(user_id)
    ts = AS_OF + pd.Timedelta(minutes=5)
    good = {"user_id": user_id, "item_id": 8, "ts": ts, "event": "click", "value": 1.0}
    late = ts + pd.Timedelta(seconds=1)
    both = pd.DataFrame([good, {**good, "item_id": 9, "ts": late, column: bad}])
    with pytest.raises(
        ContractError, match=rf"1 event\(s\) have no .* in '{column}', e\.g\. row 1"
    ):
        online.push_events(both, now=ts.timestamp())
    after = online.user_features(user_id)
    for name in ("recent_item_ids", "events_1d", "cat_mean_1d", "last_event_ts"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert online.user_features(-(2**63))["user_known"].tolist() == [0]
    online.close()
