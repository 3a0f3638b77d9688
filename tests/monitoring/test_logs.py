"""The service log's writer: exact schemas, concurrent writers, flushing, retention, failures."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mlsd.monitoring.log_reader import read_table
from mlsd.monitoring.logs import (
    CANDIDATES,
    EXPOSURES,
    FEEDBACK,
    REQUESTS,
    SCHEMAS,
    TABLES,
    ServiceLog,
    Throttle,
    apply_retention,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rows(table: pa.Table, *keys: str) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda row: tuple(str(row[k]) for k in keys))


def part_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_round_trip_of_every_table_keeps_the_exact_schema(tmp_path: Path) -> None:
    with ServiceLog(tmp_path) as log:
        log.log_request("r1", at(0), 7, "ranker:3", path="online", latency_ms=4.5, status=200,
                        k=2, experiment="exp", arm="b")  # fmt: skip
        log.log_request("r2", at(1).timestamp(), None, "ranker:3", path="fallback:popular",
                        latency_ms=9.0, status=200, k=2,
                        fallbacks=["model", "features"])  # fmt: skip
        log.log_exposures("r1", at(0), 7, "ranker:3", [11, 12], [0.9, 0.5], sources=["als", "pop"],
                          experiment="exp", arm="b")  # fmt: skip
        log.log_exposures("r2", at(1), None, "ranker:3", np.array([13]), np.array([0.1]),
                          positions=[4], sources="popular", path="fallback:popular")  # fmt: skip
        log.log_candidates("r1", at(0), 7, "ranker:3", [11, 12], [0.9, 0.5],
                           numeric={"age": [30.0, 30.0]},
                           categorical={"genre": [2, 5]})  # fmt: skip
        log.log_candidates("r2", at(1), None, "ranker:3", [13], [0.1],
                           numeric={"age": [41.5]}, categorical={})  # fmt: skip
        log.log_feedback(at(5), 7, 11, "click", request_id="r1")
        log.log_feedback(at(6), 7, 12, "rate", value=4.5)

    for table in (REQUESTS, EXPOSURES, FEEDBACK):
        assert read_table(tmp_path, table).schema == SCHEMAS[table], table
    candidates = read_table(tmp_path, CANDIDATES)
    expected = SCHEMAS[CANDIDATES].append(pa.field("f_age", pa.float32()))
    assert candidates.schema == expected.append(pa.field("c_genre", pa.int32()))

    assert rows(read_table(tmp_path, REQUESTS), "request_id") == [
        {"request_id": "r1", "ts": at(0), "user_id": 7, "model_version": "ranker:3",
         "experiment": "exp", "arm": "b", "path": "online", "fallbacks": "",
         "latency_ms": 4.5, "status": 200, "k": 2},
        {"request_id": "r2", "ts": at(1), "user_id": -1, "model_version": "ranker:3",
         "experiment": "", "arm": "", "path": "fallback:popular", "fallbacks": "model,features",
         "latency_ms": 9.0, "status": 200, "k": 2},
    ]  # fmt: skip
    exposures = rows(read_table(tmp_path, EXPOSURES), "item_id")
    assert [(e["request_id"], e["item_id"], e["position"], e["source"], e["user_id"], e["path"])
            for e in exposures] == [
        ("r1", 11, 0, "als", 7, "online"),
        ("r1", 12, 1, "pop", 7, "online"),
        ("r2", 13, 4, "popular", -1, "fallback:popular"),
    ]  # fmt: skip
    assert [e["score"] for e in exposures] == pytest.approx([0.9, 0.5, 0.1])
    assert [(e["experiment"], e["arm"]) for e in exposures] == [("exp", "b")] * 2 + [("", "")]
    by_item = {c["item_id"]: c for c in candidates.to_pylist()}
    assert by_item[12]["c_genre"] == 5
    assert by_item[13]["f_age"] == 41.5
    assert by_item[13]["c_genre"] is None  # the feature was not logged for r2
    assert rows(read_table(tmp_path, FEEDBACK), "item_id") == [
        {"ts": at(5), "user_id": 7, "item_id": 11, "event": "click", "value": 1.0,
         "request_id": "r1"},
        {"ts": at(6), "user_id": 7, "item_id": 12, "event": "rate", "value": 4.5,
         "request_id": ""},
    ]  # fmt: skip


def test_rows_go_to_the_partition_of_their_utc_date_and_windows_prune(tmp_path: Path) -> None:
    midnight = datetime(2024, 5, 2, tzinfo=UTC)
    with ServiceLog(tmp_path) as log:
        for i, ts in enumerate(
            [midnight - timedelta(seconds=1), midnight, midnight + timedelta(1)]
        ):
            log.log_request(f"r{i}", ts, 1, "m", path="online", latency_ms=1.0, status=200, k=1)
            log.log_exposures(f"r{i}", ts, 1, "m", [i], [0.0])
    dates = sorted(p.parent.name for p in (tmp_path / REQUESTS).glob("*/*.parquet"))
    assert dates == ["date=2024-05-01", "date=2024-05-02", "date=2024-05-03"]
    assert sorted(p.name for p in (tmp_path / EXPOSURES).iterdir()) == dates

    window = read_table(tmp_path, REQUESTS, start=midnight, end=midnight + timedelta(hours=1))
    assert window.column("request_id").to_pylist() == ["r1"]
    naive = read_table(
        tmp_path, EXPOSURES, start=midnight.replace(tzinfo=None), columns=["item_id"]
    )
    assert sorted(naive.column("item_id").to_pylist()) == [1, 2]
    assert naive.schema == pa.schema([SCHEMAS[EXPOSURES].field("item_id")])


def test_a_call_of_no_rows_leaves_every_other_call_its_own_ids_and_writes_nothing(
    tmp_path: Path,
) -> None:
    midnight = datetime(2024, 5, 2, tzinfo=UTC)
    with ServiceLog(tmp_path) as log:
        log.log_exposures("empty", midnight - timedelta(seconds=1), 1, "m", [], [])
        log.log_exposures("b", midnight, 2, "m", [10, 11], [0.9, 0.8])
        log.log_exposures("c", midnight, 3, "m", [12], [0.7])
        log.log_candidates("empty", midnight, 1, "m", [], [], {"x": []}, {})
        log.log_candidates("d", midnight, 4, "m", [7, 8], [0.1, 0.2], {"x": [1.0, 2.0]}, {})
    exposures = read_table(tmp_path, EXPOSURES, columns=["request_id", "user_id", "item_id"])
    assert rows(exposures, "item_id") == [
        {"request_id": "b", "user_id": 2, "item_id": 10},
        {"request_id": "b", "user_id": 2, "item_id": 11},
        {"request_id": "c", "user_id": 3, "item_id": 12},
    ]
    candidates = read_table(tmp_path, CANDIDATES, columns=["request_id", "user_id", "item_id"])
    assert rows(candidates, "item_id") == [
        {"request_id": "d", "user_id": 4, "item_id": 7},
        {"request_id": "d", "user_id": 4, "item_id": 8},
    ]
    # the empty call's day (May 1st) got no part file of its own
    assert [p.parent.name for p in (tmp_path / EXPOSURES).glob("*/*.parquet")] == [
        "date=2024-05-02"
    ]


def test_a_missing_or_empty_log_reads_as_empty_tables_and_bad_names_are_errors(
    tmp_path: Path,
) -> None:
    for table in TABLES:
        empty = read_table(tmp_path / "nothing-here", table)
        assert empty.num_rows == 0
        assert empty.schema == SCHEMAS[table]
    (tmp_path / REQUESTS).mkdir()
    assert read_table(tmp_path, REQUESTS, columns=["ts"]).schema.names == ["ts"]
    with pytest.raises(ValueError, match="unknown service log table 'clicks'"):
        read_table(tmp_path, "clicks")
    with pytest.raises(ValueError, match=r"no column\(s\) \['latency'\]"):
        read_table(tmp_path, REQUESTS, columns=["latency"])


def test_threads_writing_at_once_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    n_threads, n_calls = 6, 150
    log = ServiceLog(tmp_path, flush_rows=97, flush_interval_s=0.01)

    def write(thread: int) -> None:
        for i in range(n_calls):
            rid = f"t{thread}-{i}"
            log.log_request(rid, at(i), thread, "m", path="online", latency_ms=1.0, status=200, k=3)
            log.log_exposures(rid, at(i), thread, "m", [i, i + 1, i + 2], [0.3, 0.2, 0.1])

    threads = [threading.Thread(target=write, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    requests = read_table(tmp_path, REQUESTS, columns=["request_id"]).column("request_id")
    assert sorted(requests.to_pylist()) == sorted(
        f"t{t}-{i}" for t in range(n_threads) for i in range(n_calls)
    )
    exposures = read_table(tmp_path, EXPOSURES, columns=["request_id", "item_id"]).to_pylist()
    assert len(exposures) == 3 * n_threads * n_calls
    assert len({(e["request_id"], e["item_id"]) for e in exposures}) == len(exposures)
    assert (log.written_rows, log.dropped_rows, log.write_errors) == (4 * n_threads * n_calls, 0, 0)
    assert len(list((tmp_path / EXPOSURES).rglob("*.parquet"))) > 1  # it did rotate
    assert not [p for p in part_files(tmp_path) if not p.name.endswith(".parquet")]


def _write_in_process(log_dir: str, writer: int, n_calls: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]  # a multiprocessing Barrier
    with ServiceLog(log_dir, flush_rows=40, flush_interval_s=0.02) as log:
        for i in range(n_calls):
            rid = f"p{writer}-{i}"
            log.log_request(rid, time.time(), writer, "m", path="online", latency_ms=1.0,
                            status=200, k=2)  # fmt: skip
            log.log_exposures(rid, time.time(), writer, "m", [i, -i - 1], [1.0, 0.0])
            if i % 50 == 0:
                time.sleep(0.01)  # let the writers interleave


def test_processes_writing_one_log_dir_at_once_are_read_whole(tmp_path: Path) -> None:
    n_writers, n_calls = 3, 400
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(n_writers + 1)
    writers = [
        context.Process(target=_write_in_process, args=(str(tmp_path), w, n_calls, start))
        for w in range(n_writers)
    ]
    for writer in writers:
        writer.start()
    start.wait(timeout=60)
    seen = []  # the reader runs while they write: every read is a whole-file snapshot
    while any(writer.is_alive() for writer in writers):
        table = read_table(tmp_path, EXPOSURES, columns=["request_id", "item_id"])
        assert table.num_rows % 2 == 0  # requests are written whole, never half a file
        seen.append(table.num_rows)
        time.sleep(0.05)
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0

    requests = read_table(tmp_path, REQUESTS, columns=["request_id", "user_id"]).to_pylist()
    assert sorted(r["request_id"] for r in requests) == sorted(
        f"p{w}-{i}" for w in range(n_writers) for i in range(n_calls)
    )
    exposures = read_table(tmp_path, EXPOSURES, columns=["request_id", "item_id"]).to_pylist()
    assert len(exposures) == len({(e["request_id"], e["item_id"]) for e in exposures})
    assert len(exposures) == 2 * n_writers * n_calls
    pids = {p.name.split("-")[1] for p in (tmp_path / EXPOSURES).rglob("*.parquet")}
    assert len(pids) == n_writers
    assert seen == sorted(seen)
    assert not [p for p in part_files(tmp_path) if not p.name.endswith(".parquet")]


def wait_for(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_buffers_are_written_on_interval_and_on_size_without_flush(tmp_path: Path) -> None:
    by_time = ServiceLog(tmp_path / "interval", flush_rows=1_000_000, flush_interval_s=0.2)
    by_size = ServiceLog(tmp_path / "size", flush_rows=10, flush_interval_s=3600)
    try:
        by_time.log_feedback(at(0), 1, 2, "click")
        for i in range(10):
            by_size.log_feedback(at(i), 1, i, "view")
        assert wait_for(lambda: read_table(tmp_path / "interval", FEEDBACK).num_rows == 1)
        assert wait_for(lambda: read_table(tmp_path / "size", FEEDBACK).num_rows == 10)
        by_size.log_feedback(at(11), 1, 11, "view")  # below flush_rows: stays buffered
        time.sleep(0.3)
        assert read_table(tmp_path / "size", FEEDBACK).num_rows == 10
    finally:
        by_time.close()
        by_size.close()
    assert read_table(tmp_path / "size", FEEDBACK).num_rows == 11  # close wrote the rest
    by_size.close()  # idempotent


def test_retention_deletes_only_partitions_older_than_the_limit(tmp_path: Path) -> None:
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    with ServiceLog(tmp_path) as log:
        for days_ago in (0, 3, 4, 40):
            ts = today - timedelta(days=days_ago)
            log.log_request(f"r{days_ago}", ts, 1, "m", path="online", latency_ms=1.0,
                            status=200, k=1)  # fmt: skip
            log.log_feedback(ts, 1, 1, "click")
    deleted = apply_retention(tmp_path, 30, today=today.date() - timedelta(days=1))
    assert sorted(p.name for p in deleted) == [f"date={(today - timedelta(40)).date()}"] * 2
    assert len(list((tmp_path / FEEDBACK).iterdir())) == 3

    with ServiceLog(tmp_path, retention_days=3, flush_interval_s=0.05):  # prunes on its own
        assert wait_for(lambda: len(list((tmp_path / REQUESTS).iterdir())) == 2)
    kept = read_table(tmp_path, REQUESTS, columns=["request_id"]).column("request_id")
    assert sorted(kept.to_pylist()) == ["r0", "r3"]
    assert apply_retention(tmp_path / "absent", 1, today=date(2024, 1, 1)) == []


def test_a_failed_write_is_counted_and_logged_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / REQUESTS).write_text("a file where the requests directory should be")
    log = ServiceLog(tmp_path)
    with caplog.at_level(logging.ERROR, logger="mlsd.monitoring.logs"):
        for i in range(3):
            log.log_request(f"r{i}", at(i), 1, "m", path="online", latency_ms=1.0, status=200, k=1)
        log.log_exposures("r0", at(0), 1, "m", [1, 2], [0.5, 0.4])
        log.flush()
    assert (log.dropped_rows, log.write_errors, log.written_rows) == (3, 1, 2)
    assert "could not write 3 requests rows" in caplog.text
    assert read_table(tmp_path, EXPOSURES).num_rows == 2  # the other tables are unaffected
    log.close()
    log.log_feedback(at(9), 1, 1, "click")  # after close: dropped and counted, not raised
    assert log.dropped_rows == 4


def test_a_value_that_does_not_fit_its_column_costs_only_its_own_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with ServiceLog(tmp_path) as log, caplog.at_level(logging.ERROR, "mlsd.monitoring.logs"):
        for i, k in enumerate([10, 40_000, 20]):  # k is int16
            log.log_request(f"r{i}", at(i), 1, "m", path="online", latency_ms=1.0, status=200, k=k)
        log.flush()
        assert (log.dropped_rows, log.write_errors, log.written_rows) == (1, 1, 2)
    assert "does not fit the schema" in caplog.text
    assert sorted(read_table(tmp_path, REQUESTS).column("k").to_pylist()) == [10, 20]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_log_dir_is_counted(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with ServiceLog(tmp_path / "logs") as log:
            log.log_feedback(at(0), 1, 1, "click")
            log.flush()
            assert (log.dropped_rows, log.write_errors) == (1, 1)
    finally:
        tmp_path.chmod(0o700)


def test_bad_arguments_are_caller_errors(tmp_path: Path) -> None:
    with ServiceLog(tmp_path) as log, pytest.raises(ValueError, match="score has 1 values for 2"):
        log.log_exposures("r", at(0), 1, "m", [1, 2], [0.5])
    with pytest.raises(ValueError, match="flush_rows >= 1"):
        ServiceLog(tmp_path, flush_rows=0)


def test_a_throttle_lets_one_event_through_per_interval_and_counts_the_rest() -> None:
    throttle = Throttle(0.2)
    assert throttle.ready() == 0  # the first one passes
    assert [throttle.ready() for _ in range(5)] == [None] * 5
    time.sleep(0.25)
    assert throttle.ready() == 5  # the next one says how many were held back
    assert throttle.ready() is None
