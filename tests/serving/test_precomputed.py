"""Precomputed top-K lists in Redis: round trip, the reasons a lookup misses, batch writes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mlsd.serving.precomputed import (
    MAX_CONSUMED,
    PAD_ID,
    CorruptValueError,
    Lookup,
    PrecomputedStore,
    StoreUnavailableError,
    decode,
    encode,
)
from tests.conftest import redis_server_on

VERSION = "ranker:7"
T0 = 1_700_000_000.0


def make_batch(n_users: int, k: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """(n,) user ids, (n, k) item ids best first with -1 padding on some rows, (n, k) scores."""
    rng = np.random.default_rng(seed)
    user_ids = rng.choice(10 * n_users + 10, size=n_users, replace=False).astype(np.int64)
    item_ids = rng.integers(0, 1_000_000, size=(n_users, k), dtype=np.int64)
    scores = -np.sort(-rng.random((n_users, k), dtype=np.float32), axis=1)
    lengths = rng.integers(0, k + 1, size=n_users)
    lengths[0] = k  # one full row, and one empty row when there are two
    if n_users > 1:
        lengths[1] = 0
    pad = np.arange(k)[None, :] >= lengths[:, None]
    item_ids[pad] = PAD_ID
    scores[pad] = -np.inf
    return user_ids, item_ids, scores


@pytest.fixture
def client(redis_server: str) -> Iterator[redis.Redis]:
    host, port = redis_server.split(":")
    conn = redis.Redis(host=host, port=int(port))
    yield conn
    conn.close()


@pytest.fixture
def store(client: redis.Redis) -> PrecomputedStore:
    """A store with a prefix of its own, so tests sharing the server never see each other."""
    return PrecomputedStore(client, prefix=f"test:{uuid.uuid4().hex[:10]}", ttl_s=600)


# --- the value format, no server ---------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    ids = np.array([5, 3, 9], dtype=np.int64)
    scores = np.array([0.9, 0.5, 0.1], dtype=np.float32)
    value = encode(ids, scores, model_version="v1 é", computed_at=T0)
    assert len(value) == 24 + len("v1 é".encode()) + 3 * 12 + 1 + 3  # no names, 3 codes
    got = decode(value)
    np.testing.assert_array_equal(got.item_ids, ids)
    np.testing.assert_array_equal(got.scores, scores)
    assert (got.model_version, got.computed_at) == ("v1 é", T0)
    assert got.item_ids.dtype == np.int64
    assert got.scores.dtype == np.float32
    assert got.item_ids.flags.writeable
    assert got.source_list() == ["precomputed"] * 3  # written without sources


def test_each_items_source_round_trips() -> None:
    ids = np.array([5, 3, 9, 4], dtype=np.int64)
    scores = np.ones(4, np.float32)
    names = ("als", "two_tower é")
    value = encode(
        ids, scores, model_version="v", computed_at=T0, sources=[1, 0, -1, 1], source_names=names
    )
    assert len(value) == 24 + 1 + 4 * 12 + 1 + (1 + 3) + (1 + len("two_tower é".encode())) + 4
    got = decode(value)
    assert got.source_names == names
    assert got.source_list() == ["two_tower é", "als", "precomputed", "two_tower é"]
    served = got.serves(3, np.array([3]))
    assert served is not None
    assert served[0].tolist() == [5, 9, 4]
    assert served[2] == ["two_tower é", "precomputed", "two_tower é"]  # 3 and its source gone
    with pytest.raises(ValueError, match="one code per item"):
        encode(ids, scores, model_version="v", computed_at=T0, sources=[0, 2, 0, 0],
               source_names=names)  # fmt: skip
    with pytest.raises(ValueError, match="one code per item"):
        encode(ids, scores, model_version="v", computed_at=T0, sources=[0], source_names=names)
    with pytest.raises(ValueError, match="source_names"):
        encode(ids, scores, model_version="v", computed_at=T0, source_names=("x" * 256,))


def legacy(value: bytes, fmt: int, n_items: int) -> bytes:
    """``value`` (written without source names) as format ``fmt`` (1 or 2) wrote it: no source
    table; format 1 has ``k`` reserved as 0."""
    old = bytearray(value[: -(1 + n_items)])
    old[4] = fmt
    if fmt == 1:
        old[5], old[6] = 0, 0
    return bytes(old)


GOOD = encode(
    np.arange(4, dtype=np.int64), np.ones(4, np.float32), model_version="v", computed_at=T0
)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="short"),
        pytest.param(b"XXXX" + GOOD[4:], id="magic"),
        pytest.param(GOOD[:4] + b"\x09" + GOOD[5:], id="format"),
        pytest.param(GOOD[:-1], id="truncated"),
        pytest.param(GOOD + b"\x00", id="trailing"),
        pytest.param(GOOD[:16] + struct.pack("<d", math.nan) + GOOD[24:], id="nan-time"),
        pytest.param(GOOD[:24] + b"\xff" + GOOD[25:], id="version-not-utf8"),
        pytest.param(GOOD[:-5] + b"\x03" + GOOD[-4:], id="source-table-past-the-end"),
        pytest.param(GOOD[:-5] + b"\x01\x01\xff" + GOOD[-4:], id="source-name-not-utf8"),
        pytest.param(GOOD[:-5], id="no-source-table"),
    ],
)
def test_decode_rejects_malformed_values(value: bytes) -> None:
    with pytest.raises(CorruptValueError):
        decode(value)


def test_bad_arguments_are_rejected_with_the_shapes() -> None:
    store = PrecomputedStore(redis.Redis(port=1))  # never connects: validation comes first
    users, ids, scores = make_batch(3, 4)
    with pytest.raises(ValueError, match=r"item_ids \(3, 4\), scores \(3, 3\)"):
        store.write(users, ids, scores[:, :3], model_version=VERSION)
    with pytest.raises(ValueError, match="user_ids"):
        store.write(users[:2], ids, scores, model_version=VERSION)
    with pytest.raises(ValueError, match="integers"):
        store.write(users, ids.astype(float), scores, model_version=VERSION)
    with pytest.raises(ValueError, match="decode_responses"):
        PrecomputedStore(redis.Redis(port=1, decode_responses=True))
    with pytest.raises(ValueError, match="ttl_s"):
        PrecomputedStore(redis.Redis(port=1), ttl_s=0)
    with pytest.raises(ValueError, match=r"ttl_s must be at least 1 second, got 0\.5"):
        PrecomputedStore(redis.Redis(port=1), ttl_s=0.5)  # type: ignore[arg-type]


def test_connection_errors_propagate() -> None:
    """The service chooses the fallback, so a dead Redis is an exception, not a miss."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    no_retry = Retry(NoBackoff(), retries=0)  # the default retries with backoff for seconds
    store = PrecomputedStore(redis.Redis(port=port, socket_connect_timeout=0.5, retry=no_retry))
    with pytest.raises(redis.exceptions.ConnectionError):
        store.lookup(1, model_version=VERSION)


# --- against a real redis-server ---------------------------------------------------------


@pytest.mark.integration
def test_round_trip_strips_padding(store: PrecomputedStore) -> None:
    users, ids, scores = make_batch(50, 20)
    store.write(users, ids, scores, model_version=VERSION, computed_at=T0)
    for row, user in enumerate(users):
        found = store.lookup(int(user), model_version=VERSION)
        assert found.reason == "hit"
        assert found.result is not None
        keep = ids[row] != PAD_ID
        np.testing.assert_array_equal(found.result.item_ids, ids[row][keep])
        np.testing.assert_array_equal(found.result.scores, scores[row][keep])
        assert (found.result.model_version, found.result.computed_at) == (VERSION, T0)
    assert len(store.read(int(users[0]), model_version=VERSION).item_ids) == 20  # type: ignore[union-attr]
    assert len(store.read(int(users[1]), model_version=VERSION).item_ids) == 0  # type: ignore[union-attr]


@pytest.mark.integration
def test_each_items_source_is_written_and_read_back(store: PrecomputedStore) -> None:
    users, ids, scores = make_batch(6, 5)
    codes = np.arange(30).reshape(6, 5) % 3  # 0, 1, 2: three sources
    names = ("popularity", "als", "ease")
    store.write(users, ids, scores, model_version=VERSION, sources=codes, source_names=names)
    for row, user in enumerate(users):
        found = store.read(int(user), model_version=VERSION)
        assert found is not None
        keep = ids[row] != PAD_ID  # padding and its codes are dropped together
        assert found.source_list() == [names[c] for c in codes[row][keep]]
    with pytest.raises(ValueError, match=r"sources: shape \(6, 4\)"):
        store.write(users, ids, scores, model_version=VERSION, sources=codes[:, :4])


@pytest.mark.integration
def test_missing_user(store: PrecomputedStore) -> None:
    assert store.lookup(123, model_version=VERSION) == Lookup(None, "missing")
    assert store.read(123, model_version=VERSION) is None


@pytest.mark.integration
def test_each_model_version_keeps_its_own_lists(
    store: PrecomputedStore, client: redis.Redis
) -> None:
    """A challenger's batch (or the next champion's, before its promotion) does not take the
    serving version's lists away; a rollback finds its own."""
    users, ids, scores = make_batch(3, 5)
    store.write(users, ids, scores, model_version="ranker:6")
    assert store.lookup(int(users[0]), model_version=VERSION) == Lookup(None, "missing")
    store.write(users[:1], ids[:1] + 1, scores[:1], model_version=VERSION)  # the new one's
    new = store.lookup(int(users[0]), model_version=VERSION)
    old = store.lookup(int(users[0]), model_version="ranker:6")
    assert new.result is not None
    assert old.result is not None
    np.testing.assert_array_equal(new.result.item_ids, ids[0] + 1)
    np.testing.assert_array_equal(old.result.item_ids, ids[0])
    # a value of another version under this version's key is refused
    other = client.get(store.key(int(users[0]), "ranker:6"))
    client.set(store.key(int(users[0]), VERSION), other)  # type: ignore[arg-type]
    assert store.lookup(int(users[0]), model_version=VERSION) == Lookup(None, "stale_version")


@pytest.mark.integration
def test_a_list_computed_after_the_requests_time_is_not_served(store: PrecomputedStore) -> None:
    users, ids, scores = make_batch(1, 5)
    store.write(users, ids, scores, model_version=VERSION, computed_at=T0)
    user = int(users[0])
    assert store.lookup(user, model_version=VERSION, now=T0 - 3600).reason == "future"
    assert store.lookup(user, model_version=VERSION, now=T0 - 30).reason == "hit"  # clock skew


@pytest.mark.integration
def test_items_consumed_since_the_batch_come_with_the_list(
    store: PrecomputedStore, client: redis.Redis, redis_server: str
) -> None:
    users, ids, scores = make_batch(3, 6)
    store.write(users, ids, scores, model_version=VERSION, computed_at=T0)
    first, second = int(users[0]), int(users[2])
    store.note_consumed([first, second, first], [int(ids[0][0]), 77, int(ids[0][3])])
    store.note_consumed([first], [5])
    found = store.lookup(first, model_version=VERSION)
    assert found.result is not None
    assert found.result.consumed.tolist() == [int(ids[0][0]), int(ids[0][3]), 5]
    assert 0 < int(client.ttl(store.consumed_key(first))) <= store.ttl_s  # type: ignore[arg-type]
    many = store.lookup_many(users, model_version=VERSION)
    assert [f.result.consumed.tolist() if f.result else None for f in many] == [
        found.result.consumed.tolist(), [], [77]  # the second user's list is empty
    ]  # fmt: skip
    fast = PrecomputedStore.from_url(f"redis://{redis_server}/0", prefix=store.prefix)
    found_async = asyncio.run(fast.lookup_async(first, model_version=VERSION))
    assert found_async.result is not None
    assert found_async.result.consumed.tolist() == found.result.consumed.tolist()
    with pytest.raises(ValueError, match="2 user ids for 1 item ids"):
        store.note_consumed([1, 2], [3])


@pytest.mark.integration
def test_the_consumed_record_keeps_the_last_items_and_no_anonymous_one(
    store: PrecomputedStore, client: redis.Redis
) -> None:
    """A user who keeps acting renews the record's TTL: it must not grow as long as they do."""
    many = MAX_CONSUMED + 200
    for lo in range(0, many, 300):  # several events' calls, as the service makes them
        chunk = np.arange(lo, min(lo + 300, many))
        store.note_consumed(np.full(len(chunk), 3), chunk)
    kept = np.frombuffer(client.get(store.consumed_key(3)), dtype="<i8")  # type: ignore[arg-type]
    assert kept.tolist() == list(range(200, many))  # the last MAX_CONSUMED, in order
    assert 0 < int(client.ttl(store.consumed_key(3))) <= store.ttl_s  # type: ignore[arg-type]
    store.note_consumed([-1, -1], [5, 6])  # anonymous visitors have no list to skip items of
    assert client.exists(store.consumed_key(-1)) == 0


def test_the_batchs_k_tells_a_list_cut_short_from_one_that_ran_out() -> None:
    ids, scores = np.array([5, 3, 9], np.int64), np.array([0.9, 0.5, 0.1], np.float32)
    cut = decode(encode(ids, scores, model_version="v", computed_at=T0))  # k = 3: cut at 3
    ran_out = decode(encode(ids, scores, model_version="v", computed_at=T0, k=10))
    assert (cut.k, ran_out.k) == (3, 10)
    none = np.zeros(0, np.int64)
    assert cut.serves(2, none) is not None
    assert cut.serves(3, none) is not None
    assert cut.serves(4, none) is None  # the model had more items than the batch kept
    served = ran_out.serves(4, none)
    assert served is not None  # it had no more to give
    assert served[0].tolist() == [5, 3, 9]
    skipped = cut.serves(2, np.array([3]))
    assert skipped is not None
    assert skipped[0].tolist() == [5, 9]
    assert cut.serves(3, np.array([3])) is None  # one excluded: no longer the model's 3
    with pytest.raises(ValueError, match="k=2: must be at least the 3 items"):
        encode(ids, scores, model_version="v", computed_at=T0, k=2)
    # a value of format 1 (k reserved as 0) is read as cut at its length
    old = legacy(encode(ids, scores, model_version="v", computed_at=T0), 1, 3)
    assert decode(old).k == 0
    assert decode(old).serves(3, none) is not None
    assert decode(old).serves(4, none) is None
    # format 2 (no sources): served under the source "precomputed"
    two = decode(legacy(encode(ids, scores, model_version="v", computed_at=T0, k=10), 2, 3))
    assert two.k == 10
    assert two.source_list() == ["precomputed"] * 3


@pytest.mark.integration
def test_max_age(store: PrecomputedStore) -> None:
    users, ids, scores = make_batch(1, 5)
    store.write(users, ids, scores, model_version=VERSION, computed_at=T0)
    user = int(users[0])
    old = store.lookup(user, model_version=VERSION, max_age_s=3600, now=T0 + 3601)
    assert old == Lookup(None, "too_old")
    fresh = store.lookup(user, model_version=VERSION, max_age_s=3600, now=T0 + 3599)
    assert fresh.reason == "hit"
    assert store.lookup(user, model_version=VERSION, now=T0 + 10**6).reason == "hit"  # no limit


@pytest.mark.integration
def test_every_key_gets_the_ttl(store: PrecomputedStore, client: redis.Redis) -> None:
    users, ids, scores = make_batch(10, 5)
    store.write(users, ids, scores, model_version=VERSION)
    ttls = [int(client.ttl(store.key(int(u), VERSION))) for u in users]  # type: ignore[arg-type]
    assert all(0 < t <= store.ttl_s for t in ttls), ttls


@pytest.mark.integration
def test_corrupt_value_is_a_miss_not_an_error(store: PrecomputedStore, client: redis.Redis) -> None:
    users, ids, scores = make_batch(3, 5)
    store.write(users, ids, scores, model_version=VERSION)
    bad = int(users[1])
    key = store.key(bad, VERSION)
    client.set(key, client.get(key)[:-3])  # type: ignore[index]
    assert store.lookup(bad, model_version=VERSION) == Lookup(None, "corrupt")
    client.set(key, b"not a list")
    assert store.lookup(bad, model_version=VERSION) == Lookup(None, "corrupt")
    reasons = [f.reason for f in store.lookup_many(users, model_version=VERSION)]
    assert reasons == ["hit", "corrupt", "hit"]


@pytest.mark.integration
def test_read_many_matches_read(store: PrecomputedStore) -> None:
    users, ids, scores = make_batch(40, 8)
    store.write(users[:30], ids[:30], scores[:30], model_version=VERSION, computed_at=T0)
    store.write(users[30:35], ids[30:35], scores[30:35], model_version="old", computed_at=T0)
    asked = np.concatenate([users, [999_999_999]])  # 5 never written, 1 unknown
    kwargs: dict[str, Any] = {"model_version": VERSION, "max_age_s": 60.0, "now": T0 + 1}
    many = store.lookup_many(asked, **kwargs)
    one_by_one = [store.lookup(int(u), **kwargs) for u in asked]
    assert [f.reason for f in many] == [f.reason for f in one_by_one]
    assert [f.reason for f in many].count("hit") == 30
    for a, b in zip(many, one_by_one, strict=True):
        if a.result is not None and b.result is not None:
            np.testing.assert_array_equal(a.result.item_ids, b.result.item_ids)
            np.testing.assert_array_equal(a.result.scores, b.result.scores)
    assert [r is None for r in store.read_many(asked, **kwargs)] == [f.result is None for f in many]
    assert store.read_many([], model_version=VERSION) == []


@pytest.mark.integration
def test_20k_users_in_chunks(
    store: PrecomputedStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipelines = 0
    make_pipeline = client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return make_pipeline(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", counting_pipeline)
    users, ids, scores = make_batch(20_000, 10)
    stats = store.write(users, ids, scores, model_version=VERSION, chunk=3_000)
    assert pipelines == math.ceil(20_000 / 3_000)
    assert stats.n_users == 20_000
    assert stats.users_per_s > 0
    # header, version and an empty source table per user; id, score and source code per item
    assert stats.n_bytes == 20_000 * (24 + len(VERSION) + 1) + int((ids != PAD_ID).sum()) * 13
    assert sum(1 for _ in client.scan_iter(f"{store.prefix}:*", count=5_000)) == 20_000
    found = store.lookup_many(users[-1000:], model_version=VERSION)
    assert all(f.reason == "hit" for f in found)
    last = found[-1].result
    assert last is not None
    np.testing.assert_array_equal(last.item_ids, ids[-1][ids[-1] != PAD_ID])


@pytest.mark.integration
def test_the_async_lookup_judges_as_the_sync_one(redis_server: str) -> None:
    store = PrecomputedStore.from_url(
        f"redis://{redis_server}/0", prefix=f"test:{uuid.uuid4().hex[:10]}", ttl_s=600
    )
    assert store.can_await
    users, ids, scores = make_batch(5, 8)
    store.write(users, ids, scores, model_version=VERSION, computed_at=T0)
    asks = [
        (int(users[0]), VERSION, None),  # hit
        (int(users[2]), "other", None),  # missing: no list of that version
        (int(users[3]), VERSION, 60.0),  # too_old
        (10**9, VERSION, None),  # missing
    ]

    async def both() -> list[tuple[Lookup, Lookup]]:
        out = []
        for user, version, max_age in asks:
            fast = await store.lookup_async(user, model_version=version, max_age_s=max_age)
            out.append((fast, store.lookup(user, model_version=version, max_age_s=max_age)))
        return out

    for _ in range(2):  # a second event loop gets a client of its own
        for fast, slow in asyncio.run(both()):
            assert fast.reason == slow.reason
            if slow.result is not None:
                assert fast.result is not None
                np.testing.assert_array_equal(fast.result.item_ids, slow.result.item_ids)
    assert [f.reason for f, _ in asyncio.run(both())] == [
        "hit", "missing", "too_old", "missing"
    ]  # fmt: skip


@pytest.mark.integration
def test_a_stalled_redis_costs_one_timeout_then_is_skipped_until_it_answers() -> None:
    """A Redis that accepts connections and never answers (a stalled server): the first lookup
    waits out its socket timeout, and so does no lookup for ``retry_after_s`` after it, on
    either path (the service's fast path, then its thread path, used to wait twice). Once
    the cool-off is over a lookup tries again, and a Redis that answers is used again."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes connections; nothing ever reads them
    port = listener.getsockname()[1]
    no_retry = Retry(NoBackoff(), retries=0)
    store = PrecomputedStore(
        redis.Redis(port=port, socket_timeout=0.2, retry=no_retry),
        async_url=f"redis://127.0.0.1:{port}/0", socket_timeout=0.2, retry_after_s=1.0,
    )  # fmt: skip

    def timed(call: Any) -> tuple[type[BaseException] | None, float]:
        began = time.perf_counter()
        try:
            call()
        except redis.exceptions.RedisError as err:
            return type(err), time.perf_counter() - began
        return None, time.perf_counter() - began

    async def fast() -> Lookup:
        return await store.lookup_async(1, model_version=VERSION)

    error, seconds = timed(lambda: asyncio.run(fast()))
    assert error is redis.exceptions.TimeoutError
    assert seconds >= 0.19
    error, seconds = timed(lambda: store.lookup(1, model_version=VERSION))
    assert error is StoreUnavailableError  # the thread path does not wait again
    assert seconds < 0.05
    assert issubclass(StoreUnavailableError, redis.exceptions.ConnectionError)
    with pytest.raises(StoreUnavailableError):
        store.lookup_many([1, 2], model_version=VERSION)
    # the cool-off over, Redis is tried again: still stalled, one more timeout
    time.sleep(1.05)
    error, seconds = timed(lambda: store.lookup(1, model_version=VERSION))
    assert error is redis.exceptions.TimeoutError
    assert seconds >= 0.19
    # the cool-off over, one lookup probes and the rest are refused while it waits
    time.sleep(1.05)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: timed(lambda: store.lookup(1, model_version=VERSION)),
                                 range(8)))  # fmt: skip
    errors = sorted(error.__name__ for error, _ in outcomes if error is not None)
    assert errors == ["StoreUnavailableError"] * 7 + ["TimeoutError"]
    # a Redis that answers on that port: after the cool-off, lookups work again
    listener.close()
    with redis_server_on(port):
        time.sleep(1.05)
        assert store.lookup(1, model_version=VERSION).reason == "missing"
        assert store.lookup(1, model_version=VERSION).reason == "missing"


def test_the_cool_off_is_checked() -> None:
    with pytest.raises(ValueError, match="retry_after_s"):
        PrecomputedStore(redis.Redis(port=1), retry_after_s=-1.0)


def test_a_store_without_a_url_cannot_be_awaited() -> None:
    store = PrecomputedStore(redis.Redis(port=1))
    assert not store.can_await
    with pytest.raises(RuntimeError, match="from_url"):
        asyncio.run(store.lookup_async(1, model_version=VERSION))
