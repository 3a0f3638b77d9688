"""Importing the features package (and Feast under it) leaves the process's metrics in memory
and makes no temp folder per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECK = """
import mlsd.features.online  # imports Feast
import feast.metrics
import prometheus_client.values as values
print(values.ValueClass.__name__)
"""


def test_feast_leaves_the_service_metrics_in_memory_and_no_temp_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["TMPDIR"] = str(tmp_path)
    for _ in range(2):  # a second process reuses the one shared folder
        out = subprocess.run(
            [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == ["MutexValue"], out.stderr
    # Feast's import made a feast_metrics_* folder per process (left behind when the process
    # was killed); now one shared folder, empty.
    assert [p.name for p in tmp_path.iterdir()] == ["mlsd-prometheus"]
    assert not list((tmp_path / "mlsd-prometheus").iterdir())
