"""nginx in front of service replicas: each request to the replica with the fewest in flight.

Replicas of ``mlsd feed serve`` sharing one port through ``SO_REUSEPORT`` (``--reuse-port``)
get *connections* from the kernel, hashed by address: a client's keep-alive connection sends
every request to one replica, whether it is busy or idle. Each replica answers one request at a
time on its model thread, so a request hashed to a busy replica waits while the other sits
idle. A balancer that picks per request, among the replicas, the one with the fewest requests
in flight (nginx's ``least_conn``; Envoy's and HAProxy's least-request do the same) waits only
when every replica is busy. nginx is the component here: a C event loop that costs tens of
microseconds a request, with keep-alive connections to the replicas so no request pays a
connect. This module writes its configuration and runs it as a child process (Debian's
``nginx`` or ``nginx-light``; ``$MLSD_NGINX`` names another binary).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from mlsd.serving.errors import body_limit_detail
from mlsd.serving.process import stop_process
from mlsd.serving.settings import ServiceSettings

__all__ = ["Nginx", "NginxError", "find_nginx", "nginx_config"]


class NginxError(RuntimeError):
    """nginx is missing, refused its configuration or did not start listening."""


def find_nginx() -> str | None:
    """``$MLSD_NGINX``, else ``nginx`` on the PATH or in ``/usr/sbin`` (not on every PATH)."""
    named = os.environ.get("MLSD_NGINX")
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_config(
    listen: tuple[str, int],
    upstreams: Sequence[tuple[str, int]],
    prefix: Path,
    *,
    keepalive: int = 64,
    worker_priority: int | None = None,
    max_body_bytes: int = ServiceSettings.max_body_bytes,
) -> str:
    """The whole ``nginx.conf``: one worker process; ``listen`` proxied to ``upstreams`` by
    ``least_conn`` over up to ``keepalive`` idle connections kept open per worker; temporary
    files, pid and error log under ``prefix``; no access log (the service logs its requests).
    ``worker_priority``: the worker's nice value (-20 to 19; below 0 needs root), see
    :data:`WORKER_PRIORITY`.

    ``max_body_bytes``: the replicas' body limit (``MLSD_MAX_BODY_BYTES``). nginx passes a body
    up to it (its own default refused any over 1 MiB, a batch of events the replicas take), and
    answers a larger one as a replica would: a 413 with the replicas' JSON ``detail``
    (:func:`~mlsd.serving.errors.body_limit_detail`), not nginx's HTML page. A body is held in
    memory (at most ``max_body_bytes`` a request), never written to a temporary file: a worker
    started by root runs as ``nobody``, which cannot write under a ``prefix`` in a folder
    private to root (``/root``, pytest's), and answered a body over 16 KiB with a 500.

    A replica that refuses or drops the connection, or sends no answer within
    ``proxy_read_timeout``, is left alone for ``fail_timeout`` and the request goes to another
    (``proxy_next_upstream error timeout``) if it is a GET: nginx never resends a POST (events,
    admin calls) that reached a replica.
    """
    if not upstreams:
        raise ValueError("nginx_config needs at least one upstream replica")
    if keepalive < 1:
        raise ValueError(f"keepalive must be at least 1, got {keepalive}")
    if worker_priority is not None and not -20 <= worker_priority <= 19:
        raise ValueError(f"worker_priority is a nice value in [-20, 19], got {worker_priority}")
    if max_body_bytes < 1:  # 0 would lift nginx's limit altogether
        raise ValueError(
            f"max_body_bytes (MLSD_MAX_BODY_BYTES) must be at least 1, got {max_body_bytes}"
        )
    priority = "" if worker_priority is None else f"worker_priority {worker_priority};\n"
    servers = "\n".join(
        f"        server {host}:{port} max_fails=1 fail_timeout=2s;" for host, port in upstreams
    )
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    too_large = _nginx_string(json.dumps({"detail": body_limit_detail(max_body_bytes)}))
    return f"""\
# written by mlsd.serving.balancer: {len(upstreams)} replicas behind least_conn
worker_processes 1;
{priority}daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size {max_body_bytes};
    client_body_buffer_size {max_body_bytes};

    upstream mlsd_replicas {{
        least_conn;
{servers}
        keepalive {keepalive};
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }}

    server {{
        listen {listen[0]}:{listen[1]} backlog=4096;
        error_page 413 @body_too_large;
        location @body_too_large {{
            default_type application/json;
            return 413 {too_large};
        }}
        location / {{
            proxy_pass http://mlsd_replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


WORKER_PRIORITY = -5
"""The nginx worker's nice value when started as root (:class:`Nginx`'s default): it wakes
four times a request (client read, replica write, replica read, client write), and on cores the
replicas keep busy a worker at the same priority waits for the scheduler at each wake."""


class Nginx:
    """nginx running :func:`nginx_config` as a child process, under ``prefix``.

    ``with Nginx(...) as balancer:`` starts it and returns once ``listen`` accepts connections;
    leaving the block stops it. ``pids`` are the master's and its worker's (for CPU accounting).
    ``max_body_bytes``: the replicas' body limit; by default ``MLSD_MAX_BODY_BYTES`` read as
    the replicas read it (:class:`~mlsd.serving.settings.ServiceSettings`), so give the
    balancer the replicas' value.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        upstreams: Sequence[tuple[str, int]],
        prefix: Path,
        *,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        worker_priority: int | None = WORKER_PRIORITY if os.geteuid() == 0 else None,
        max_body_bytes: int | None = None,
    ) -> None:
        self.listen = listen
        self.upstreams = list(upstreams)
        self.prefix = prefix
        self.binary = binary or find_nginx()
        self.start_timeout_s = start_timeout_s
        self.worker_priority = worker_priority
        self.max_body_bytes = max_body_bytes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.prefix / "nginx.conf"

    def start(self) -> None:
        if self.binary is None:
            raise NginxError(
                "nginx not found: install Debian's nginx-light (apt-get install nginx-light) "
                "or set MLSD_NGINX to the binary"
            )
        if not _free(self.listen):
            raise NginxError(
                f"{self.listen[0]}:{self.listen[1]} is in use: pick another port for nginx"
            )
        max_body_bytes = self.max_body_bytes
        if max_body_bytes is None:
            try:  # only the one variable: the balancer needs none of the replicas' others
                env = {"MLSD_MAX_BODY_BYTES": os.environ.get("MLSD_MAX_BODY_BYTES", "")}
                max_body_bytes = ServiceSettings.from_env(env).max_body_bytes
            except ValueError as exc:
                raise NginxError(f"{exc}; set it as for the replicas") from None
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            nginx_config(
                self.listen,
                self.upstreams,
                self.prefix,
                worker_priority=self.worker_priority,
                max_body_bytes=max_body_bytes,
            )
        )
        command = [self.binary, "-p", str(self.prefix), "-c", str(self.config_path)]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise NginxError(f"nginx refused {self.config_path}: {checked.stderr.strip()}")
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout_s
        # the master listens before it forks the worker: wait for both (the worker's CPU counts)
        while not (_accepts(self.listen) and len(self.pids()) > 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.prefix / "error.log"
                detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise NginxError(
                    f"nginx did not listen on {self.listen[0]}:{self.listen[1]} within "
                    f"{self.start_timeout_s:g} s; its error log ({log}):\n{detail}"
                )
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """The master and its children (the worker), read from /proc."""
        if self.proc is None:
            return []
        master = self.proc.pid
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                comm_rest = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(comm_rest[1]) == master:
                children.append(int(stat.parent.name))
        return [master, *children]

    def wait(self) -> int:
        """Block until nginx exits; its exit code."""
        if self.proc is None:
            raise NginxError("nginx is not running: start() it first")
        return self.proc.wait()

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL after five seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            stop_process(proc, 5.0)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _nginx_string(text: str) -> str:
    """``text`` as a single-quoted nginx string (it must hold no ``$``: nginx would read a
    variable there, and has no escape for it)."""
    if "$" in text:
        raise ValueError(f"an nginx string cannot hold '$': {text!r}")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.2):
            return True
    except OSError:
        return False


def _free(address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OSError:
            return False
    return True
