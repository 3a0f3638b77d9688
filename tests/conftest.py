"""Shared fixtures: where the public datasets live, and small contract directories."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Public datasets: ``$MLSD_DATA_DIR``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MLSD_DATA_DIR", REPO.parent / "shared" / "data"))


def required_dir(path: Path, reason: str) -> Path:
    """``path`` when it is a folder; else skips the test outside CI and fails it in CI."""
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def dataset_path(name: str) -> Path:
    """Path of one public dataset; skips outside CI when it is missing, fails in CI."""
    path = shared_data_dir() / name
    return required_dir(
        path, f"dataset {name!r} not found at {path}; set MLSD_DATA_DIR to the folder holding it"
    )


@pytest.fixture
def ml100k_dir() -> Path:
    """The unpacked MovieLens 100K folder (``u.data``, ``u.user``, ``u.item``, ...)."""
    return dataset_path("movielens-100k")


@pytest.fixture
def ml_latest_small_dir() -> Path:
    """The unpacked MovieLens latest-small folder (``ratings.csv``, ``movies.csv``, ...)."""
    return dataset_path("movielens-latest-small")


@pytest.fixture
def recbole_ml100k_dir() -> Path:
    """RecBole's exact ML-100K splits (``protoA_train.tsv`` ...): ``$MLSD_PEERS_DIR``, else
    ``../shared/peers`` beside the repository; skips outside CI when missing, fails in CI."""
    path = Path(os.environ.get("MLSD_PEERS_DIR", REPO.parent / "shared" / "peers"))
    path = path / "recbole-ml100k"
    return required_dir(path, f"RecBole's ML-100K splits not found at {path}; set MLSD_PEERS_DIR")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def redis_server_on(port: int) -> Iterator[str]:
    """A throwaway ``redis-server`` on loopback ``port`` while the block runs; yields
    ``"127.0.0.1:<port>"``.

    The binary is ``$MLSD_REDIS_SERVER``, else ``redis-server`` on the PATH; without one the
    test is skipped (failed in CI). Nothing is persisted.
    """
    import shutil
    import subprocess
    import time

    import redis

    binary = os.environ.get("MLSD_REDIS_SERVER") or shutil.which("redis-server")
    if not binary or not Path(binary).is_file():
        reason = "redis-server not found; install it or set MLSD_REDIS_SERVER to its path"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    proc = subprocess.Popen(
        [*args, "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10.0
    try:
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                pytest.fail(f"redis-server on port {port} did not answer PING: {err}")
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port for the session (see
    :func:`redis_server_on`). Tests using it are ``integration``."""
    with redis_server_on(_free_port()) as address:
        yield address
