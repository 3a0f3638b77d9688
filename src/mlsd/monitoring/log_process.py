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
dies (the OOM killer picks the process holding the buffers) → the sender notices within
``send_interval_s``, counts the rows the child held or never got as dropped, logs an error
and starts a new child. A child that dies again within ``_STABLE_S`` of its start is restarted
after 1, 2, 4 ... up to ``_MAX_RESTART_DELAY_S`` seconds, so one that cannot start does not
spin; rows logged meanwhile are dropped and counted, and the error is logged at most every
``_ERROR_EVERY_S``, so a writer that keeps dying cannot flood the service's own log either.
The serving process dies → the child notices within a second, writes what it holds and exits.
The child runs :data:`WRITER_NICE` lower in priority than the service, as the monitor's child
does: its Parquet writes are background work, and at the same priority on a loaded two-core
machine they took turns with the request threads.
:meth:`ProcessServiceLog.flush` returns once the child has written everything logged before
the call (tests and shutdown rely on it). Pickle crosses only the pipe between this process
and the child it spawned, as in :mod:`multiprocessing` itself; nothing pickled is stored.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from mlsd.backoff import backoff_s
from mlsd.monitoring.logs import ItemColumn, LogWriter, ServiceLog, Throttle, check_log_options

logger = logging.getLogger(__name__)

_WRITTEN, _DROPPED, _ERRORS, _FLUSHED = range(4)
_FLUSH = "flush"
_STOP = "stop"
_POLL_S = 0.5
_WARN_EVERY_S = 10.0
_ERROR_EVERY_S = 30.0
_STABLE_S = 60.0  # a child that lived this long did not die of starting: restart it at once
_MAX_RESTART_DELAY_S = 30.0

WRITER_NICE = 10
"""How much lower than the service the writer child's priority is (CFS weight 110 against
1024). Measured (``bench/serving.py``, two replicas, 1M items, 200 requests/s, runs
alternating, two each): online p99 19.4 and 21.4 ms against 58.4 and 38.0 at the same
priority, precomputed p99 (median of 3 rounds) 4.21 and 4.36 against 4.60 and 4.61 ms."""

Message = tuple[Any, ...]
"""A chunk ``(table, row, n, packed items)`` or a command ``(_FLUSH | _STOP, ticket)``."""

# Written by one child, read by the parent: no lock, because a child killed while holding the
# lock of a synchronized array would block every later read of the parent.
Counters = ctypes.Array[ctypes.c_int64]


@dataclass
class _Writer:
    """One writer process, the parent's end of its pipe, its counters and what it was sent."""

    process: BaseProcess
    pipe: Connection
    counters: Counters
    started: float  # time.monotonic()
    sent_rows: int = 0
    sent_ticket: int = 0  # the last flush ticket sent
    buried: bool = False  # its counters and losses are counted in the parent's totals

    def lost_rows(self) -> int:
        """Rows sent to this (stopped) writer that it neither wrote nor counted as dropped."""
        return max(0, self.sent_rows - self.counters[_WRITTEN] - self.counters[_DROPPED])


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
        self._options = options
        self._lock = threading.Lock()  # guards everything below
        self._pending: list[Message] = []
        self._in_flight = 0  # calls taken by the sender, not yet written to the pipe
        self._closed = False
        self._flushes = 0
        self._abandoned_ticket = 0  # flushes no writer will answer: it died first
        self._local_drops = 0
        self._drop_warnings = Throttle(_WARN_EVERY_S)
        self._gone = [0, 0, 0]  # rows written, rows dropped, write errors of buried writers
        self._restarts = 0
        # Only the sender thread touches these: restart backoff and error rate limit.
        self._quick_failures = 0
        self._restart_at = 0.0
        self._errors = Throttle(_ERROR_EVERY_S)
        self._wake = threading.Event()
        self._writer = self._start_writer(flushed=0)
        self._sender = threading.Thread(target=self._send_loop, name="mlsd-log-send", daemon=True)
        self._sender.start()
        atexit.register(self.close)

    @property
    def written_rows(self) -> int:
        return self._count(_WRITTEN)

    @property
    def dropped_rows(self) -> int:
        return self._count(_DROPPED) + self._local_drops

    @property
    def write_errors(self) -> int:
        return self._count(_ERRORS)

    def _count(self, counter: int) -> int:
        with self._lock:
            writer = self._writer
            return self._gone[counter] + (0 if writer.buried else int(writer.counters[counter]))

    @property
    def writer_alive(self) -> bool:
        """Whether the writer process runs."""
        return self._writer.process.is_alive()

    @property
    def writer_restarts(self) -> int:
        """How many times a writer process that died was replaced."""
        return self._restarts

    def _start_writer(self, *, flushed: int) -> _Writer:
        """Spawn a writer process; ``flushed`` is the last flush ticket answered so far."""
        context = mp.get_context("spawn")  # the service runs threads: never fork it
        receiver, pipe = context.Pipe(duplex=False)
        counters = context.RawArray(ctypes.c_int64, 4)
        counters[_FLUSHED] = flushed
        process = context.Process(
            target=run_writer,
            args=(str(self.log_dir), self._options, receiver, counters),
            name="mlsd-service-log",
            daemon=True,
        )
        process.start()
        receiver.close()  # the child's end
        return _Writer(process, pipe, counters, started=time.monotonic())

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
            if self._drop_warnings.ready() is None:
                return
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
        while self._writer.counters[_FLUSHED] < ticket:
            if self._abandoned_ticket >= ticket:
                logger.warning(
                    "service log: the writer process under %s died before it wrote the rows "
                    "logged before this flush; they are counted as dropped",
                    self.log_dir,
                )
                return
            if time.monotonic() > deadline:
                logger.warning("service log: flush under %s timed out", self.log_dir)
                return
            time.sleep(0.002)

    def close(self) -> None:
        """Let the child write what it holds and exit (``timeout_s`` at most, then it is
        killed and the rows it held are counted as dropped); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.append((_STOP, 0))
        self._wake.set()
        self._sender.join(self.timeout_s)
        writer = self._writer
        writer.process.join(self.timeout_s)
        if writer.process.is_alive():
            logger.error("service log: the writer process under %s did not stop", self.log_dir)
            writer.process.kill()
            writer.process.join()
        self._bury(writer)
        writer.pipe.close()
        atexit.unregister(self.close)

    def _send_loop(self) -> None:
        """Ship what was logged every ``send_interval_s`` (at once after a flush or close)."""
        while True:
            self._wake.wait(self.send_interval_s)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
                self._in_flight = len(batch)
            if not self._writer.process.is_alive():
                self._replace_writer()
            if batch:
                self._send(batch)
                with self._lock:
                    self._in_flight = 0
            if any(m[0] == _STOP for m in batch if len(m) == 2):
                return

    def _send(self, batch: list[Message]) -> None:
        """Write one batch to the writer's pipe; if the writer is gone, count its rows dropped."""
        writer = self._writer
        rows = sum(m[2] for m in batch if len(m) == 4)
        ticket = max((m[1] for m in batch if len(m) == 2 and m[0] == _FLUSH), default=0)
        try:
            writer.pipe.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError):  # it died: the next tick reports it and starts a new one
            with self._lock:
                self._local_drops += rows
                self._abandoned_ticket = max(self._abandoned_ticket, ticket)
            return
        with self._lock:
            writer.sent_rows += rows
            writer.sent_ticket = max(writer.sent_ticket, ticket)

    def _bury(self, writer: _Writer) -> int:
        """Add a stopped writer's counters to the totals and count the rows it lost as
        dropped (once per writer); returns those rows."""
        with self._lock:
            if writer.buried:
                return 0
            writer.buried = True
            for counter in (_WRITTEN, _DROPPED, _ERRORS):
                self._gone[counter] += int(writer.counters[counter])
            lost = writer.lost_rows()
            self._local_drops += lost
            self._abandoned_ticket = max(self._abandoned_ticket, writer.sent_ticket)
        return lost

    def _replace_writer(self) -> None:
        """Account for the dead writer and start a new one once its backoff has passed."""
        dead, now = self._writer, time.monotonic()
        if not dead.buried:
            lost = self._bury(dead)
            self._back_off(now, quick=now - dead.started < _STABLE_S)
            self._report(
                "service log: the writer process under %s died (exit code %s; -9 is SIGKILL, "
                "e.g. the OOM killer); %d rows it held are counted as dropped; a new one starts "
                "in %.0f s. If this repeats, check the machine's memory and the log directory",
                self.log_dir, dead.process.exitcode, lost, self._restart_at - now,
            )  # fmt: skip
        if now < self._restart_at:
            return
        try:
            writer = self._start_writer(flushed=int(dead.counters[_FLUSHED]))
        except OSError as error:  # e.g. no memory to spawn: try again later
            self._back_off(now, quick=True)
            self._report(
                "service log: could not start a writer process under %s (%s); rows are dropped "
                "until one starts; next try in %.0f s",
                self.log_dir, error, self._restart_at - now,
            )  # fmt: skip
            return
        with self._lock:
            self._writer = writer
            self._restarts += 1
        dead.pipe.close()

    def _back_off(self, now: float, *, quick: bool) -> None:
        """Restart at once after a writer that ran a while; after quick failures in a row
        wait 1, 2, 4 ... up to ``_MAX_RESTART_DELAY_S`` seconds."""
        self._quick_failures = self._quick_failures + 1 if quick else 0
        delay = 0.0
        if self._quick_failures > 1:
            delay = backoff_s(self._quick_failures - 2, base_s=1.0, cap_s=_MAX_RESTART_DELAY_S)
        self._restart_at = now + delay

    def _report(self, message: str, *args: object) -> None:
        """Log an error at most every ``_ERROR_EVERY_S``, with how many were held back."""
        suppressed = self._errors.ready()
        if suppressed is None:
            return
        logger.error(
            message + " (%d such errors not logged in the last %.0f s)",
            *args, suppressed, _ERROR_EVERY_S,
        )  # fmt: skip


def run_writer(
    log_dir: str,
    options: dict[str, Any],
    calls: Connection,
    counters: Counters,
) -> None:
    """The child: feed every shipped chunk to a :class:`ServiceLog` until told to stop or the
    parent is gone; then write what is left."""
    os.nice(WRITER_NICE)
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
