"""Importing mlsd (and Feast after it) leaves the process's metrics in memory, in child mlsd
processes too, and the folder Feast's import made is removed as soon as it is made."""

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
import os, sys
import mlsd.features.online  # imports Feast, which makes its folder and names it
folder = sys.modules["feast.metrics"]._prometheus_mp_dir
print(os.path.dirname(folder) == os.environ["TMPDIR"], os.path.isdir(folder))
print(any(k.startswith("PROMETHEUS_") for k in os.environ))
os._exit(0)  # as a signal ends a process: no exit hooks
"""
NOT_MLSD_CHILD = """
import subprocess, sys
import mlsd.features.online
child = (
    "import os, feast.feature_view; print(os.path.isdir(os.environ['PROMETHEUS_MULTIPROC_DIR']))"
)
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
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


def test_the_feast_folder_goes_as_soon_as_feast_is_imported(tmp_path: Path) -> None:
    """So a process a signal ends (no exit hooks) leaves no empty folder behind."""
    assert run(KILLED, tmp_path) == ["True", "False", "False"]
    assert not list(tmp_path.iterdir())


def test_a_child_that_is_not_mlsd_makes_its_own_feast_folder(tmp_path: Path) -> None:
    """Feast's CLI started from an mlsd process must not write into the removed folder."""
    assert run(NOT_MLSD_CHILD, tmp_path) == ["True"]  # its own, removed at its exit
    assert not list(tmp_path.iterdir())
