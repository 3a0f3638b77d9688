"""bench/serving.py's account of the whole machine's CPU over a load phase."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def test_a_groups_cpu_counts_its_children_and_grandchildren(tmp_path: Path) -> None:
    """The service's log writer and monitor are its children: their CPU is the service's."""
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    script = tmp_path / "burn.py"
    script.write_text(burn)
    spawn = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, {str(script)!r}])\n"
        "sys.stdout.write('started\\n'); sys.stdout.flush()\n"
        "child.wait(); time.sleep(5)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", spawn], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == "started\n"
        roots = {"server": [parent.pid]}
        before = serving.cpu_by_process(roots)
        assert parent.pid in before["server"]
        assert len(before["server"]) == 2
        time.sleep(1.0)  # the grandchild burns 0.4 s and is reaped into its parent's counts
        after = serving.cpu_by_process(roots)
        own, children = serving.cpu_used(before["server"], after["server"], [parent.pid])
        assert own + children == pytest.approx(0.4, abs=0.15)
    finally:
        parent.kill()
        parent.wait()


def test_cpu_used_splits_roots_from_descendants_and_counts_new_processes_whole() -> None:
    before = {10: 5.0, 11: 1.0}
    after = {10: 6.5, 11: 1.25, 12: 0.5}  # 12 started in between
    assert serving.cpu_used(before, after, [10]) == (1.5, 0.75)


def record(at: float, path: str = "online", fallbacks: tuple[str, ...] = ()) -> dict[str, object]:
    return {
        "at": at, "lag_ms": 0.1, "done": at + 0.002, "latency_ms": 2.0, "path": path,
        "stage_ms": {"total": 1.0}, "fallbacks": list(fallbacks),
    }  # fmt: skip


def test_answers_off_the_phases_path_or_with_a_fallback_fail_it() -> None:
    """A model failing every request behind the popular-items fallback is no online path."""
    healthy = [record(1.0 + i / 1000) for i in range(2000)]
    phase = serving.summarize(healthy, 1.0, 3.0)
    assert phase["degraded"] == 0
    assert serving.passes(phase, 10.0, 0.0)
    assert serving.passes(phase, 50.0, serving.MAX_ERRORS)

    fallen = [record(1.0 + i / 1000, "fallback:popular", ("model",)) for i in range(2000)]
    phase = serving.summarize(fallen, 1.0, 3.0)
    assert phase["errors"] == 0
    assert phase["degraded"] == 2000
    assert not serving.passes(phase, 10.0, 0.0)
    assert not serving.passes(phase, 50.0, serving.MAX_ERRORS)

    # one answer in 2,000 skipped the ranker: 0.05% < 0.1% passes the throughput criterion,
    # never the target's "every answer online"
    one = [*healthy[:-1], record(2.999, fallbacks=("ranker:deadline",))]
    phase = serving.summarize(one, 1.0, 3.0)
    assert phase["degraded"] == 1
    assert serving.passes(phase, 50.0, serving.MAX_ERRORS)
    assert not serving.passes(phase, 10.0, 0.0)
    # the precomputed phase's path is "precomputed": an online answer there is degraded
    assert serving.summarize(healthy, 1.0, 3.0, path="precomputed")["degraded"] == 2000


def test_the_error_budget_is_strictly_below_its_share() -> None:
    phase = serving.summarize([record(1.0 + i / 1000) for i in range(1000)], 1.0, 3.0)
    phase["errors"] = 1  # 1 in 1,000 is not fewer than 0.1%
    assert not serving.passes(phase, 50.0, serving.MAX_ERRORS)


def test_max_rate_says_when_no_rate_tried_was_too_much(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def phase_at(limit: float) -> object:
        def load_phase(*_: object, rate: float, **__: object) -> dict[str, object]:
            p99 = 10.0 if rate <= limit else 80.0
            return {
                "rate": rate, "requests": 100, "achieved_rps": rate, "errors": 0, "degraded": 0,
                "error_kinds": {}, "latency_ms": {"p99": p99}, "paths": {"online": 100},
                "host_steal": {}, "fallbacks": {}, "stage_ms": {}, "cpu_cores": {},
                "server_children_cores": 0.0, "machine_cores": {}, "client_lag_ms": {},
                "drain_seconds": 0.0,
            }  # fmt: skip

        return load_phase

    args = argparse.Namespace(max_rate_steps=[50.0, 100.0, 200.0], bisect=2, step_duration=1.0)
    monkeypatch.setattr(serving, "load_phase", phase_at(1000.0))
    found = serving.max_throughput(args, None, {}, [])
    assert (found["max_rate"], found["bounded"], found["lowest_failing_rate"]) == (
        200.0, False, None
    )  # fmt: skip
    monkeypatch.setattr(serving, "load_phase", phase_at(120.0))
    found = serving.max_throughput(args, None, {}, [])
    # 50 and 100 pass, 200 fails; bisected: 150 fails, then 125 fails
    assert (found["max_rate"], found["bounded"], found["lowest_failing_rate"]) == (
        100.0, True, 125
    )  # fmt: skip


def test_steal_is_counted_between_the_samples_around_a_request() -> None:
    sampler = serving.StealSampler(time.perf_counter)
    sampler.times = [0.0, 0.01, 0.02, 0.03, 0.04]
    sampler.ticks = [5, 5, 7, 7, 8]
    assert sampler.during(0.001, 0.009) == 0  # between two samples that did not move
    assert sampler.during(0.011, 0.019) == 2  # the counter moved within the span
    assert sampler.during(0.025, 0.05) == 1  # past the last sample: up to it
    assert serving.StealSampler(time.perf_counter).during(0.0, 1.0) == 0  # no samples
    live = serving.StealSampler(time.perf_counter, interval_s=0.001)
    live.start()
    time.sleep(0.05)
    live.stop()
    assert len(live.times) > 5
    assert live.ticks == sorted(live.ticks)  # a counter


def test_answers_the_host_took_the_machine_from_are_reported_apart() -> None:
    answers = [{**record(1.0 + i / 1000), "steal_ticks": 0} for i in range(200)]
    for r in answers[:3]:
        r["latency_ms"], r["steal_ticks"] = 80.0, 1
    phase = serving.summarize(answers, 1.0, 3.0)
    assert phase["host_steal"] == {
        "answers_touched": 3, "touched_p99_ms": 80.0, "untouched_p99_ms": 2.0
    }  # fmt: skip
    assert phase["latency_ms"]["p99"] == 80.0  # the phase's own p99 keeps them


def test_the_load_worker_drives_with_the_garbage_collector_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection over the growing records paused the client ~60 ms once a phase, and the
    requests scheduled in the pause carried it as latency."""
    import gc
    import io
    import json

    seen: list[bool] = []

    async def drive(spec: dict[str, object]) -> dict[str, object]:
        seen.append(gc.isenabled())
        return {"records": []}

    out = tmp_path / "records.json"
    monkeypatch.setattr(serving, "drive", drive)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"out": str(out)})))
    try:
        serving.load_worker()
    finally:
        gc.enable()
    assert seen == [False]
    assert json.loads(out.read_text()) == {"records": []}


def test_another_config_builds_on_the_cached_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The world is every config's; the feature store is shared by configs with the same
    # [features] and [feature_store]; the model is per config.
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the configs' relative paths
    ran: list[str] = []

    def run_step(name: str, command: list[str], log_path: Path) -> dict[str, float]:
        ran.append(name)
        return {"seconds": 1.0}

    monkeypatch.setattr(serving, "run_step", run_step)
    other = tmp_path / "other.toml"  # the demo with other features
    other.write_text(Path("configs/feed-demo.toml").read_text() + "\n[features]\nhistory_len = 7\n")

    def build(config: str | Path) -> list[str]:
        ran.clear()
        args = ["--build-only", "--config", str(config), "--cache", str(tmp_path / "cache")]
        built = serving.build(serving.parse_args(args))
        assert built["config"] == str(config)
        return list(ran)

    world = ["synth", "validate", "split"]
    assert build("configs/feed-demo.toml") == [
        *world,
        "features_apply",
        "features_materialize",
        "train",
    ]
    assert build("configs/feed-demo.toml") == []
    assert build("configs/feed.toml") == ["train"]  # the same feature settings as the demo's
    assert build(other) == ["features_apply", "features_materialize", "train"]
    assert build("configs/feed.toml") == ["features_apply", "features_materialize"]
    assert build("configs/feed.toml") == []
    # A cache from before the records were split kept every step in the config's record.
    root = next((tmp_path / "cache").iterdir())
    config_hash = hashlib.sha256(Path("configs/feed-demo.toml").read_bytes()).hexdigest()[:10]
    steps = [*world, "features_apply", "features_materialize", "train"]
    for record in root.glob("steps-*.json"):
        record.unlink()
    (root / f"steps-{config_hash}.json").write_text(json.dumps(dict.fromkeys(steps, 1.0)))
    assert build("configs/feed-demo.toml") == []
