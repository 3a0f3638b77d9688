"""Pushes applied by a child process: the same states as in process, errors that come back
with their type, and a child that is replaced when it dies or stalls and goes when its parent
does."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from mlsd.data.schema import ContractError
from mlsd.features.definitions import FeatureConfig
from mlsd.features.online import OnlineFeatures, PreparedPush
from mlsd.features.push_process import PushProcess
from tests.features.test_online import AS_OF, BACKENDS, _event, make_repo

NEW_USER = 10**9 + 7


def _one_push() -> PreparedPush:
    zero = np.zeros(1, dtype=np.int64)
    return PreparedPush(zero, zero, zero, zero, np.zeros(1), zero)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether process ``pid`` exits (or is a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def repo(
    request: pytest.FixtureRequest, tmp_path: Path, world: Path, config: FeatureConfig
) -> Path:
    return make_repo(request, tmp_path, world, config, "sqlite")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_push_through_the_child_writes_what_a_push_in_process_writes(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    world: Path,
    config: FeatureConfig,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two stores materialized alike, the same events: one pushed here, one through the
    child; every user's state is the same. This process never applies the child's push."""
    here = OnlineFeatures(make_repo(request, tmp_path / "here", world, config, backend), config)
    there = OnlineFeatures(make_repo(request, tmp_path / "there", world, config, backend), config)
    rng = np.random.default_rng(3)
    n = 400
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 60, n),
            "item_id": rng.integers(0, 100, n),
            "ts": AS_OF + pd.to_timedelta(rng.integers(0, 7_200, n), unit="s"),
            "event": "click",
            "value": rng.random(n),
        }
    )
    applied_here = here.push_events(events)
    there.start_push_process()
    try:
        monkeypatch.setattr(OnlineFeatures, "apply_push", _refuse)
        assert there.push_events(events) == applied_here > 300
        for user_id in range(60):
            got, want = there.user_features(user_id), here.user_features(user_id)
            for name, value in want.items():
                np.testing.assert_array_equal(got[name], value, err_msg=f"{user_id} {name}")
        assert there.push_events(events) == 0  # retries: already stored
    finally:
        there.close()
    monkeypatch.undo()
    assert there.push_events(_event(NEW_USER, 5, AS_OF)) == 1  # in process again after close


def test_only_a_push_process_switches_a_sqlite_store_to_write_ahead_logging(
    repo: Path, config: FeatureConfig
) -> None:
    def mode() -> str:
        with contextlib.closing(sqlite3.connect(repo / "online.db")) as db:
            return str(db.execute("PRAGMA journal_mode").fetchone()[0])

    reader = OnlineFeatures(repo, config)
    reader.user_features(1)
    assert mode() == "delete"  # a reader leaves the file as it is
    reader.start_push_process()
    try:
        assert mode() == "wal"
        assert reader.push_events(_event(NEW_USER, 5, AS_OF)) == 1
        assert (repo / "online.db-wal").stat().st_size > 0
    finally:
        reader.close()
    # Every connection closed: the log is folded back in, not left for the next opener.
    assert not (repo / "online.db-wal").exists()
    assert reader.user_features(NEW_USER)["recent_item_ids"][0][0] == 5


def _refuse(self: OnlineFeatures, push: PreparedPush) -> int:
    raise AssertionError("applied in the serving process")


def test_bad_events_are_refused_here_and_a_failed_push_leaves_the_child_serving(
    repo: Path, config: FeatureConfig
) -> None:
    online = OnlineFeatures(repo, config)
    online.start_push_process()
    pusher = online._pusher
    assert pusher is not None
    try:
        with pytest.raises(ContractError, match="after the clock"):
            online.push_events(
                _event(NEW_USER, 5, pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1))
            )
        with pytest.raises(ContractError, match="item_id"):
            online.push_events(_event(NEW_USER, 5, AS_OF).drop(columns=["item_id"]))
        prepared = online.prepare_push(_event(NEW_USER, 5, AS_OF))
        assert prepared is not None
        pid = pusher.pid
        broken = PreparedPush(**{**vars(prepared), "category_index": np.array([10**6])})
        with pytest.raises(RuntimeError, match="to apply a push: IndexError"):
            pusher.push(broken)  # a category no user state has room for
        assert online.push_events(_event(NEW_USER, 5, AS_OF)) == 1
        assert pusher.pid == pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # a Ctrl-C for the whole process group: the child stays
        os.kill(pid, signal.SIGTERM)
        assert online.push_events(_event(NEW_USER, 6, AS_OF + pd.Timedelta(seconds=1))) == 1
        assert pusher.pid == pid
        assert pusher.restarts == 0
        assert online.user_features(NEW_USER)["recent_item_ids"][0][:2].tolist() == [6, 5]
    finally:
        online.close()


def test_a_dead_or_stalled_child_is_replaced(
    repo: Path, config: FeatureConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "temp"  # the children's temp folder, where Feast makes its own
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    online = OnlineFeatures(repo, config)
    online.start_push_process(timeout_s=2.0)
    pusher = online._pusher
    assert pusher is not None
    try:
        assert online.push_events(_event(NEW_USER, 1, AS_OF)) == 1
        first = pusher.pid
        assert first is not None
        assert first != os.getpid()
        os.kill(first, signal.SIGKILL)
        child = pusher._child
        assert child is not None
        child.process.join(10)  # its threads can take a moment to go
        assert not child.process.is_alive()
        assert online.push_events(_event(NEW_USER, 2, AS_OF + pd.Timedelta(seconds=1))) == 1
        second = pusher.pid
        assert second not in (None, first)
        assert pusher.restarts == 1
        os.kill(second, signal.SIGSTOP)  # a stalled store: no answer
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not apply a push within 2 s"):
            online.push_events(_event(NEW_USER, 3, AS_OF + pd.Timedelta(seconds=2)))
        assert time.monotonic() - started < 4
        assert second is not None
        assert _gone(second)  # killed, not left stopped
        assert online.push_events(_event(NEW_USER, 4, AS_OF + pd.Timedelta(seconds=3))) == 1
        assert pusher.restarts == 2
        recent = online.user_features(NEW_USER)["recent_item_ids"][0]
        assert recent[:2].tolist() == [4, 2]  # the stalled push was not applied
        # A push larger than the pipe holds, to a child that reads nothing: the write itself
        # must give up in time, or it would hold every later push (and close) forever.
        third = pusher.pid
        assert third is not None
        os.kill(third, signal.SIGSTOP)
        n = 20_000
        many = pd.DataFrame(
            {"user_id": range(n), "item_id": 7, "ts": AS_OF, "event": "click", "value": 1.0}
        )
        big = online.prepare_push(many)
        assert big is not None
        assert len(pickle.dumps(big)) > 900_000  # a socket pair holds about 200 KB
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="did not take a push within 2 s"):
            pusher.push(big)
        assert time.monotonic() - started < 4
        assert _gone(third)
        assert online.push_events(_event(NEW_USER, 5, AS_OF + pd.Timedelta(seconds=5))) == 1
        assert pusher.restarts == 3
    finally:
        started = time.monotonic()
        online.close()
        assert time.monotonic() - started < 6
    assert pusher.pid is None
    with pytest.raises(RuntimeError, match="closed"):
        pusher.push(_one_push())
    assert not list(temp.iterdir())  # three killed children: no Feast folder left behind


def test_a_child_whose_store_cannot_open_fails_the_push_naming_why(
    repo: Path, config: FeatureConfig
) -> None:
    pusher = PushProcess(repo / "missing", config)
    try:
        with pytest.raises(
            RuntimeError, match=r"not found.*to open the feature store: ContractError"
        ):
            pusher.push(_one_push())
    finally:
        pusher.close()


def test_the_child_exits_when_its_parent_dies(repo: Path, config: FeatureConfig) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mlsd.features.online import OnlineFeatures
        from mlsd.features.definitions import FeatureConfig
        import pandas as pd
        online = OnlineFeatures(Path({str(repo)!r}), FeatureConfig(**{vars(config)!r}))
        online.start_push_process()
        event = {{"user_id": [{NEW_USER}], "item_id": [3], "event": ["click"], "value": [1.0]}}
        online.push_events(pd.DataFrame({{**event, "ts": [pd.Timestamp({str(AS_OF)!r})]}}))
        print(online._pusher.pid, flush=True)  # an idle child, its store open
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _gone(int(done.stdout.split()[0]), timeout_s=5.0)
