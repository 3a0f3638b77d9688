"""Typed system configs, one TOML file per system under ``configs/``.

Each section maps onto a frozen dataclass that lives beside the code it configures; an unknown
key or a value of the wrong type is an error naming the file, the section and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from mlsd.features.store import FeatureStoreConfig

DEFAULT_FEED_CONFIG = Path("configs/feed.toml")

T = TypeVar("T")


@dataclass(frozen=True)
class FeaturesSection:
    """``[features]``: what the feature step computes (categories come from the dataset)."""

    history_len: int = 50
    windows_days: tuple[int, ...] = (1, 7, 30)
    session_gap_s: int = 1800
    event_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FeatureStoreSection:
    """``[feature_store]``: the online store and where its Feast repository lives."""

    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = "127.0.0.1:6379"
    project: str = "mlsd"
    repo_dir: str = "feature_repo"

    def store_config(self) -> FeatureStoreConfig:
        return FeatureStoreConfig(
            online_store=self.online_store,
            redis_connection=self.redis_connection,
            project=self.project,
        )

    def repo_path(self, dataset_dir: Path) -> Path:
        path = Path(self.repo_dir)
        return path if path.is_absolute() else Path(dataset_dir) / path


@dataclass(frozen=True)
class FeedConfig:
    """``configs/feed.toml``: the personalized feed system."""

    features: FeaturesSection = field(default_factory=FeaturesSection)
    feature_store: FeatureStoreSection = field(default_factory=FeatureStoreSection)

    def with_online_store(self, name: str) -> FeedConfig:
        """This config with another online store (``sqlite`` or ``redis``)."""
        hint = typing.get_type_hints(FeatureStoreSection)["online_store"]
        store = _coerce(name, hint, "online store")
        return dataclasses.replace(
            self, feature_store=dataclasses.replace(self.feature_store, online_store=store)
        )


def load_feed_config(path: Path | None = None) -> FeedConfig:
    """Read a feed config; ``None`` reads ``configs/feed.toml`` if present, else the defaults."""
    if path is None:
        if not DEFAULT_FEED_CONFIG.is_file():
            return FeedConfig()
        path = DEFAULT_FEED_CONFIG
    raw = _read_toml(Path(path))
    unknown = set(raw) - {f.name for f in dataclasses.fields(FeedConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    return FeedConfig(
        features=_section(FeaturesSection, raw.get("features", {}), path, "features"),
        feature_store=_section(
            FeatureStoreSection, raw.get("feature_store", {}), path, "feature_store"
        ),
    )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc


def _section(cls: type[T], values: dict[str, Any], path: Path, name: str) -> T:
    """Build dataclass ``cls`` from a TOML table, checking keys and value types."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"{path}: [{name}] has unknown key {key!r}; known keys: {known}")
        kwargs[key] = _coerce(value, hints[key], f"{path}: [{name}].{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ValueError(f"{where}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, options[0], where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, where) for v in value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value
