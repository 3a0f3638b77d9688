"""Importing mlsd (and Feast after it) leaves the process's metrics in memory, in child mlsd
processes too, and the service can remove the folder Feast's import made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

IN_MEMORY = """
import mlsd.features.online  # imports Feast
import prometheus_client.values as values
print(values.ValueClass.__name__)
"""
CHILD = """
import subprocess, sys
import mlsd.features.online  # the parent imports Feast, which sets the variables
child = "import mlsd, prometheus_client.values as v; print(v.ValueClass.__name__)"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""
KILLED = """
import os
import mlsd, mlsd.features.online
folder = os.environ["PROMETHEUS_MULTIPROCESS_DIR"]
print(os.path.isdir(folder))
mlsd.remove_feast_metrics_dir()
print(os.path.isdir(folder))
os._exit(0)  # as a signal ends the service: no exit hooks
"""


def run(code: str, tmp_path: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_")}
    env["TMPDIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_feast_leaves_the_metrics_in_memory(tmp_path: Path) -> None:
    assert run(IN_MEMORY, tmp_path) == ["MutexValue"]  # file-backed "MmapedValue" before
    assert not list(tmp_path.iterdir())  # Feast's folder went at the normal exit


def test_a_child_mlsd_process_keeps_its_metrics_in_memory(tmp_path: Path) -> None:
    assert run(CHILD, tmp_path) == ["MutexValue"]


def test_the_feast_folder_can_go_before_a_signal_ends_the_process(tmp_path: Path) -> None:
    assert run(KILLED, tmp_path) == ["True", "False"]
    assert not list(tmp_path.iterdir())
