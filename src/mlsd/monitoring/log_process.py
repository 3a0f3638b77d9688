"""The service log written by a child process, so that no flush ever runs in the serving process.

:class:`~mlsd.monitoring.logs.ServiceLog` flushes from a thread of the process it logs for:
every couple of seconds that thread turns a few thousand buffered rows into Arrow and Parquet,
and the Python parts of that hold the GIL. On a loaded two-core machine the OS can deschedule
the writer while it holds the GIL, and then every request thread of the service waits for it:
the median request does not notice, but p99 at 200 requests/s does (bench/monitoring.py).

:class:`ProcessServiceLog` keeps the request path's side as cheap as before (each ``log_*``
call checks and packs its arguments into one chunk, as ``ServiceLog`` does, and appends it to a
list under a lock). One sender thread ships the list every ``send_interval_s`` (20 ms) as one
pickled message over a pipe: per-call messages cost a thread wake-up, a pickle and a write per
call, which measurably slowed the median request of a fast model; a batch costs them once per
interval. A spawned child process feeds a plain ``ServiceLog``, which does all the buffering,
conversion and writing with the same files, rotation and retention. The child publishes its
counters (rows written, rows dropped, write errors) in shared memory, so ``/metrics`` reports
them as before.

Failure modes, none of which raises into the request path: more than ``max_queued_calls``
calls wait (the child is slow or gone) → the call's rows are dropped and counted; the child
dies → an error, and the rows it never got are counted as dropped; the serving process dies →
the child notices within a second, writes what it holds and exits.
:meth:`ProcessServiceLog.flush` returns once the child has written everything logged before
the call (tests and shutdown rely on it). Pickle crosses only the pipe between this process
and the child it spawned, as in :mod:`multiprocessing` itself; nothing pickled is stored.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.monitoring.logs import ItemColumn, LogWriter, ServiceLog, check_log_options

logger = logging.getLogger(__name__)

_WRITTEN, _DROPPED, _ERRORS, _FLUSHED = range(4)
_FLUSH = "flush"
_STOP = "stop"
_POLL_S = 0.5
_WARN_EVERY_S = 10.0

Message = tuple[Any, ...]
"""A chunk ``(table, row, n, packed items)`` or a command ``(_FLUSH | _STOP, ticket)``."""


class ProcessServiceLog(LogWriter):
    """The :class:`~mlsd.monitoring.logs.ServiceLog` API; a child process does the writing.

    Args:
        log_dir: Root directory of the log tables.
        max_queued_calls: ``log_*`` calls that may wait for the child; further calls are
            dropped (and counted) rather than blocking a request or exhausting memory.
        send_interval_s: How often the sender thread ships the calls logged meanwhile.
        timeout_s: How long :meth:`flush` and :meth:`close` wait for the child.
        **options: ``ServiceLog``'s own options (``flush_rows``, ``flush_interval_s``,
            ``retention_days``, ``max_buffered_rows``), checked here, used by the child.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        max_queued_calls: int = 100_000,
        send_interval_s: float = 0.02,
        timeout_s: float = 60.0,
        **options: Any,
    ) -> None:
        options = check_log_options(**options)
        if max_queued_calls < 1:
            raise ValueError(f"max_queued_calls must be >= 1, got {max_queued_calls}")
        if not send_interval_s > 0:
            raise ValueError(f"send_interval_s must be > 0, got {send_interval_s}")
        self.log_dir = Path(log_dir)
        self.flush_rows: int = options["flush_rows"]
        self.flush_interval_s: float = options["flush_interval_s"]
        self.retention_days: int | None = options["retention_days"]
        self.max_buffered_rows: int = options["max_buffered_rows"]
        self.max_queued_calls = max_queued_calls
        self.send_interval_s = send_interval_s
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")  # the service runs threads: never fork it
        receiver, self._pipe = context.Pipe(duplex=False)
        self._counters: SynchronizedArray[int] = context.Array("q", 4)
        self._lock = threading.Lock()  # guards everything below
        self._pending: list[Message] = []
        self._in_flight = 0  # calls taken by the sender, not yet written to the pipe
        self._closed = False
        self._flushes = 0
        self._local_drops = 0
        self._last_warning = -_WARN_EVERY_S
        self._wake = threading.Event()
        self._process = context.Process(
            target=run_writer,
            args=(str(self.log_dir), options, receiver, self._counters),
            name="mlsd-service-log",
            daemon=True,
        )
        self._process.start()
        receiver.close()  # the child's end
        self._sender = threading.Thread(target=self._send_loop, name="mlsd-log-send", daemon=True)
        self._sender.start()
        atexit.register(self.close)

    @property
    def written_rows(self) -> int:
        return int(self._counters[_WRITTEN])

    @property
    def dropped_rows(self) -> int:
        return int(self._counters[_DROPPED]) + self._local_drops

    @property
    def write_errors(self) -> int:
        return int(self._counters[_ERRORS])

    @property
    def writer_alive(self) -> bool:
        """Whether the writer process runs."""
        return self._process.is_alive()

    def _append(
        self, table: str, row: tuple[Any, ...], n: int, items: dict[str, ItemColumn]
    ) -> None:
        with self._lock:
            if self._closed:
                why = "the log is closed"
            elif len(self._pending) + self._in_flight >= self.max_queued_calls:
                why = "too many calls wait (the writer process is slow or gone)"
            else:
                self._pending.append((table, row, n, _pack(items)))
                return
            self._local_drops += n
            now = time.monotonic()
            if now - self._last_warning < _WARN_EVERY_S:
                return
            self._last_warning = now
        logger.warning(
            "service log: dropping %s rows under %s: %s (%d dropped so far)",
            table, self.log_dir, why, self.dropped_rows,
        )  # fmt: skip

    def flush(self) -> None:
        """Return once the child wrote every row logged before this call (or ``timeout_s``
        passed, or the child is gone: then a warning); never raises."""
        with self._lock:
            if self._closed:
                return
            self._flushes += 1
            ticket = self._flushes
            self._pending.append((_FLUSH, ticket))
        self._wake.set()
        deadline = time.monotonic() + self.timeout_s
        while self._counters[_FLUSHED] < ticket:
            if not self._process.is_alive():
                logger.warning("service log: the writer process under %s is gone", self.log_dir)
                return
            if time.monotonic() > deadline:
                logger.warning("service log: flush under %s timed out", self.log_dir)
                return
            time.sleep(0.002)

    def close(self) -> None:
        """Let the child write what it holds and exit (``timeout_s`` at most, then it is
        killed and the rows it held are lost); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.append((_STOP, 0))
        self._wake.set()
        self._sender.join(self.timeout_s)
        self._process.join(self.timeout_s)
        if self._process.is_alive():
            logger.error("service log: the writer process under %s did not stop", self.log_dir)
            self._process.kill()
            self._process.join()
        self._pipe.close()
        atexit.unregister(self.close)

    def _send_loop(self) -> None:
        """Ship what was logged every ``send_interval_s`` (at once after a flush or close)."""
        while True:
            self._wake.wait(self.send_interval_s)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
                self._in_flight = len(batch)
            if batch:
                try:
                    self._pipe.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):  # the child is gone: count what it never got
                    calls = [m for m in batch if len(m) == 4]
                    with self._lock:
                        self._local_drops += sum(m[2] for m in calls)
                    if not self._process.is_alive():
                        logger.error("service log: the writer process under %s is gone",
                                     self.log_dir)  # fmt: skip
                with self._lock:
                    self._in_flight = 0
            if any(m[0] == _STOP for m in batch if len(m) == 2):
                return


def run_writer(
    log_dir: str,
    options: dict[str, Any],
    calls: Connection,
    counters: SynchronizedArray[int],
) -> None:
    """The child: feed every shipped chunk to a :class:`ServiceLog` until told to stop or the
    parent is gone; then write what is left."""
    log = ServiceLog(log_dir, **options)
    parent = mp.parent_process()

    def publish() -> None:
        counters[_WRITTEN] = log.written_rows
        counters[_DROPPED] = log.dropped_rows
        counters[_ERRORS] = log.write_errors

    try:
        while True:
            if not calls.poll(_POLL_S):
                publish()
                if parent is not None and not parent.is_alive():
                    return
                continue
            try:
                batch: list[Message] = pickle.loads(calls.recv_bytes())
            except EOFError:  # the parent closed its end (or died)
                return
            for message in batch:
                if len(message) == 2:
                    command, ticket = message
                    if command == _STOP:
                        return
                    log.flush()
                    publish()
                    counters[_FLUSHED] = ticket
                    continue
                table, row, n, items = message
                log._append(table, row, n, _unpack(items))
            publish()
    finally:
        log.close()
        publish()


def _pack(items: dict[str, ItemColumn]) -> dict[str, Any]:
    """Arrays as (dtype, bytes): pickling three small arrays as ndarrays costs ~25 µs each,
    as bytes well under one."""
    return {
        name: (values.dtype.str, values.tobytes()) if isinstance(values, np.ndarray) else values
        for name, values in items.items()
    }


def _unpack(items: dict[str, Any]) -> dict[str, ItemColumn]:
    return {
        name: np.frombuffer(values[1], dtype=values[0]) if isinstance(values, tuple) else values
        for name, values in items.items()
    }
