"""The closed loop, end to end: serve → simulate → drift → alert → retrain → promote → recover.

Usage::

    python scripts/closed_loop.py --out /tmp/closed-loop            # default size, a few minutes
    python scripts/closed_loop.py --out /tmp/cl --users 1500 --items 500 --events 150000 \\
        --requests 800                                              # small (the slow test)

What happens, on a simulated world whose tastes drift at ``drift_at`` (T0):

1. **world**: the full world is synthesized into ``OUT/world-full``; the service's dataset
   ``OUT/world`` is a contract-valid copy holding only the events before T0 - 1 day (what was
   known when the first model was trained), checked with ``mlsd data validate``.
2. **features, train, register, promote**: ``mlsd feed features apply/materialize`` and
   ``mlsd feed train --register --promote`` into an MLflow SQLite registry under ``OUT``.
3. **serve**: ``mlsd feed serve`` on the registry's champion, as a subprocess with a service
   log (``OUT/service-log``, ranker rows of ``--candidates-rate`` of the requests, enough for
   the drift statistics) and an admin token; it is stopped on exit, whatever happens.
4. **before drift**: simulated users (the world's pre-drift tastes) make requests over the
   simulated day before T0, which starts where the service's data ends (a clock inside that
   data would serve requests whose features count events from their future) → CTR before.
5. **after drift**: the same service, users with the post-drift tastes, over the day after T0
   → CTR after drift. ``mlsd feed monitor`` over that phase's window fires the alert.
   The ``ctr_drop`` baseline (``--reference-ctr``) is the CTR the monitor measured in the
   before-drift window: the profile's training-time CTR is the base rate of the ranker's
   candidates, a different quantity from the CTR of served top-k lists under position bias.
   The feature and prediction drift rules compare the logged ranker inputs with the model's
   reference profile (``OUT/reference_profile.json``: its inputs as served at the request
   moments of its last label window, see :mod:`mlsd.systems.feed.package`); the same rules
   on the before-drift window show what fires without drift: nothing at the default size
   (largest PSI 0.18; ``item_age_days``, a clock in a 30-day world, is reported as
   time-trending and does not alert); with a few hundred logged requests (the slow test's
   size) PSI noise alone comes near the 0.25 threshold.
   What the feature-drift rule sees after the drift is *not* the taste drift: a control run
   with ``--drift-strength 0.001`` fires it as much on its second day (largest PSI 0.65, vs
   0.73 with the drift; ``session_events``, ``events_1d``, ``score_popularity``),
   because by then the online store counts a day of pushed events without expiry (it catches
   up at the next materialization) and the items the service showed and users viewed have
   left the candidate lists. A change of tastes moves which items users click, not the
   ranker's inputs; the ``ctr_drop`` rule is the one that catches it.
6. **fresh data**: the service's dataset gets the world's full event log (T0 + 7 days of
   post-drift events) and the online store is re-materialized (the running service reads it
   at once) → an extra phase measures the old model on fresh features, which separates what
   re-materializing buys from what retraining buys.
7. **retrain**: ``mlsd feed retrain --reload-url`` (train → evaluate → gate → reload). The gate
   scores the champion and the new model head to head on the new model's held-out window (the
   newest data) and the report keeps both values; ``--force`` promotes whatever it says.
8. **after retraining**: post-drift users again, at the end of the fresh data (T1 = T0 + 7
   days, the same weekday and hours as the after-drift phase) → CTR after retraining.

Simulated users behave like the world's: the panel is every user (``--panel`` narrows it),
requests per user follow activity, and a request posts a view per examined item, as a world
session holds the items a user went through. Every phase uses its own simulator seed (a rerun
of the same draws against a service that learned from them is biased). Reported per phase: CTR
with a 95% Wilson interval over exposures, and the expected CTR (the true click probability of
what was served, position bias included): the same quantity without the click-draw noise.
Writes ``OUT/closed_loop.json`` and ``OUT/closed_loop.html``; exits 1 if a phase fails or the
loop does not close.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlsd.cli import run
from mlsd.data.schema import (
    EVENTS_FILE,
    INFO_FILE,
    QUARANTINE_FILE,
    content_hash,
    read_info,
    write_info,
)
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.data.sources.world import World
from mlsd.evaluation.preferences import WorldPreferences
from mlsd.evaluation.simulator import SimulationResult, simulate
from mlsd.monitoring.profile import NumericProfile, ReferenceProfile
from mlsd.serving.process import ServiceFailedError, free_port, mlsd_command, running_service
from mlsd.serving.registry import ModelRegistry, RegistryConfig
from mlsd.systems.feed import retrain as _retrain  # noqa: F401  (registers `mlsd feed retrain`)

REPO = Path(__file__).resolve().parents[1]
PHASES = ("before drift", "after drift", "fresh features", "after retraining")
PROFILE = "reference_profile.json"
OBSERVED_CHECK = "observed CTR after retraining > after drift (informative: click draws are noisy)"
"""Reported, not required for success: at small sizes the click draws can reverse a real gain
that the expected CTR (the true click probability of what was served) shows."""
Z95 = 1.959964


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and knobs of one run (the defaults run in a few minutes on 2 cores)."""

    out: Path
    config: Path = REPO / "configs" / "feed-demo.toml"
    users: int = 3_000
    items: int = 2_000
    events: int = 300_000
    seed: int = 7
    drift_strength: float = 0.8
    requests: int = 2_000
    panel: int = 0  # 0: every user of the world
    candidates_rate: float = 0.25  # share of requests whose ranker rows the service logs
    start: str = "2024-01-01"  # a Monday
    drift_at: str = "2024-01-24"  # a Wednesday; the world ends a week later, also a Wednesday
    days: int = 30
    concurrency: int = 2
    force: bool = False  # promote the retrained model even if the gate refuses it

    def world(self) -> WorldConfig:
        return WorldConfig(
            n_users=self.users,
            n_items=self.items,
            n_events=self.events,
            seed=self.seed,
            start=self.start,
            days=self.days,
            drift_at=self.drift_at,
            drift_kind="tastes",
            drift_strength=self.drift_strength,
        )


@dataclass
class Phase:
    """One simulation phase's figures (CTR interval: Wilson, 95%, over exposures)."""

    name: str
    model_version: str
    clock_start: str
    requests: int
    exposures: int
    clicks: int
    ctr: float
    ctr_low: float
    ctr_high: float
    expected_ctr: float
    wall_start: str
    wall_end: str

    @classmethod
    def of(cls, name: str, result: SimulationResult, wall: tuple[datetime, datetime]) -> Phase:
        versions = sorted(
            result.by_model_version, key=lambda v: -result.by_model_version[v].exposures
        )
        low, high = wilson(result.clicks, result.exposures)
        return cls(
            name=name,
            model_version=versions[0] if versions else "-",
            clock_start=result.start,
            requests=result.answered,
            exposures=result.exposures,
            clicks=result.clicks,
            ctr=result.ctr,
            ctr_low=low,
            ctr_high=high,
            expected_ctr=result.total.expected_ctr,
            wall_start=wall[0].isoformat(),
            wall_end=wall[1].isoformat(),
        )


@dataclass
class Report:
    """What ``closed_loop.json`` holds."""

    config: dict[str, Any]
    phases: list[Phase] = field(default_factory=list)
    alerts_before: list[str] = field(default_factory=list)
    alerts_fired: list[str] = field(default_factory=list)
    monitor: dict[str, Any] = field(default_factory=dict)
    registry_versions: dict[str, int | None] = field(default_factory=dict)
    retrain_exit_code: int | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class PhaseError(RuntimeError):
    """A step of the demo failed; the message names it."""


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``(nan, nan)`` when ``n`` is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ---------------------------------------------------------------- data


def truncate_dataset(full: Path, out: Path, before: datetime) -> None:
    """A contract-valid copy of ``full`` with the events before ``before`` (world files kept)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(
        full, out, ignore=shutil.ignore_patterns(EVENTS_FILE, INFO_FILE, "feature_repo")
    )
    (out / QUARANTINE_FILE).unlink(missing_ok=True)
    events = pq.read_table(full / EVENTS_FILE)
    kept = events.filter(pc.less(events["ts"], pd.Timestamp(before)))
    pq.write_table(kept, out / EVENTS_FILE, compression="zstd")
    write_events_info(full, out, kept.num_rows, kept["ts"])


def replace_events(full: Path, dataset: Path) -> None:
    """Give ``dataset`` the full event log of ``full`` (the fresh data) and its dataset.json."""
    shutil.copyfile(full / EVENTS_FILE, dataset / EVENTS_FILE)
    events = pq.read_table(dataset / EVENTS_FILE, columns=["ts"])
    write_events_info(full, dataset, events.num_rows, events["ts"])


def write_events_info(full: Path, out: Path, n_events: int, ts: Any) -> None:
    info = read_info(full)
    extra = dict(info.extra)
    extra["truncated_from"] = {"n_events": info.n_events, "ts_max": info.ts_max}
    info = dataclasses.replace(
        info,
        name=info.name,
        n_events=n_events,
        ts_min=pc.min(ts).as_py().isoformat(),
        ts_max=pc.max(ts).as_py().isoformat(),
        extra=extra,
    )
    info.content_hash = content_hash(out)
    write_info(out, info)


# ---------------------------------------------------------------- the service


def demo_config(cfg: DemoConfig) -> Path:
    """``cfg.config`` with ``[service_log] candidates_sample_rate`` set for the demo, in ``OUT``.

    The drift statistics need enough logged requests: user-level features repeat over a
    request's candidates, so a phase's effective sample is its logged requests (2% of 2,000
    is 40, where the PSI of a 10-bin feature is ~0.2 from noise alone). A config that has its
    own ``[service_log]`` section is used as it is.
    """
    text = cfg.config.read_text()
    if "[service_log]" not in text:
        text += f"\n[service_log]\ncandidates_sample_rate = {cfg.candidates_rate}\n"
    path = cfg.out / "feed.toml"
    path.write_text(text)
    return path


@contextmanager
def service(cfg: DemoConfig, dataset: Path, token: str) -> Iterator[str]:
    """``mlsd feed serve`` on the registry's champion in a subprocess; yields its URL; stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["feed", "serve", "--dataset", str(dataset), "--config", str(cfg.out / "feed.toml")]
    args += ["--base-dir", str(cfg.out), "--port", str(port)]
    args += ["--log-dir", str(cfg.out / "service-log")]
    env = {**os.environ, "MLSD_ADMIN_TOKEN": token}
    env.pop("MLSD_TRACKING_URI", None)  # the registry is OUT's SQLite file
    try:
        with running_service(
            mlsd_command(*args), url=url, output=cfg.out / "serve.log", env=env,
            ready_timeout_s=180, stop_timeout_s=20,
        ):  # fmt: skip
            yield url
    except ServiceFailedError as exc:
        raise PhaseError(str(exc)) from exc


def wait_for_log(log_dir: Path, requests: int, start: datetime, timeout_s: float = 30.0) -> None:
    """Wait until the service log holds the phase's request rows (it flushes every ~2 s)."""
    from mlsd.monitoring.log_reader import read_table

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_table(log_dir, "requests", start=start, columns=["ts"]).num_rows >= requests:
            time.sleep(2.5)  # the feedback of the last batch is flushed a moment later
            return
        time.sleep(0.5)
    raise PhaseError(f"the service log {log_dir} did not receive {requests} requests in time")


# ---------------------------------------------------------------- the loop


def simulate_phase(
    cfg: DemoConfig, url: str, world: World, name: str, *, regime: str, clock: datetime, seed: int
) -> Phase:
    prefs = WorldPreferences(world, force_regime="after" if regime == "after" else "before")
    began = datetime.now(UTC)
    result = simulate(
        url,
        prefs,
        n_users=cfg.panel or cfg.users,
        n_requests=cfg.requests,
        start_ts=clock.isoformat(),
        seconds_per_request=86_400 / cfg.requests,  # one simulated day: every hour of it
        seed=seed,
        concurrency=cfg.concurrency,
        progress=False,
    )
    ended = datetime.now(UTC)
    if result.answered < 0.95 * cfg.requests:
        raise PhaseError(f"{name}: only {result.answered}/{cfg.requests} requests answered "
                         f"({result.errors_by_kind})")  # fmt: skip
    phase = Phase.of(name, result, (began, ended))
    print(f"[{name}] model {phase.model_version}: CTR {phase.ctr:.4f} "
          f"[{phase.ctr_low:.4f}, {phase.ctr_high:.4f}], expected CTR {phase.expected_ctr:.4f} "
          f"({phase.exposures:,} exposures, {result.wall_seconds:.0f} s)", flush=True)  # fmt: skip
    wait_for_log(cfg.out / "service-log", result.answered, began - timedelta(seconds=1))
    return phase


def monitor_window(
    cfg: DemoConfig, phase: Phase, reference: Path, out: Path, reference_ctr: float | None = None
) -> tuple[int, dict[str, Any]]:
    """``mlsd feed monitor`` over a phase's wall-clock window; (exit code, monitor.json)."""
    # The log's tables are stamped with the service's clock, so a phase is its wall-clock span.
    start = datetime.fromisoformat(phase.wall_start) - timedelta(seconds=0.5)
    end = datetime.fromisoformat(phase.wall_end) + timedelta(seconds=0.5)
    seconds = math.ceil((end - start).total_seconds())
    baseline = [] if reference_ctr is None else ["--reference-ctr", str(reference_ctr)]
    # The simulated users click within their request's round trip and the phase has waited
    # for the log writer, so every click of the phase is in: no exposure is too young.
    code = run(["feed", "monitor", "--log-dir", str(cfg.out / "service-log"),
                "--config", str(cfg.out / "feed.toml"), "--label-delay", "0",
                "--reference", str(reference), "--window", f"{seconds}s",
                "--end", end.isoformat(), "--out", str(out), *baseline])  # fmt: skip
    if code not in (0, 1):
        raise PhaseError(f"mlsd feed monitor failed with exit code {code}")
    return code, json.loads((out / "monitor.json").read_text())


def reference_profile(model_dir: Path, path: Path) -> Path:
    """The model's training profile, copied to ``path``.

    A model without one (trained before training wrote profiles) gets an empty profile: the
    feature and prediction drift rules then report "no data".
    """
    source = model_dir / PROFILE
    if source.is_file():
        return ReferenceProfile.load(source).save(path)
    empty = ReferenceProfile(numeric={}, categorical={}, prediction=NumericProfile.build([]))
    return empty.save(path)


def gate_verdict(registry: ModelRegistry) -> dict[str, Any]:
    """What the gate said about the newest version against the previous champion.

    ``head to head``: both models' NDCG@10 on the same rows, the retrained model's held-out
    users of its last label window (what the gate decided on); ``stored``: each version's
    NDCG@10 on its own training data's window, kept to show why those do not compare (the
    first model's window is pre-drift, the retrained one's post-drift).
    """
    infos = registry.versions()
    new, old = infos[-1], infos[-2]
    return {
        "metric": registry.config.gate_metric,
        "tolerance": registry.config.gate_tolerance,
        "head to head": dict(new.head_to_head) if new.head_to_head is not None else None,
        "stored": {f"v{old.version} (champion)": old.gate_value, f"v{new.version}": new.gate_value},
        "promoted": registry.champion() == new.version,
    }


def step(name: str, args: list[str], seconds: dict[str, float]) -> int:
    print(f"\n=== {name}: mlsd {' '.join(args)}", flush=True)
    began = time.perf_counter()
    code = run(args)
    seconds[name] = round(time.perf_counter() - began, 1)
    return code


def closed_loop(cfg: DemoConfig, report: Report) -> None:
    """Run every phase, filling ``report`` as it goes (so a failure still leaves a report)."""
    out, secs = cfg.out, report.seconds
    full, dataset = out / "world-full", out / "world"
    world_cfg = cfg.world()
    drift_at = datetime.fromisoformat(cfg.drift_at).replace(tzinfo=UTC)
    world_end = datetime.fromisoformat(cfg.start).replace(tzinfo=UTC) + timedelta(days=cfg.days)
    began = time.perf_counter()
    synthesize(world_cfg, full, progress=False)
    truncate_dataset(full, dataset, drift_at - timedelta(days=1))  # the before-drift day
    secs["world"] = round(time.perf_counter() - began, 1)
    world = World.load(full)
    config = demo_config(cfg)
    base = ["--dataset", str(dataset), "--config", str(config)]
    for name, args in (
        ("validate", ["data", "validate", str(dataset)]),
        ("features apply", ["feed", "features", "apply", *base]),
        ("features materialize", ["feed", "features", "materialize", *base]),
        ("train", ["feed", "train", *base, "--out", str(out / "models" / "initial"),
                   "--register", "--promote", "--base-dir", str(out)]),
    ):  # fmt: skip
        if step(name, args, secs) != 0:
            raise PhaseError(f"{name} failed")
    registry = ModelRegistry(RegistryConfig(), out)
    report.registry_versions["initial champion"] = registry.champion()
    token = secrets.token_urlsafe(16)
    with service(cfg, dataset, token) as url:
        day = timedelta(days=1)
        # The store holds the events before T0 - 1 day, where this phase starts: a phase inside
        # the known data would serve requests whose features count events from their future.
        before = simulate_phase(cfg, url, world, PHASES[0], regime="before",
                                clock=drift_at - day, seed=cfg.seed * 100 + 1)  # fmt: skip
        report.phases.append(before)
        after = simulate_phase(cfg, url, world, PHASES[1], regime="after", clock=drift_at,
                               seed=cfg.seed * 100 + 2)  # fmt: skip
        report.phases.append(after)
        # The ctr_drop baseline: the live CTR of the before-drift window, as the monitor sees it.
        initial = out / "models" / "initial"
        reference = reference_profile(initial, out / PROFILE)
        _, seen = monitor_window(cfg, before, reference, out / "monitor-training-reference")
        live_ctr = seen["metrics"].get("ctr")
        if live_ctr is None:
            raise PhaseError("the monitor saw no clicks in the before-drift window")
        baseline = float(live_ctr)
        # The same reference on the before-drift window: which rules fire without drift.
        _, quiet = monitor_window(cfg, before, reference, out / "monitor-before-drift", baseline)
        report.alerts_before = list(quiet["fired"])
        code, result = monitor_window(cfg, after, reference, out / "monitor-after-drift", baseline)
        report.alerts_fired = list(result["fired"])
        report.monitor = {"metrics": result["metrics"], "reference": result["reference_metrics"],
                          "metrics before drift": quiet["metrics"]}  # fmt: skip
        print(f"\n[monitor] exit {code}; fired: {report.alerts_fired or 'none'}", flush=True)
        if code != 1:
            raise PhaseError("the drift alert did not fire after drift")
        replace_events(full, dataset)
        if step("materialize fresh", ["feed", "features", "materialize", *base], secs) != 0:
            raise PhaseError("re-materializing the fresh features failed")
        report.phases.append(simulate_phase(cfg, url, world, PHASES[2], regime="after",
                                            clock=world_end, seed=cfg.seed * 100 + 3))  # fmt: skip
        os.environ["MLSD_ADMIN_TOKEN"] = token
        retrain = ["feed", "retrain", *base, "--base-dir", str(out), "--reload-url", url,
                   "--out", str(out / "models" / "retrained")]  # fmt: skip
        report.retrain_exit_code = step("retrain", retrain + ["--force"] * cfg.force, secs)
        # exit 1: the gate refused the retrained model (reported, then the loop stops).
        report.gate = gate_verdict(registry)
        report.registry_versions["champion after retrain"] = registry.champion()
        if report.retrain_exit_code != 0:
            raise PhaseError(f"mlsd feed retrain exited {report.retrain_exit_code}")
        report.phases.append(simulate_phase(cfg, url, world, PHASES[3], regime="after",
                                            clock=world_end, seed=cfg.seed * 100 + 4))  # fmt: skip
    before, after, _, retrained = (next(p for p in report.phases if p.name == n) for n in PHASES)
    report.checks = {
        "an alert fired after drift that was quiet before": bool(
            set(report.alerts_fired) - set(report.alerts_before)
        ),
        "expected CTR after drift < before": after.expected_ctr < before.expected_ctr,
        "expected CTR after retraining > after drift": retrained.expected_ctr > after.expected_ctr,
        OBSERVED_CHECK: retrained.ctr > after.ctr,
        "a new version serves after retraining": retrained.model_version != after.model_version,
    }


# ---------------------------------------------------------------- the report


def plot_phases(phases: list[Phase]) -> str:
    """CTR (with its 95% interval) and expected CTR per phase, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mlsd.evaluation.report import png_data_uri

    figure, ax = plt.subplots(figsize=(7.0, 3.4))
    x = np.arange(len(phases))
    ctr = np.array([p.ctr for p in phases])
    err = np.array([[p.ctr - p.ctr_low for p in phases], [p.ctr_high - p.ctr for p in phases]])
    ax.bar(x - 0.2, ctr, width=0.4, yerr=err, capsize=4, label="CTR (95% CI)", color="#d64")
    expected = [p.expected_ctr for p in phases]
    ax.bar(x + 0.2, expected, width=0.4, label="expected CTR", color="#8aa")
    ax.set_xticks(x, [f"{p.name}\n{p.model_version}" for p in phases], fontsize=7)
    ax.set_ylabel("clicks per exposure")
    ax.set_title("simulated CTR through the closed loop", fontsize=9)
    ax.legend(fontsize=7)
    return png_data_uri(figure)


def render_html(report: Report) -> str:
    """A small self-contained page: the phases, the alerts, the versions, the checks, a plot."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(p.name)}</td><td>{escape(p.model_version)}</td>"
        f"<td>{escape(p.clock_start)}</td><td>{p.exposures:,}</td><td>{p.clicks:,}</td>"
        f"<td>{p.ctr:.4f} [{p.ctr_low:.4f}, {p.ctr_high:.4f}]</td>"
        f"<td>{p.expected_ctr:.4f}</td></tr>"
        for p in report.phases
    )
    checks = "".join(
        f"<li>{'✔' if ok else '✘'} {escape(name)}</li>" for name, ok in report.checks.items()
    )
    versions = ", ".join(f"{escape(k)}: v{v}" for k, v in report.registry_versions.items())
    plot = f'<img alt="CTR by phase" src="{plot_phases(report.phases)}">' if report.phases else ""
    error = f"<p class=error>failed: {escape(report.error)}</p>" if report.error else ""
    metrics = escape(json.dumps(report.monitor, indent=1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mlsd closed loop</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:2px 8px;
text-align:right}}td:first-child,th:first-child{{text-align:left}}.error{{color:#b00}}</style>
</head><body><h1>Closed loop: drift → alert → retrain → recovery</h1>{error}
<p>Simulated users click by the world's true probabilities with position bias
(1/log2(position+2)). CTR intervals: Wilson 95% over exposures. Expected CTR: the true click
probability of what was served, summed over exposures — CTR without the click-draw noise.</p>
<table><tr><th>phase</th><th>model</th><th>simulated clock</th><th>exposures</th><th>clicks</th>
<th>CTR [95% CI]</th><th>expected CTR</th></tr>{rows}</table>{plot}
<h2>Alerts</h2><p>after drift: {escape(", ".join(report.alerts_fired) or "none fired")};
before drift (same reference): {escape(", ".join(report.alerts_before) or "none fired")}.
The CTR-drop baseline is the CTR the monitor measured in the before-drift window.</p>
<pre>{metrics}</pre><h2>Registry</h2><p>{versions}; retrain exit code
{report.retrain_exit_code}</p>{gate_html(report.gate)}
<h2>Checks</h2><ul>{checks}</ul></body></html>
"""


def gate_html(gate: dict[str, Any]) -> str:
    """The gate's head-to-head as a sentence, and the stored values it did not use."""
    from html import escape

    duel = gate.get("head to head")
    if not duel:
        return f"<p>gate: {escape(json.dumps(gate))}</p>"
    verdict = "accepted" if duel["accepted"] else "refused"
    return (
        f"<p>gate ({escape(gate['metric'])}, tolerance {gate['tolerance']:g}), head to head on "
        f"{escape(duel['data'])}: retrained model {duel['candidate_value']:.4f} vs champion "
        f"v{duel['champion_version']} {duel['champion_value']:.4f} → {verdict}"
        f"{'' if gate['promoted'] == duel['accepted'] else ' (forced)'}. The stored values, "
        f"each on its own training window, would compare pre- with post-drift data: "
        f"{escape(json.dumps(gate['stored']))}.</p>"
    )


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "closed_loop.json", out / "closed_loop.html"
    json_path.write_text(json.dumps(dataclasses.asdict(report), indent=2, default=str) + "\n")
    html_path.write_text(render_html(report))
    return json_path, html_path


def main(argv: list[str] | None = None) -> int:
    defaults = DemoConfig(out=Path())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Output folder (use /tmp).")
    parser.add_argument("--force", action="store_true",
                        help="Promote the retrained model whatever the gate says.")  # fmt: skip
    for name in ("config", "users", "items", "events", "seed", "drift_strength", "requests",
                 "panel", "candidates_rate", "concurrency"):  # fmt: skip
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    cfg = DemoConfig(**vars(args))
    if cfg.out.exists():
        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True)
    report = Report(config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
    began = time.perf_counter()
    try:
        closed_loop(cfg, report)
    except (PhaseError, ValueError, OSError, httpx.HTTPError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    report.seconds["total"] = round(time.perf_counter() - began, 1)
    json_path, html_path = write_report(report, cfg.out)
    print("\nphase               model                CTR [95% CI]                expected CTR")
    for p in report.phases:
        print(f"{p.name:<19} {p.model_version:<20} {p.ctr:.4f} [{p.ctr_low:.4f}, "
              f"{p.ctr_high:.4f}]    {p.expected_ctr:.4f}")  # fmt: skip
    print(f"alerts fired after drift: {', '.join(report.alerts_fired) or 'none'}; "
          f"before drift: {', '.join(report.alerts_before) or 'none'}")  # fmt: skip
    duel = report.gate.get("head to head")
    if duel:
        print(f"gate, head to head on {duel['data']}: retrained {duel['candidate_value']:.4f} "
              f"vs champion v{duel['champion_version']} {duel['champion_value']:.4f} "
              f"({'accepted' if duel['accepted'] else 'refused'})")  # fmt: skip
    for name, ok in report.checks.items():
        print(f"{'ok  ' if ok else 'note' if name == OBSERVED_CHECK else 'FAIL'} {name}")
    print(f"report: {html_path}\njson:   {json_path}\ntotal {report.seconds['total']:.0f} s")
    if report.error:
        print(f"FAILED: {report.error}", file=sys.stderr)
        return 1
    return 0 if all(ok for name, ok in report.checks.items() if name != OBSERVED_CHECK) else 1


if __name__ == "__main__":
    sys.exit(main())
