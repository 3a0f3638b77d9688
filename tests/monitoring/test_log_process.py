"""The service log written by a child process: same files as the in-process writer, flush and
close semantics, drops counted when the writer is gone, a killed writer replaced (with backoff
and one error, not one per batch), and no writer outliving its parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mlsd.config import ServiceLogSection
from mlsd.monitoring.log_process import WRITER_NICE, ProcessServiceLog
from mlsd.monitoring.log_reader import read_table
from mlsd.monitoring.logs import TABLES, LogWriter, ServiceLog

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def log_some(log: LogWriter, n: int) -> None:
    for i in range(n):
        ts = T0 + timedelta(seconds=i)
        log.log_request(f"r{i}", ts, i, "v1", path="online", latency_ms=1.5, status=200, k=3,
                        experiment="exp", arm="b", fallbacks=["features"])  # fmt: skip
        log.log_exposures(f"r{i}", ts, i, "v1", [i, i + 1, i + 2], [0.9, 0.5, 0.1],
                          sources=["als", "pop", "als"], experiment="exp", arm="b")  # fmt: skip
        log.log_candidates(f"r{i}", ts, i, "v1", [i, i + 7], [0.3, 0.2],
                           numeric={"age": np.array([1.0, 2.0])},
                           categorical={"genre": [i % 3, 1]})  # fmt: skip
        log.log_feedback(ts, i, i + 1, "click", request_id=f"r{i}")


def sorted_rows(table: pa.Table) -> list[dict[str, object]]:
    return sorted(
        table.to_pylist(), key=lambda row: (str(row["request_id"]), str(row.get("item_id")))
    )


def test_the_child_writes_exactly_what_the_in_process_writer_writes(tmp_path: Path) -> None:
    with ServiceLog(tmp_path / "thread") as reference:
        log_some(reference, 50)
    with ProcessServiceLog(tmp_path / "process", flush_rows=40) as log:
        log_some(log, 50)
        log.flush()  # everything logged so far is on disk when flush returns
        assert log.written_rows == 50 + 150 + 100 + 50
        for table in TABLES:
            assert (
                read_table(log.log_dir, table).num_rows
                == read_table(reference.log_dir, table).num_rows
            )
    assert not log.writer_alive
    for table in TABLES:
        got, want = read_table(log.log_dir, table), read_table(reference.log_dir, table)
        assert got.schema == want.schema
        assert sorted_rows(got) == sorted_rows(want)
    assert log.dropped_rows == 0
    assert log.write_errors == 0


def test_close_writes_what_is_left_and_later_calls_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = ProcessServiceLog(tmp_path, flush_interval_s=3600.0)  # only close writes
    log_some(log, 5)
    log.close()
    assert read_table(tmp_path, "exposures").num_rows == 15
    with caplog.at_level(logging.WARNING):
        log.log_feedback(T0, 1, 2, "click")
    assert log.dropped_rows == 1
    assert "the log is closed" in caplog.text
    log.close()  # a second close does nothing
    log.flush()  # nor does a flush after close


def test_the_writer_runs_at_a_lower_priority_than_the_service(tmp_path: Path) -> None:
    log = ProcessServiceLog(tmp_path)
    try:
        log_some(log, 1)
        log.flush()  # the child has started and written
        pid = log._writer.process.pid
        assert pid is not None
        child = os.getpriority(os.PRIO_PROCESS, pid)
        assert child == min(os.nice(0) + WRITER_NICE, 19)
    finally:
        log.close()


def test_a_dead_writer_costs_rows_never_a_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = ProcessServiceLog(tmp_path, max_queued_calls=4)
    log.flush()  # the child runs
    log._writer.process.kill()
    log._writer.process.join()
    with caplog.at_level(logging.WARNING):
        start = time.monotonic()
        for i in range(50):  # 4 calls wait, the rest are dropped
            log.log_feedback(T0, i, i, "click")
        calls_s = time.monotonic() - start
        log.flush()  # the waiting calls go to a new writer
        log.close()
    assert calls_s < 1.0
    assert log.dropped_rows > 0
    assert log.written_rows + log.dropped_rows == 50
    assert read_table(tmp_path, "feedback").num_rows == log.written_rows
    assert "too many calls wait" in caplog.text


@pytest.mark.slow
def test_a_killed_writer_is_replaced_with_backoff_and_one_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Children write only on flush, so a killed one has written nothing since the last flush
    # and every row is either on disk or counted as dropped.
    log = ProcessServiceLog(tmp_path, flush_rows=100_000, flush_interval_s=3600.0)
    logged = 0
    stop = threading.Event()

    def keep_logging() -> None:  # a request every 2 ms, as a service under load
        nonlocal logged
        while not stop.is_set():
            log.log_feedback(T0, logged, logged, "click")
            logged += 1
            time.sleep(0.002)

    def wait_for(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60.0
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    sender = threading.Thread(target=keep_logging)
    sender.start()
    try:
        wait_for(lambda: logged >= 100, "rows")
        log.flush()
        first_pid = log._writer.process.pid
        waits: list[float] = []
        with caplog.at_level(logging.ERROR, logger="mlsd.monitoring.log_process"):
            for _ in range(3):  # quick deaths in a row: restarts after 0, 1, 2 s
                pid = log._writer.process.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                wait_for(lambda: log.writer_restarts == len(waits) + 1, "a new writer")
                waits.append(time.monotonic() - killed)
            after_restart = logged
            wait_for(lambda: logged >= after_restart + 100, "rows after the restart")
    finally:
        stop.set()
        sender.join()
    log.flush()
    assert log.writer_alive
    assert log._writer.process.pid != first_pid
    assert waits[0] < 1.0  # the first death costs no wait
    assert waits[1] >= 1.0
    assert waits[2] >= 2.0
    # 3 s of batches failing every 20 ms and 3 deaths, one error: the rest are held back
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "died (exit code -9" in errors[0].getMessage()
    written = set(read_table(tmp_path, "feedback").column("item_id").to_pylist())
    assert set(range(after_restart, logged)) <= written  # the new writer writes again
    assert len(written) == log.written_rows
    assert log.written_rows + log.dropped_rows == logged
    log.close()


def test_invalid_options_fail_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_rows"):
        ProcessServiceLog(tmp_path, flush_rows=0)
    with pytest.raises(ValueError, match="max_queued_calls"):
        ProcessServiceLog(tmp_path, max_queued_calls=0)


def test_the_writer_outlives_no_parent_and_keeps_what_it_was_sent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, time
        from datetime import UTC, datetime
        from mlsd.monitoring.log_process import WRITER_NICE, ProcessServiceLog
        log = ProcessServiceLog({str(tmp_path)!r}, flush_interval_s=3600.0)
        for i in range(20):
            log.log_feedback(datetime(2024, 5, 1, tzinfo=UTC), i, i, "click")
        time.sleep(1.0)  # the queue's feeder thread has sent them
        print(log._writer.process.pid, flush=True)
        os._exit(0)  # no close, no atexit: the writer must notice alone
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    child = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 20.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the writer process outlived its parent"
    assert read_table(tmp_path, "feedback").num_rows == 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_the_config_picks_the_writer(tmp_path: Path) -> None:
    with ServiceLogSection().open(tmp_path / "a") as default:
        assert isinstance(default, ProcessServiceLog)
    with ServiceLogSection(writer="thread").open(tmp_path / "b") as threaded:
        assert isinstance(threaded, ServiceLog)
