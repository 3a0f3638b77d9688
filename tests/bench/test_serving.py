"""bench/serving.py's account of the whole machine's CPU over a load phase."""

from __future__ import annotations

import importlib
import os

import pytest

serving = importlib.import_module("bench.serving")  # bench/ is scripts, not a package

STAT = """cpu  100 10 50 1000 20 5 5 40 0 0
cpu0 50 5 25 500 10 2 3 20 0 0
intr 12345
"""


def test_machine_ticks_read_the_whole_machine_line_not_a_cpu_of_it() -> None:
    ticks = serving.machine_ticks(STAT)
    assert ticks == {
        "user": 100,
        "nice": 10,
        "system": 50,
        "idle": 1000,
        "iowait": 20,
        "irq": 5,
        "softirq": 5,
        "steal": 40,
    }


def test_machine_ticks_of_this_machine_grow() -> None:
    before = serving.machine_ticks()
    sum(i * i for i in range(2_000_000))  # some CPU time, so some counter moves
    after = serving.machine_ticks()
    assert all(after[kind] >= before[kind] for kind in serving.MACHINE_TICKS)
    assert sum(after.values()) > sum(before.values())


def test_machine_cores_split_busy_steal_and_what_no_measured_process_used() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    before = serving.machine_ticks(STAT)
    wall = 10.0
    # over 10 s: 1.5 cores busy (user 1.0, system 0.3, softirq 0.2), 0.25 stolen, 0.1 iowait
    after = dict(before)
    after["user"] += int(1.0 * hz * wall)
    after["system"] += int(0.3 * hz * wall)
    after["softirq"] += int(0.2 * hz * wall)
    after["steal"] += int(0.25 * hz * wall)
    after["iowait"] += int(0.1 * hz * wall)
    after["idle"] += int(0.2 * hz * wall)
    cores = serving.machine_cores(before, after, wall, accounted_cores=1.2)
    assert cores == pytest.approx(
        {"busy": 1.5, "steal": 0.25, "iowait": 0.1, "unaccounted": 0.3}, abs=1e-3
    )
    # processes measured apart can add up to a little more than the machine's ticks (each
    # rounds to its own ticks): never a negative share of the machine
    assert serving.machine_cores(before, after, wall, accounted_cores=1.6)["unaccounted"] == 0
