"""Fetch a file over HTTP(S) with a progress bar, verified against a published MD5 and cached.

The publisher puts ``<url>.md5`` beside ``<url>`` (GroupLens writes ``MD5 (name) = <hex>``,
``md5sum`` writes ``<hex>  name``; any 32-hex-digit token is taken). A verified download is
kept with its checksum in ``<file>.md5``, so a later call reuses it without network.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

BLOCK_BYTES = 1 << 20
TIMEOUT_S = 60


class DownloadError(OSError):
    """A download failed or its checksum did not match the published one."""


def download_verified(url: str, dest: Path, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, verified against the MD5 published at ``url + ".md5"``.

    A ``dest`` that matches the MD5 saved beside it (``dest.md5``) is reused without network.
    The bytes go to ``dest.part`` first, so ``dest`` is only ever a verified file.

    Returns:
        ``dest``.

    Raises:
        DownloadError: the download failed, or the checksum does not match (the file is deleted).
    """
    dest = Path(dest)
    md5_path = dest.with_name(dest.name + ".md5")
    if dest.is_file() and md5_path.is_file() and md5_path.read_text().strip() == file_md5(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    expected = published_md5(url + ".md5")
    partial = dest.with_name(dest.name + ".part")
    fetch(url, partial, progress=progress)
    actual = file_md5(partial)
    if actual != expected:
        partial.unlink()
        raise DownloadError(
            f"{url}: checksum mismatch: expected MD5 {expected} (from {url}.md5), got {actual}. "
            "The download was deleted; retry, or download it by hand and pass it as the source."
        )
    partial.replace(dest)
    md5_path.write_text(expected + "\n")
    return dest


_FAILURES = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)
"""What a request can fail with: a network or file error, a connection cut mid-body
(``http.client.IncompleteRead`` is an ``HTTPException``, not an ``OSError``), a bad URL."""


def published_md5(url: str) -> str:
    """Read a checksum file, e.g. ``MD5 (ml-100k.zip) = 0e33842e...``; returns lowercase hex."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            text = response.read().decode("ascii", errors="replace")
    except _FAILURES as exc:
        raise DownloadError(f"{url}: could not fetch the published checksum ({exc!r}).") from exc
    found = re.search(r"\b([0-9a-fA-F]{32})\b", text)
    if found is None:
        raise DownloadError(f"{url}: no MD5 checksum in the response: {text[:200]!r}")
    return found.group(1).lower()


def fetch(url: str, dest: Path, *, progress: bool = True) -> None:
    """Stream ``url`` into ``dest`` in 1 MiB blocks, with a rich progress bar.

    Raises:
        DownloadError: the request or the write failed (a partial ``dest`` is deleted).
    """
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    try:
        with (
            urllib.request.urlopen(url, timeout=TIMEOUT_S) as response,
            dest.open("wb") as fh,
            Progress(*columns, disable=not progress) as bar,
        ):
            size = response.headers.get("Content-Length")
            task = bar.add_task(url, total=int(size) if size else None)
            for block in iter(lambda: response.read(BLOCK_BYTES), b""):
                fh.write(block)
                bar.advance(task, len(block))
    except _FAILURES as exc:
        dest.unlink(missing_ok=True)
        raise DownloadError(f"{url}: download failed ({exc!r}).") from exc


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes as lowercase hex, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
