"""Online-store pushes applied by a child process, so that a large batch of events does not
hold the serving process's GIL.

A push (:meth:`~mlsd.features.online.OnlineFeatures.push_events`) has a vectorised part (checks,
deduplication, ordering, the items' categories) and a per-user part in Python: read the users'
stored states, fold each user's events in, write the new states. For a batch of 10,000 events
of distinct users the second part is seconds of CPU, and in the serving process every second
of it takes turns at the GIL with the request threads: recommendations went from 4.1 ms p50 to
43 ms (2.1 s at worst) while such a batch was pushed.

:class:`PushProcess` moves the per-user part to a spawned child with its own
:class:`~mlsd.features.online.OnlineFeatures` on the same repository (the same online store,
SQLite file or Redis). The serving process still does the checks, so a bad event is refused
naming its row before anything is sent, and sends the :class:`~mlsd.features.online.
PreparedPush` (six flat arrays) over a pipe; the child applies it and replies with the events
applied, and the caller returns then, so a client that posted events and then asks for
recommendations sees them, as before. One push at a time: the child is one thread (pushes
within one process were already serialised on SQLite; on Redis each push is still a
compare-and-set, so replicas' children do not lose each other's events).

Failure modes: the push raises in the child → the call raises the same type for the usual ones
(:class:`~mlsd.data.schema.ContractError`, ``ValueError``; any other as ``RuntimeError``), its
message naming the child's exception type, and the child keeps serving; the push not taken
and answered within ``timeout_s`` (a stalled store; ``[feature_store] push_timeout_s``) → the
child is killed (a write is one SQLite transaction or one Redis ``MULTI``/``EXEC``: nothing is
left half written) and the call raises ``TimeoutError``; the child died → the call raises,
naming its exit code. Either way the next push starts a new child. The child ignores SIGINT
and SIGTERM (a Ctrl-C or a signal to the whole process group reaches it while the service
still finishes its requests): the service stops it at shutdown, and when the serving process
dies the child sees its pipe close, or within a second that its parent is gone, and exits.
Pickle crosses only the pipe between this process and the child it spawned, as in
:mod:`multiprocessing` itself.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from mlsd.data.schema import ContractError
from mlsd.features.definitions import FeatureConfig
from mlsd.features.online import PreparedPush

__all__ = ["PushProcess"]

logger = logging.getLogger(__name__)

_POLL_S = 0.5
"""How often an idle child checks that its parent is alive."""
_WAIT_S = 0.02
"""How often a waiting caller checks that the child is alive."""
_ERRORS: dict[str, type[Exception]] = {
    "ContractError": ContractError,
    "ValueError": ValueError,
}


@dataclass
class _Child:
    process: BaseProcess
    pipe: Connection
    ready: bool = False


class PushProcess:
    """:meth:`~mlsd.features.online.OnlineFeatures.apply_push` in a child process.

    Args:
        repo_dir: The Feast repository the child opens.
        config: The feature config the child's ``OnlineFeatures`` checks against it.
        timeout_s: How long a push may take before the child is killed and the call raises.
        start_timeout_s: How long a new child may take to open the store (imports and
            Feast's registry) before the push waiting for it raises.
    """

    def __init__(
        self,
        repo_dir: Path,
        config: FeatureConfig,
        *,
        timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        if not timeout_s > 0 or not start_timeout_s > 0:
            raise ValueError(f"timeouts must be > 0, got {timeout_s} and {start_timeout_s}")
        self.repo_dir, self.config = Path(repo_dir), config
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._lock = threading.Lock()  # one push at a time; guards everything below
        self._ticket = 0
        self._closed = False
        self.restarts = 0
        """Children started after the first (one died, failed or timed out)."""
        self._child: _Child | None = self._start()
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child.process.pid

    def _start(self) -> _Child:
        context = mp.get_context("spawn")  # the service runs threads: never fork it
        pipe, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=run_pusher,
            args=(str(self.repo_dir), self.config, child_end),
            name="mlsd-push",
            daemon=True,
        )
        process.start()
        child_end.close()  # the child's end
        return _Child(process, pipe)

    def push(self, push: PreparedPush) -> int:
        """Apply ``push`` in the child; returns the events applied.

        Raises:
            ContractError | ValueError | RuntimeError: the push failed in the child.
            TimeoutError: no answer within ``timeout_s`` (the child is replaced).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the push process is closed")
            child = self._child
            if child is None or not child.process.is_alive():
                if child is not None:
                    self._kill(child)
                child = self._child = self._start()
                self.restarts += 1
            try:
                if not child.ready:
                    opening = "open the feature store"
                    self._reply(child, 0, self.start_timeout_s, opening)
                    child.ready = True
                self._ticket += 1
                deadline = time.monotonic() + self.timeout_s
                self._send(child, (self._ticket, push), deadline)
                applied: int = self._reply(child, self._ticket, self.timeout_s, "apply a push")
                return applied
            except (TimeoutError, EOFError, OSError) as error:
                self._kill(child)
                self._child = None
                if isinstance(error, TimeoutError):
                    raise
                raise RuntimeError(f"the push process died: {error}; retry") from error

    def _send(self, child: _Child, message: tuple[int, PreparedPush], deadline: float) -> None:
        """Write ``message`` to the child within ``deadline`` (``time.monotonic()``): a large
        push is more than the pipe holds, and a child that reads nothing (stopped, hung)
        would block the write, and with it every later push and :meth:`close`."""
        failed: list[BaseException] = []

        def send() -> None:
            try:
                child.pipe.send(message)
            except BaseException as error:  # handed to the caller below
                failed.append(error)

        sender = threading.Thread(target=send, name="mlsd-push-send", daemon=True)
        sender.start()
        sender.join(max(0.0, deadline - time.monotonic()))
        if sender.is_alive():
            child.process.kill()  # which ends the blocked write
            sender.join()
            raise TimeoutError(self._late("take a push", self.timeout_s))
        if failed:
            raise failed[0]

    def _reply(self, child: _Child, ticket: int, timeout_s: float, doing: str) -> Any:
        """The child's answer to ``ticket`` (older answers, of calls that timed out, are
        skipped) within ``timeout_s``; raises the child's error, ``TimeoutError``, or
        ``EOFError`` when it died."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                answer = child.pipe.recv() if child.pipe.poll(_WAIT_S) else None
            except (EOFError, OSError):
                child.process.join(1.0)  # for its exit code
                raise EOFError(self._exited(child, doing)) from None
            if answer is not None:
                if answer[0] != ticket:
                    continue
                if answer[1] == "ok":
                    return answer[2]
                kind, message = answer[2], answer[3]
                error = RuntimeError if ticket == 0 else _ERRORS.get(kind, RuntimeError)
                raise error(f"{message} (in the push process, to {doing}: {kind})")
            if not child.process.is_alive():
                raise EOFError(self._exited(child, doing))
            if time.monotonic() > deadline:
                raise TimeoutError(self._late(doing, timeout_s))

    @staticmethod
    def _exited(child: _Child, doing: str) -> str:
        code = child.process.exitcode
        return (
            f"pid {child.process.pid} exited (code {'unknown' if code is None else code}; -9 is "
            f"SIGKILL, e.g. the OOM killer) before it could {doing}"
        )

    @staticmethod
    def _late(doing: str, timeout_s: float) -> str:
        return (
            f"the push process did not {doing} within {timeout_s:g} s (a stalled online store? "
            "[feature_store] push_timeout_s sets the limit); it was restarted, and the events "
            "may not be applied: retry"
        )

    @staticmethod
    def _kill(child: _Child) -> None:
        child.process.kill()
        child.process.join()
        child.pipe.close()

    def close(self) -> None:
        """Stop the child once the push in flight is done (after ``timeout_s`` at most: then
        it is killed); later pushes raise. Idempotent."""
        locked = self._lock.acquire(timeout=self.timeout_s)
        try:
            if self._closed:
                return
            self._closed = True
            child, self._child = self._child, None
        finally:
            if locked:
                self._lock.release()
        atexit.unregister(self.close)
        if child is None:
            return
        if not locked:  # a push still runs: end it (it raises), then the child
            self._kill(child)
            return
        with contextlib.suppress(OSError, ValueError):  # it is gone already
            child.pipe.send(None)
        child.process.join(5.0)
        self._kill(child)  # when it did not stop


def run_pusher(repo_dir: str, config: FeatureConfig, pipe: Connection) -> None:
    """The child: open the store, answer ticket 0 (ready, or why not), then apply each
    ``(ticket, PreparedPush)`` and answer ``(ticket, "ok", applied)`` or ``(ticket, "error",
    type name, message)``, until told to stop (``None``) or the parent is gone."""
    from mlsd.features.online import OnlineFeatures

    # Stopped by its parent (a message, or the parent gone): a Ctrl-C or a SIGTERM sent to the
    # whole process group must not kill a push the service is still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        online = OnlineFeatures(Path(repo_dir), config)
    except Exception as error:
        pipe.send((0, "error", type(error).__name__, str(error)))
        return
    pipe.send((0, "ok", None))
    parent = mp.parent_process()
    while True:
        if not pipe.poll(_POLL_S):
            if parent is not None and not parent.is_alive():
                return
            continue
        try:
            message = pipe.recv()
        except EOFError:  # the parent closed its end (or died)
            return
        if message is None:
            online.close()  # the parent's close: fold the log back in (OnlineFeatures.close)
            return
        ticket, push = message
        try:
            answer: tuple[Any, ...] = (ticket, "ok", online.apply_push(push))
        except Exception as error:
            logger.exception("push process: a push failed")
            answer = (ticket, "error", type(error).__name__, str(error))
        pipe.send(answer)
