"""Wait for the demo service to be ready, then print one recommendation response.

python scripts/demo_request.py 8000 42 [--pid-file PATH] [--log PATH] [--timeout SECONDS]

``make demo`` starts ``mlsd feed serve`` in the background, writes its PID to
``demo-output/serve.pid`` and its output to ``demo-output/serve.log``, and passes both here.
Whatever answers on the port is not enough: when the new server died (e.g. an earlier one still
holds the port), that earlier one would answer. So with ``--pid-file`` the server of the PID
file must be alive and, where ``/proc`` tells, be the process listening on the port; else this
exits 1 with the end of the server's log (``--log``, default ``demo-output/serve.log`` when it
exists) and what to do. Without ``--pid-file`` any server answering on the port will do: a PID
file left by an earlier run may name a process long gone, or one reusing its number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEMO_DIR = Path("demo-output")
LOG_LINES = 20


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    port, user = args.port, args.user
    base = f"http://127.0.0.1:{port}"
    pid_file: Path | None = args.pid_file  # checked only when given (make demo gives it): a
    # serve.pid left by an earlier run may name a dead or reused process
    log: Path | None = args.log
    if log is None and (DEMO_DIR / "serve.log").is_file():
        log = DEMO_DIR / "serve.log"
    pid = None if pid_file is None else read_pid(pid_file)
    deadline = time.monotonic() + args.timeout
    other_answers = False  # a server answered on the port, but not the one of the PID file
    while True:
        if pid is not None and not alive(pid):
            fail(f"the demo server (PID {pid}, from {pid_file}) exited", log, port)
        if ready(base):
            owner = None if pid is None else owns_port(pid, port)
            if owner is not False:
                break
            other_answers = True
        if time.monotonic() > deadline:
            what = f"the service on {base} did not become ready within {args.timeout:g} s"
            if other_answers:
                what = (
                    f"another process than the demo server (PID {pid}, from {pid_file}) "
                    f"answers on {base}"
                )
            fail(what, log, port)
        time.sleep(0.5)
    url = f"{base}/v1/recommendations/{user}?k=5&explain=true"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    print(f"GET {url}")
    print(json.dumps(body, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="The port the demo server listens on.")
    parser.add_argument("user", type=int, help="The user to ask recommendations for.")
    parser.add_argument(
        "--pid-file",
        type=Path,
        help="The demo server's PID file: fail when that process exits or another answers.",
    )
    parser.add_argument(
        "--log",
        type=Path,
        help=f"The demo server's output (default: {DEMO_DIR / 'serve.log'} when it exists).",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="Seconds to wait for it (default 180)."
    )
    return parser.parse_args(argv)


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        sys.exit(f"error: {path}: no such PID file; start the demo server with `make demo`")
    except ValueError:
        sys.exit(f"error: {path}: expected the demo server's PID, got {path.read_text()!r}")


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def owns_port(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port``; None where ``/proc`` cannot
    tell (not Linux, or another user's process)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local address (hex ip:port), ..., state (0A: LISTEN), ..., inode
            listening = len(fields) > 9 and fields[3] == "0A"
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


def fail(what: str, log: Path | None, port: int) -> None:
    lines = [f"error: {what}."]
    if log is not None and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-LOG_LINES:]
        lines += [f"last lines of {log}:", *(f"  {line}" for line in tail)]
    lines.append(
        f"If port {port} is taken (an earlier demo or another server), stop what holds it or "
        f"pick another port: make demo DEMO_PORT={port + 1}"
    )
    sys.exit("\n".join(lines))


if __name__ == "__main__":
    main()
