"""System configs: the shipped TOML loads, and mistakes name the file, section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd.config import FeedConfig, load_feed_config
from tests.conftest import REPO


def test_shipped_feed_config_loads_with_typed_values() -> None:
    config = load_feed_config(REPO / "configs" / "feed.toml")
    assert config.features.windows_days == (1, 7, 30)
    assert config.features.history_len == 50
    assert config.feature_store.online_store == "sqlite"
    assert config.feature_store.store_config().online_store == "sqlite"


def test_repo_dir_is_relative_to_the_dataset(tmp_path: Path) -> None:
    config = FeedConfig()
    assert config.feature_store.repo_path(tmp_path) == tmp_path / "feature_repo"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[features]\nhistory_lenn = 5\n", r"\[features\] has unknown key 'history_lenn'"),
        ("[features]\nhistory_len = 'five'\n", r"\[features\]\.history_len: expected an integer"),
        ("[features]\nwindows_days = 7\n", r"windows_days: expected a list"),
        ("[feature_store]\nonline_store = 'dynamo'\n", r"expected one of 'sqlite', 'redis'"),
        ("[serving]\nport = 1\n", r"unknown section\(s\) serving"),
        ("[features\n", r"not valid TOML"),
    ],
)
def test_config_errors_name_file_section_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_feed_config(path)
    assert str(path) in str(info.value)


def test_override_of_the_online_store_is_checked() -> None:
    assert FeedConfig().with_online_store("redis").feature_store.online_store == "redis"
    with pytest.raises(ValueError, match="online store: expected one of"):
        FeedConfig().with_online_store("memcached")
