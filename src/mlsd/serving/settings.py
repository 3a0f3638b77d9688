"""The online service's settings (:class:`ServiceSettings`), read from ``MLSD_*`` variables."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class ServiceSettings:
    """Service settings; :meth:`from_env` reads them from the environment.

    Attributes:
        admin_token: bearer token for ``/admin/*`` (``MLSD_ADMIN_TOKEN``); ``None`` disables them.
            Printable ASCII without surrounding blanks: an HTTP header carries nothing else
            intact (Starlette reads headers as latin-1, proxies strip blanks), so any other
            token could never authenticate and is refused at startup.
        max_body_bytes: the largest request body read (``MLSD_MAX_BODY_BYTES``, default 4 MiB);
            a larger one is a 413 before it is read (:class:`~mlsd.serving.errors.BodyLimit`).
            A batch of 10,000 events, the most ``POST /v1/events`` takes, is 0.5 MB with the
            required fields and about 3 MB with every field at its longest.
        max_k: the largest ``k`` a request may ask for (``MLSD_MAX_K``).
        ui: serve the demo page and the two endpoints it reads, ``GET /v1/users/sample`` and
            ``GET /v1/users/{user_id}/history`` (``MLSD_UI``: 1, true, yes, on, ...; ``mlsd feed
            serve --ui``). Off by default: they list user ids and show any user's recent items
            to anyone who asks, which a service behind a public gateway must not; off, they
            answer 404 saying how to turn them on.
        default_k: ``k`` when a request gives none (``MLSD_DEFAULT_K``).
        model_threads: requests the model answers at once in the thread pool
            (``MLSD_MODEL_THREADS``); the rest wait their turn on the event loop. Two: the
            online path is mostly Python, so more threads only take turns at the GIL, each
            switch costing every request in flight; two still overlap one request's GIL-free
            parts (trees, index search, I/O) with another's Python, and one slow dependency
            does not stall the rest. Measured (``bench/serving.py``, 20K items, 2 cores):
            the highest online rate at p99 <= 50 ms went from 150 requests/s with 40
            threads (anyio's default) to 175 with two; p99 at 150 requests/s from 14.5 to
            9.8 ms; at 1M items, from 106 requests/s to at least 150 (the highest rate
            tried; p99 29 ms). Replicas (``--reuse-port``) that share two cores do better
            with one each: 1M items, two replicas, 200 requests/s, p99 12.7–15.0 ms with one
            thread against 27–40 ms with two.
            Answering on the event loop itself, with no thread, was worse again: p99
            15.5–16.0 ms against 13.5 and p50 7.3–7.7 against 5.9, using more CPU (two
            replicas, 1M items, 200 requests/s; two runs, and one with a thread between them).
        gil_switch_ms: how long a thread may hold the GIL while another waits for it
            (``MLSD_GIL_SWITCH_MS``; ``sys.setswitchinterval``, set by ``mlsd feed serve``);
            ``None`` keeps Python's 5 ms. The event loop waits that long for a model thread
            running Python; 0.5 cut the online p99 of two replicas at 200 requests/s from
            15.0 to 12.7 ms (one thread each) and from 40 to 27 ms (two each).
    """

    admin_token: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_k: int = 100
    default_k: int = 10
    model_threads: int = 2
    gil_switch_ms: float | None = None
    ui: bool = False

    def __post_init__(self) -> None:
        token = self.admin_token
        if token is not None and not (
            token.isascii() and token.isprintable() and token.strip() == token
        ):
            raise ValueError(
                "MLSD_ADMIN_TOKEN must be printable ASCII without leading or trailing blanks "
                "(an HTTP header carries no other token intact); choose another token"
            )  # the token itself is a secret: never in the message
        if self.max_body_bytes < 1:
            raise ValueError(f"MLSD_MAX_BODY_BYTES must be at least 1, got {self.max_body_bytes}")
        if self.max_k < 1:
            raise ValueError(f"MLSD_MAX_K must be at least 1, got {self.max_k}")
        if self.model_threads < 1:
            raise ValueError(f"MLSD_MODEL_THREADS must be at least 1, got {self.model_threads}")
        if self.gil_switch_ms is not None and not 0 < self.gil_switch_ms <= 1000:
            raise ValueError(f"MLSD_GIL_SWITCH_MS must be in (0, 1000], got {self.gil_switch_ms}")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(
                f"MLSD_DEFAULT_K must be in [1, MLSD_MAX_K={self.max_k}], got {self.default_k}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read the ``MLSD_*`` variables of the attributes (unset: defaults)."""
        env = os.environ if environ is None else environ
        return cls(
            admin_token=env.get("MLSD_ADMIN_TOKEN") or None,
            max_body_bytes=_env_int(env, "MLSD_MAX_BODY_BYTES", cls.max_body_bytes),
            max_k=_env_int(env, "MLSD_MAX_K", cls.max_k),
            default_k=_env_int(env, "MLSD_DEFAULT_K", cls.default_k),
            model_threads=_env_int(env, "MLSD_MODEL_THREADS", cls.model_threads),
            gil_switch_ms=_env_float(env, "MLSD_GIL_SWITCH_MS"),
            ui=_env_bool(env, "MLSD_UI", cls.ui),
        )

    def apply_to_process(self) -> None:
        """Set what belongs to the whole process (the GIL switch interval)."""
        if self.gil_switch_ms is not None:
            sys.setswitchinterval(self.gil_switch_ms / 1000)


_T = TypeVar("_T")


def _env_value(
    env: Mapping[str, str], name: str, convert: Callable[[str], _T], kind: str
) -> _T | None:
    """``convert`` of the variable ``name`` (``None``: unset or blank); a clear error naming it."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None


def _env_float(env: Mapping[str, str], name: str) -> float | None:
    return _env_value(env, name, float, "a number")


BOOLEAN_WORDS: Mapping[str, bool] = {
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
}
"""The words pydantic reads as a boolean (lower case), in a query string and here alike."""


def _boolean(raw: str) -> bool:
    try:
        return BOOLEAN_WORDS[raw.lower()]
    except KeyError:
        raise ValueError(raw) from None


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _env_value(env, name, _boolean, f"one of {', '.join(BOOLEAN_WORDS)}")
    return default if value is None else value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _env_value(env, name, int, "an integer")
    return default if value is None else value
