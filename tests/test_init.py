"""Importing mlsd (and Feast under it) leaves the process's metrics in memory, makes no temp
folder per process, and hands no file-backed metrics to a child mlsd process."""

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
    # was killed); now one folder per user, empty.
    shared = f"mlsd-prometheus-{os.getuid()}"
    assert [p.name for p in tmp_path.iterdir()] == [shared]
    assert not list((tmp_path / shared).iterdir())


CHILD = """
import subprocess, sys
import mlsd.features.online  # the parent imports Feast, which sets the variables
child = "import mlsd, prometheus_client.values as v; print(v.ValueClass.__name__)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""


def test_a_child_mlsd_process_keeps_its_metrics_in_memory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["TMPDIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["MutexValue"], out.stderr
    assert not list((tmp_path / f"mlsd-prometheus-{os.getuid()}").iterdir())
