"""The service in a child process: start a command, wait until ``/readyz`` answers, stop it.

Benchmarks, the closed-loop demo and integration tests run ``mlsd feed serve`` in its own
process (a load generator must not share the server's interpreter and GIL), and all need the
same three things: a free port, a readiness wait that fails fast (with the server's last
output) when the process dies or never becomes ready, and a stop that cannot leave a server
behind. :func:`running_service` is that, as a context manager.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

__all__ = ["ServiceFailedError", "free_port", "mlsd_command", "running_service", "stop_process"]


class ServiceFailedError(RuntimeError):
    """The service process exited, or did not become ready in time."""


def free_port() -> int:
    """A free loopback port below the ephemeral range (32768+), which other processes'
    outgoing connections cannot take while the service loads its model."""
    for port in random.sample(range(20_000, 32_768), 200):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise ServiceFailedError("no free port in 20000-32767 on 127.0.0.1")


def mlsd_command(*args: str) -> list[str]:
    """``mlsd ARGS`` with this interpreter (no reliance on the ``mlsd`` script being on PATH)."""
    return [sys.executable, "-c", "from mlsd.cli import main; main()", *args]


@contextlib.contextmanager
def running_service(
    command: Sequence[str],
    *,
    url: str,
    output: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (a server listening at ``url``) with its output in ``output``; yield the
    process once ``GET {url}/readyz`` answers 200; terminate it on exit (kill after
    ``stop_timeout_s``). Raises :class:`ServiceFailedError` with the output's last lines when
    the process exits first or is not ready within ``ready_timeout_s``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            list(command),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServiceFailedError(
                    f"the service exited with {proc.returncode}:\n{_tail(output)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServiceFailedError(
                    f"the service at {url} was not ready within {ready_timeout_s:.0f} s:\n"
                    f"{_tail(output)}"
                )
            time.sleep(0.25)
        yield proc
    finally:
        stop_process(proc, stop_timeout_s)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL when ``proc`` has not exited after ``timeout_s``; reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"(last lines of {path})\n" + "\n".join(text)
