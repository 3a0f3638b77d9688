"""nginx in front of replicas: its configuration, least_conn with a real nginx, and
``mlsd feed balance``."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlsd.serving.balancer import Nginx, NginxError, find_nginx, nginx_config
from mlsd.serving.errors import body_limit_detail
from mlsd.serving.settings import ServiceSettings
from tests.conftest import _free_port


def test_config_sends_every_replica_least_conn_over_kept_connections(tmp_path: Path) -> None:
    text = nginx_config(("127.0.0.1", 8000), [("127.0.0.1", 9001), ("127.0.0.1", 9002)], tmp_path)
    upstream = text.split("upstream mlsd_replicas {")[1].split("}")[0]
    assert "least_conn;" in upstream
    assert "server 127.0.0.1:9001 " in upstream
    assert "server 127.0.0.1:9002 " in upstream
    assert "keepalive 64;" in upstream
    assert "listen 127.0.0.1:8000" in text
    # keep-alive to the replicas needs HTTP/1.1 and no "Connection: close" passed on
    assert "proxy_http_version 1.1;" in text
    assert 'proxy_set_header Connection "";' in text
    # failed connections and timeouts go to another replica (nginx never resends a POST)
    assert "proxy_next_upstream error timeout;" in text
    assert str(tmp_path / "nginx.pid") in text


def test_config_takes_bodies_up_to_the_replicas_limit(tmp_path: Path) -> None:
    """nginx's own limit (1 MiB) refused batches of events the replicas take (4 MiB)."""
    default = nginx_config(("127.0.0.1", 8000), [("127.0.0.1", 9001)], tmp_path)
    assert f"client_max_body_size {ServiceSettings().max_body_bytes};" in default
    text = nginx_config(
        ("127.0.0.1", 8000), [("127.0.0.1", 9001)], tmp_path, max_body_bytes=5_000_000
    )
    assert "client_max_body_size 5000000;" in text
    # held in memory: a worker run as nobody may not write temporary files under the prefix
    assert "client_body_buffer_size 5000000;" in text
    # a larger body is answered as the replicas answer it, in JSON
    assert "error_page 413 @body_too_large;" in text
    assert json.dumps({"detail": body_limit_detail(5_000_000)}) in text


def test_config_refuses_no_replicas(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one upstream"):
        nginx_config(("127.0.0.1", 8000), [], tmp_path)


def test_missing_binary_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSD_NGINX", str(tmp_path / "no-nginx"))
    assert find_nginx() is None
    with pytest.raises(NginxError, match="nginx not found: install Debian's nginx-light"):
        Nginx(("127.0.0.1", _free_port()), [("127.0.0.1", 1)], tmp_path).start()


# ---------------------------------------------------------------- with a real nginx


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    binary = find_nginx()
    if binary is None:
        reason = "nginx not found; install nginx-light (make system-deps) or set MLSD_NGINX"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


class _Replica(ThreadingHTTPServer):
    """A replica that answers its name; ``/slow`` holds the request until ``release`` is set."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = threading.Event()
        self.holding = threading.Event()
        self.peers: list[tuple[str, int]] = []  # the connection each request came on
        self.posts = 0
        self.sizes: list[int] = []  # the bodies POST /size read, bytes
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real replicas

    def do_GET(self) -> None:
        replica = self.server
        assert isinstance(replica, _Replica)
        replica.peers.append(self.client_address)
        if self.path == "/slow":
            replica.holding.set()
            replica.release.wait(10)
        body = replica.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """``/size``: read the body, answer its size; else take the request, then drop the
        connection without answering (a crash mid-request)."""
        replica = self.server
        assert isinstance(replica, _Replica)
        if self.path == "/size":
            size = len(self.rfile.read(int(self.headers["Content-Length"])))
            replica.sizes.append(size)
            body = str(size).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        replica.posts += 1
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def replicas() -> Iterator[list[_Replica]]:
    servers = [_Replica("a"), _Replica("b")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield servers
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def _get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, response.status
        return response.read().decode()
    finally:
        conn.close()


def _post(port: int, path: str, body: bytes) -> tuple[int, str, bytes]:
    """Status, content type and body of ``POST path``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def _upstreams(servers: list[_Replica]) -> list[tuple[str, int]]:
    return [("127.0.0.1", s.server_address[1]) for s in servers]


@pytest.mark.integration
def test_requests_go_to_the_replica_with_fewer_in_flight(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    port = _free_port()
    with Nginx(("127.0.0.1", port), _upstreams(replicas), tmp_path, binary=nginx_binary) as lb:
        assert len(lb.pids()) == 2  # master and one worker
        assert {_get(port, "/") for _ in range(10)} == {"a", "b"}  # both replicas serve
        slow: list[str] = []
        holder = threading.Thread(target=lambda: slow.append(_get(port, "/slow")))
        holder.start()
        deadline = time.monotonic() + 5
        while not any(r.holding.is_set() for r in replicas):
            assert time.monotonic() < deadline, "the slow request reached no replica"
            time.sleep(0.01)
        busy = next(r for r in replicas if r.holding.is_set())
        idle = next(r for r in replicas if r is not busy)
        # with one request in flight on the busy replica, every other goes to the idle one
        assert [_get(port, "/") for _ in range(20)] == [idle.name] * 20
        busy.release.set()
        holder.join(10)
        assert slow == [busy.name]
    assert lb.proc is None
    assert not lb.pids()


@pytest.mark.integration
def test_replicas_get_requests_over_kept_connections(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    """Forty requests, each on a new client connection, reach the one replica over one
    connection that nginx keeps open: no request pays a connect to a replica."""
    port = _free_port()
    with Nginx(("127.0.0.1", port), _upstreams(replicas[:1]), tmp_path):
        assert [_get(port, "/") for _ in range(40)] == ["a"] * 40
    assert len(replicas[0].peers) == 40
    assert len(set(replicas[0].peers)) == 1


@pytest.mark.integration
def test_a_post_that_reached_a_replica_is_not_sent_to_another(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    """An event must not be counted twice: when the replica fails after taking a POST, the
    client gets the error (502) and no other replica sees the request."""
    port = _free_port()
    with Nginx(("127.0.0.1", port), _upstreams(replicas), tmp_path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/events", body=b"{}")
        assert conn.getresponse().status == 502
        conn.close()
    assert sorted(r.posts for r in replicas) == [0, 1]


@pytest.mark.integration
def test_bodies_up_to_the_replicas_limit_reach_them(
    nginx_binary: str,
    replicas: list[_Replica],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body between nginx's own limit (1 MiB) and ``MLSD_MAX_BODY_BYTES``, read from the
    environment as the replicas read it, reaches a replica; a larger one gets the replicas'
    JSON 413 (not nginx's HTML page) and reaches none."""
    limit = 2 * 1024 * 1024
    monkeypatch.setenv("MLSD_MAX_BODY_BYTES", str(limit))
    port = _free_port()
    with Nginx(("127.0.0.1", port), _upstreams(replicas[:1]), tmp_path, binary=nginx_binary):
        for size in (1_500_000, limit):
            assert _post(port, "/size", b"x" * size) == (200, "", str(size).encode())
        status, content_type, body = _post(port, "/size", b"x" * (limit + 1))
    assert (status, content_type) == (413, "application/json")
    assert json.loads(body) == {"detail": body_limit_detail(limit)}
    assert replicas[0].sizes == [1_500_000, limit]


@pytest.mark.integration
def test_a_body_limit_that_is_not_a_number_is_refused_by_name(
    nginx_binary: str,
    replicas: list[_Replica],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLSD_MAX_BODY_BYTES", "4MB")
    with (
        pytest.raises(NginxError, match="MLSD_MAX_BODY_BYTES must be an integer, got '4MB'"),
        Nginx(("127.0.0.1", _free_port()), _upstreams(replicas), tmp_path, binary=nginx_binary),
    ):
        pass


@pytest.mark.integration
def test_a_stopped_replica_is_skipped(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    port = _free_port()
    gone = ("127.0.0.1", _free_port())  # nothing listens there
    with Nginx(("127.0.0.1", port), [gone, *_upstreams(replicas[:1])], tmp_path):
        assert [_get(port, "/") for _ in range(10)] == ["a"] * 10


@pytest.mark.integration
def test_a_port_in_use_is_refused_by_name(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    taken = replicas[0].server_address[1]
    with pytest.raises(NginxError, match=f"127.0.0.1:{taken} is in use"):
        Nginx(("127.0.0.1", taken), _upstreams(replicas), tmp_path).start()


@pytest.mark.integration
def test_balance_spreads_requests_and_stops_nginx_on_sigterm(
    nginx_binary: str, replicas: list[_Replica], tmp_path: Path
) -> None:
    """``mlsd feed balance`` runs nginx in front of the replicas until SIGTERM, then stops it."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    command = [str(Path(sys.executable).with_name("mlsd")), "feed", "balance"]
    for replica in replicas:
        command += ["--replica", f"127.0.0.1:{replica.server_address[1]}"]
    command += ["--port", str(port), "--run-dir", str(tmp_path / "lb")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answers = {_get(port, "/") for _ in range(10)}
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "mlsd feed balance did not listen"
                time.sleep(0.1)
        assert answers == {"a", "b"}
        master = int((tmp_path / "lb" / "nginx.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"balancing http://127.0.0.1:{port}" in out
    assert not Path(f"/proc/{master}").exists()  # nginx went with it


def test_balance_names_a_bad_replica_address() -> None:
    from typer.testing import CliRunner

    from mlsd.cli import app

    result = CliRunner().invoke(app, ["feed", "balance", "--replica", "localhost"])
    assert result.exit_code == 2
    assert "'localhost' is not host:port" in result.output
