"""The monitor child's profile cache: the same file is parsed once, and only the last profile
is kept, so a child living through many model reloads does not grow with them."""

from __future__ import annotations

import os
from pathlib import Path

from mlsd.monitoring.profile import ReferenceProfile
from mlsd.serving.monitor_pass import _read_profile, load_profile
from tests.monitoring.test_profile import build


def test_the_last_profile_is_reused_and_older_ones_are_let_go(tmp_path: Path) -> None:
    paths = [build(seed).save(tmp_path / f"model-{seed}" / "profile.json") for seed in range(3)]
    first = load_profile(paths[0])
    assert load_profile(paths[0]) is first  # not parsed again
    assert first == ReferenceProfile.load(paths[0])
    for path in paths[1:]:
        assert load_profile(path) == ReferenceProfile.load(path)
        assert _read_profile.cache_info().currsize == 1
    assert load_profile(paths[0]) is not first  # let go, read again
    assert load_profile(paths[0]) == first


def test_a_rewritten_profile_is_read_again(tmp_path: Path) -> None:
    path = build(0).save(tmp_path / "profile.json")
    old = load_profile(path)
    build(1).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a coarse clock
    new = load_profile(path)
    assert new == ReferenceProfile.load(path)
    assert new != old
