"""The service in a child process: ready when /readyz answers, a clear error otherwise, stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from mlsd.serving.process import ServiceFailedError, free_port, mlsd_command, running_service

SERVER = """
import http.server, sys
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready).serve_forever()
"""


def test_yields_once_ready_and_stops_the_process(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", SERVER, str(port)]
    with running_service(command, url=url, output=tmp_path / "out.log") as proc:
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert proc.poll() is None
    assert proc.poll() is not None  # terminated on exit
    assert "listening" in (tmp_path / "out.log").read_text()


def test_a_process_that_dies_is_an_error_with_its_output(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with (
        pytest.raises(ServiceFailedError, match=r"exited with 3(.|\n)*no model here"),
        running_service(command, url="http://127.0.0.1:9", output=tmp_path / "out.log"),
    ):
        pass


def test_not_ready_in_time_is_an_error_and_the_process_is_stopped(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (
        pytest.raises(ServiceFailedError, match="not ready within 1 s"),
        running_service(
            command, url=f"http://127.0.0.1:{port}", output=tmp_path / "o.log", ready_timeout_s=1
        ),
    ):
        pass


def test_mlsd_command_runs_this_interpreters_cli() -> None:
    assert mlsd_command("feed", "serve")[0] == sys.executable
    assert mlsd_command("feed", "serve")[-2:] == ["feed", "serve"]
