"""``mlsd feed promote|rollback|versions`` against a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd.cli import run
from mlsd.serving.registry import ModelRegistry, RegistryConfig
from tests.serving.test_registry import register_three


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three registered bundles (ndcg@10 0.30, 0.28, 0.33) in the default model, no champion."""
    base = tmp_path_factory.mktemp("registry")
    assert register_three(ModelRegistry(RegistryConfig(), base), base / "bundles") == [1, 2, 3]
    return base


def test_promote_refuse_force_and_rollback(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--base-dir", str(store)]

    assert run(["feed", "rollback", *where]) == 1
    assert "no previous champion" in capsys.readouterr().err

    assert run(["feed", "promote", "--version", "1", *where]) == 0
    assert "accepted" in capsys.readouterr().out

    assert run(["feed", "promote", "--version", "2", *where]) == 1
    out = capsys.readouterr().out
    assert "refused" in out
    assert "0.2800" in out
    assert "0.3000" in out
    assert "stored values, each on its own validation window" in out  # says what it compared

    assert run(["feed", "promote", "--version", "2", "--force", *where]) == 0
    out = capsys.readouterr().out
    assert "forced" in out
    assert "overridden" in out
    assert "0.2800" in out

    assert run(["feed", "promote", "--version", "3", *where]) == 0
    assert "accepted" in capsys.readouterr().out

    assert run(["feed", "rollback", *where]) == 0
    assert "v3 -> v2" in capsys.readouterr().out
    assert ModelRegistry(RegistryConfig(), store).champion() == 2

    assert run(["feed", "versions", *where]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "0.2800" in line]
    assert len(rows) == 1
    assert "champion" in rows[0]

    assert run(["feed", "promote", "--version", "9", *where]) == 1
    assert "no version or alias '9'" in capsys.readouterr().err


def test_tracking_uri_from_the_environment(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store_uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLSD_TRACKING_URI", store_uri)
    assert run(["feed", "versions", "--base-dir", str(tmp_path)]) == 0
    assert "0.3300" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()

    # --registry-uri wins over the environment (which now names a store that is never opened).
    monkeypatch.setenv("MLSD_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    assert run(["feed", "versions", "--registry-uri", store_uri]) == 0
    assert "0.3300" in capsys.readouterr().out
    assert not (tmp_path / "unused.db").exists()
