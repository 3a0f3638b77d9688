"""``scripts/demo_request.py``: it reports the demo server's answer only when that server is the
one answering on the port."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "demo_request.py"
SERVER = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"{}" if self.path == "/readyz" else json.dumps({"by": "demo"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)


class _Other(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"by": "another server"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def other_server() -> Iterator[int]:
    """A server of this process answering 200 everywhere: what held the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def demo_request(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_dead_demo_server_fails_with_its_log_even_when_another_answers(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "serve.pid").write_text(f"{dead.pid}\n")
    log = tmp_path / "serve.log"
    log.write_text("loading\nerror: port 8000 on 127.0.0.1 is already in use\n")
    with other_server() as port:
        result = demo_request(
            str(port), "42", "--pid-file", str(tmp_path / "serve.pid"), "--log", str(log),
            "--timeout", "20", cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "another server" not in result.stdout
    assert f"the demo server (PID {dead.pid}" in result.stderr
    assert "is already in use" in result.stderr  # the log's tail
    assert f"DEMO_PORT={port + 1}" in result.stderr


def test_a_live_process_that_does_not_hold_the_port_is_not_taken_for_the_server(
    tmp_path: Path,
) -> None:
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "serve.pid").write_text(str(waiting.pid))
        with other_server() as port:
            result = demo_request(
                str(port), "42", "--pid-file", str(tmp_path / "serve.pid"), "--timeout", "1",
                cwd=tmp_path,
            )  # fmt: skip
    finally:
        waiting.kill()
        waiting.wait()
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc: which process holds a port is not checked")
    assert result.returncode == 1, result.stdout
    assert f"another process than the demo server (PID {waiting.pid}" in result.stderr


def test_the_demo_servers_answer_is_printed(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        (tmp_path / "serve.pid").write_text(str(server.pid))
        result = demo_request(
            str(port), "42", "--pid-file", str(tmp_path / "serve.pid"), cwd=tmp_path
        )
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr
    assert f"GET http://127.0.0.1:{port}/v1/recommendations/42" in result.stdout
    assert '"by": "demo"' in result.stdout


def test_a_stale_pid_file_is_read_only_when_given(tmp_path: Path) -> None:
    """``demo-output/serve.pid`` left by an earlier run (its process gone) does not fail a run
    against a healthy server unless ``--pid-file`` names it."""
    stale = subprocess.Popen([sys.executable, "-c", "pass"])
    stale.wait()
    (tmp_path / "demo-output").mkdir()
    (tmp_path / "demo-output" / "serve.pid").write_text(str(stale.pid))
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        result = demo_request(str(port), "42", cwd=tmp_path)
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr
    assert '"by": "demo"' in result.stdout
