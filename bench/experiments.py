"""Online-experiment benchmark: popularity vs the pipeline, the A/A false-positive rate and SRM.

Every phase starts ``mlsd feed serve --config TMP --model MODEL --log-dir LOG`` (TMP is
``--config`` plus an ``[experiments]`` table) on one copy of the dataset (the service writes
the simulated feedback into its online store, so the original stays untouched), lets the
world's simulated users (:func:`mlsd.evaluation.simulator.simulate`, a fresh seed and the next
simulated day per phase, so the store only ever sees time move forward) request feeds and click,
and reads the service log with :func:`mlsd.evaluation.experiments.experiment_report`:

1. **ab** ``pipeline-vs-popular``: control ``popular`` (the dataset's popularity baseline),
   treatment ``champion`` (``--model``), 50/50. A pilot measures the control CTR, the lift and
   the design effect (delta-method variance of the CTR over users / the binomial variance over
   exposures); :func:`~mlsd.evaluation.experiments.sample_size` then sizes the main run for
   half the pilot's lift (pilots are noisy and the lucky ones get acted on; ``--mde`` fixes
   it), capped by ``--max-requests``. The decision is the delta-method CTR test.
2. **aa** ``aa``: both arms ``champion``. One simulation, then ``--resalts`` analyses with the
   arms re-drawn by new salts (``resalt=``): every arm served the same model, so each is an A/A
   test → false-positive rate of the decision test and of the naive per-exposure z-test.
   **SRM** on that log: declared ``--skew``/rest (the service assigned 50/50) → flagged; the
   true 50/50 → not. Then ``--aa-runs`` more simulated days on the same service, each an A/A
   experiment of its own (fresh seed and panel), analysed with the served split and with a
   fresh salt (what a restart with that salt would have logged; a restart costs ~40 s here).
3. **skew**: a service that really assigns ``--skew``/rest, analysed as 50/50 → flagged, and
   with its true weights → not. Both arms serve popularity: SRM is about assignment, and
   popularity requests are cheap.

Needs a built system with a simulated world: ``make demo`` writes ``demo-output/world`` and
``demo-output/model`` (the defaults); any ``mlsd data synth`` dataset with its feature store and
a model trained on it will do.

    .venv/bin/python bench/experiments.py --out /tmp/mlsd-experiments     # 9 min on 2 busy cores
    .venv/bin/python bench/experiments.py --phases ab --max-requests 4000  # the A/B test only

Prints one JSON document (progress goes to stderr); ``--out`` also keeps it there
(``experiments.json``) with each experiment report (``report-*.json``), the service logs and
configs. Exits 1 when a phase fails; the services are stopped whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pyarrow.compute as pc

from mlsd.data.schema import read_info
from mlsd.evaluation.experiments import (
    Arm,
    Experiment,
    ExperimentReport,
    experiment_report,
    power,
    sample_size,
    wilson_ci,
)
from mlsd.evaluation.preferences import WorldPreferences
from mlsd.evaluation.simulator import SimulationResult, simulate
from mlsd.monitoring.log_reader import read_table
from mlsd.serving.process import ServiceFailedError, free_port, mlsd_command, running_service

REPO = Path(__file__).resolve().parents[1]
PHASES = ("ab", "aa", "skew")
FPR_TARGET = (0.01, 0.10)
MIN_MDE = 0.05  # a planning lift below this would ask for more traffic than the bench has


class BenchError(RuntimeError):
    """A phase failed; the message says which and where to look."""


@dataclass(frozen=True)
class Sizes:
    """Traffic per phase. A panel of ``requests / requests_per_user`` users makes the requests."""

    pilot_requests: int = 1_000
    min_requests: int = 2_000
    max_requests: int = 12_000
    requests_per_user: float = 5.0
    aa_requests: int = 6_000
    aa_requests_per_user: float = 1.2  # ~3,000 users: SRM and re-salting count users
    resalts: int = 100
    skew_requests: int = 6_000
    skew_requests_per_user: float = 1.2
    aa_runs: int = 5
    aa_run_requests: int = 1_000
    k: int = 10
    concurrency: int = 2


@dataclass(frozen=True)
class BenchConfig:
    dataset: Path
    model: Path
    out: Path
    config: Path = REPO / "configs" / "feed-demo.toml"
    sizes: Sizes = field(default_factory=Sizes)
    phases: tuple[str, ...] = PHASES
    port: int = 0  # 0: a free port per service
    alpha: float = 0.05
    power: float = 0.8
    mde: float | None = None
    skew: float = 0.55
    seed: int = 0
    progress: bool = True


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the service


def prepare_dataset(source: Path, work: Path, config: Path) -> Path:
    """A copy of ``source`` whose feature repository points at the copy (paths are absolute)."""
    if not (source / "world.json").is_file():
        raise BenchError(f"{source}: no world.json; the simulator needs a simulated world")
    dataset = work / "world"
    shutil.copytree(source, dataset)
    args = ["feed", "features", "apply", "--dataset", str(dataset), "--config", str(config)]
    mlsd(args, work / "features-apply.log")
    return dataset


def mlsd(args: list[str], output: Path) -> None:
    """Run ``mlsd ARGS`` in a subprocess (keeps stdout for the JSON); raise if it fails."""
    command = [sys.executable, "-c", "from mlsd.cli import main; main()", *args]
    with output.open("w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise BenchError(f"mlsd {' '.join(args[:3])} exited with {code}; see {output}")


def write_config(base: Path, experiment: Experiment, path: Path) -> Path:
    """``base`` plus an ``[experiments]`` table running ``experiment``."""
    text = base.read_text()
    if "experiments" in tomllib.loads(text):
        raise BenchError(f"{base}: has an [experiments] table already; pass a config without")
    arms = ",\n".join(
        f"  {{ name = {json.dumps(a.name)}, alias = {json.dumps(a.alias)}, weight = {a.weight} }}"
        for a in experiment.arms
    )
    path.write_text(
        f"{text.rstrip()}\n\n[experiments]\nactive = {json.dumps(experiment.name)}\n\n"
        f"[[experiments.experiment]]\nname = {json.dumps(experiment.name)}\n"
        f"salt = {json.dumps(experiment.salt)}\narms = [\n{arms},\n]\n"
    )
    return path


@contextlib.contextmanager
def service(ctx: Context, experiment: Experiment, name: str) -> Iterator[tuple[str, Path]]:
    """``mlsd feed serve`` running ``experiment``; yields (URL, log dir); stopped on exit."""
    cfg, dataset = ctx.cfg, ctx.dataset
    config = write_config(cfg.config, experiment, cfg.out / f"{name}.toml")
    log_dir = cfg.out / "logs" / name
    port = cfg.port or free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["feed", "serve", "--dataset", str(dataset), "--config", str(config)]
    args += ["--model", str(cfg.model), "--log-dir", str(log_dir), "--port", str(port)]
    log(f"[{name}] serving {experiment.name} (salt {experiment.salt}) on {url}")
    began = time.perf_counter()
    try:
        with running_service(
            mlsd_command(*args), url=url, output=cfg.out / f"serve-{name}.log", stop_timeout_s=20
        ):
            log(f"[{name}] ready in {time.perf_counter() - began:.0f} s")
            yield url, log_dir
    except ServiceFailedError as exc:
        raise BenchError(str(exc)) from exc


def wait_for_log(log_dir: Path, result: SimulationResult, since: datetime) -> None:
    """Wait until the log holds the run's requests, exposures and clicks (flushed every ~2 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        requests = read_table(log_dir, "requests", start=since, columns=["ts"]).num_rows
        exposures = read_table(log_dir, "exposures", start=since, columns=["ts"]).num_rows
        events = read_table(log_dir, "feedback", start=since, columns=["event"])["event"]
        clicks = int(pc.sum(pc.equal(events, "click")).as_py() or 0)
        wanted = (result.answered, result.exposures, result.clicks)
        if all(
            got >= want for got, want in zip((requests, exposures, clicks), wanted, strict=True)
        ):
            return
        time.sleep(0.5)
    raise BenchError(f"the service log {log_dir} did not receive the run's rows within 60 s")


# ---------------------------------------------------------------- one simulated day


@dataclass
class Context:
    """What every phase shares: the options, the dataset copy, the users and the clock.

    The clock hands out simulated days in order (day ``n`` starts ``n`` days after ``start``),
    so the online store, which keeps the feedback of every phase, only sees time move forward.
    """

    cfg: BenchConfig
    dataset: Path
    prefs: WorldPreferences
    start: datetime
    days: int = 0

    def simulate_day(
        self, url: str, log_dir: Path, requests: int, per_user: float, seed: int
    ) -> tuple[SimulationResult, datetime]:
        """``requests`` over the next simulated day; (result, wall-clock start of the run)."""
        day = self.start + timedelta(days=self.days)
        self.days += 1
        began = datetime.now(UTC)  # the service stamps its log with this host's clock
        sizes = self.cfg.sizes
        result = simulate(
            url, self.prefs, n_users=max(2, round(requests / per_user)), n_requests=requests,
            k=sizes.k, start_ts=day, seconds_per_request=86_400 / requests,
            seed=self.cfg.seed * 100 + seed, concurrency=sizes.concurrency,
            progress=self.cfg.progress,
        )  # fmt: skip
        if result.answered < 0.95 * requests:
            kinds = result.errors_by_kind
            raise BenchError(f"{url}: {result.answered}/{requests} requests answered ({kinds})")
        wait_for_log(log_dir, result, began)
        arms = " ".join(f"{arm}={g.ctr:.4f}" for arm, g in result.by_arm.items())
        log(f"  {day:%Y-%m-%d}: {result.answered} requests in {result.wall_seconds:.0f} s, "
            f"CTR {result.ctr:.4f} ({arms})")  # fmt: skip
        return result, began


def save(cfg: BenchConfig, name: str, report: ExperimentReport) -> str:
    path = cfg.out / f"report-{name}.json"
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return str(path)


def decision(report: ExperimentReport) -> dict[str, Any]:
    """Per-arm CTRs with CIs and the first comparison (decision and naive test), SRM."""
    (comparison,) = report.comparisons
    ctr, naive = comparison.ctr, comparison.ctr_per_exposure
    arms = {
        a.name: {"alias": a.alias, "users": a.users, "requests": a.requests,
                 "exposures": a.exposures, "clicks": a.clicks, "ctr": a.ctr.value,
                 "ctr_ci": [a.ctr.low, a.ctr.high]}
        for a in report.arms
    }  # fmt: skip
    return {
        "arms": arms,
        "relative_lift": None if ctr is None else ctr.relative_lift,
        "difference": None if ctr is None else ctr.difference,
        "difference_ci": None if ctr is None else [ctr.low, ctr.high],
        "p_value": None if ctr is None else ctr.p_value,
        "significant": comparison.significant,
        "naive_p_value": None if naive is None else naive.p_value,
        "srm": {"p_value": report.srm.p_value, "flagged": report.srm.flagged},
    }


# ---------------------------------------------------------------- the phases


def plan_requests(cfg: BenchConfig, pilot: ExperimentReport) -> dict[str, Any]:
    """Requests for the main A/B run from the pilot's control CTR, lift and design effect."""
    control, treated = pilot.arms
    z = NormalDist().inv_cdf(1 - cfg.alpha / 2)
    deffs = [  # delta-method variance over users / binomial variance over exposures
        ((a.ctr.high - a.ctr.low) / (2 * z)) ** 2 / (a.ctr.value * (1 - a.ctr.value) / a.exposures)
        for a in pilot.arms
        if a.exposures and 0 < a.ctr.value < 1 and math.isfinite(a.ctr.low)
    ]
    design_effect = max(1.0, sum(deffs) / len(deffs)) if deffs else 2.0
    p0 = control.ctr.value
    lift = treated.ctr.value / p0 - 1 if p0 > 0 else math.nan
    mde = cfg.mde if cfg.mde is not None else max(MIN_MDE, lift / 2 if lift > 0 else 0.0)
    per_request = (control.exposures + treated.exposures) / max(
        1, control.requests + treated.requests
    )
    sizes, share = cfg.sizes, min(a.weight for a in pilot.arms) / sum(a.weight for a in pilot.arms)
    if p0 > 0 and 0 < p0 * (1 + mde) < 1:
        exposures = sample_size(p0, mde, alpha=cfg.alpha, power=cfg.power)
        wanted = math.ceil(exposures * design_effect / per_request / share)
    else:  # no click in the control: nothing to size from, run what the budget allows
        exposures, wanted = 0, sizes.max_requests
    requests = min(max(wanted, sizes.min_requests), sizes.max_requests)
    effective = round(requests * share * per_request / design_effect)
    return {
        "pilot_control_ctr": p0,
        "pilot_relative_lift": lift,
        "design_effect": design_effect,
        "exposures_per_request": per_request,
        "mde": mde,
        "alpha": cfg.alpha,
        "power": cfg.power,
        "sample_size_exposures_per_arm": exposures,
        "requests_wanted": wanted,
        "requests": requests,
        "power_at_requests": power(p0, mde, n_per_arm=max(1, effective), alpha=cfg.alpha)
        if exposures
        else None,
    }


def ab_phase(ctx: Context) -> dict[str, Any]:
    """Pilot, sample size, then the A/B test of popularity (control) vs the pipeline."""
    cfg, sizes = ctx.cfg, ctx.cfg.sizes
    arms = (Arm("popular", "popular", 0.5), Arm("pipeline", "champion", 0.5))
    experiment = Experiment("pipeline-vs-popular", f"bench-{cfg.seed}", arms)
    with service(ctx, experiment, "ab") as (url, log_dir):
        _, began = ctx.simulate_day(url, log_dir, sizes.pilot_requests, sizes.requests_per_user, 1)
        pilot = experiment_report(log_dir, experiment, start=began, alpha=cfg.alpha)
        plan = plan_requests(cfg, pilot)
        log(f"[ab] pilot lift {plan['pilot_relative_lift']:+.1%}, design effect "
            f"{plan['design_effect']:.2f} -> {plan['requests']} requests")  # fmt: skip
        sim, began = ctx.simulate_day(url, log_dir, plan["requests"], sizes.requests_per_user, 2)
        report = experiment_report(log_dir, experiment, start=began, alpha=cfg.alpha)
    result, pilot_result = decision(report), decision(pilot)
    return {
        "experiment": experiment.name,
        "pilot": {k: pilot_result[k] for k in ("arms", "relative_lift", "p_value")},
        "plan": plan,
        "simulated_day": sim.start,
        **result,
        # the true click probability of what each arm served (position bias included): the
        # CTR without the click-draw noise, to tell a weak model from an unlucky draw
        "expected_ctr": {arm: g.expected_ctr for arm, g in sim.by_arm.items()},
        "served_paths": {path: g.requests for path, g in sim.by_path.items()},
        "pipeline_wins": bool(result["significant"] and (result["difference"] or 0) > 0),
        "report": save(cfg, "ab", report),
    }


def aa_phase(ctx: Context) -> dict[str, Any]:
    """A/A: one simulation analysed with ``resalts`` re-drawn splits, SRM with wrong weights,
    then ``aa_runs`` more simulated days each analysed on its own (see :func:`aa_runs`)."""
    cfg, sizes = ctx.cfg, ctx.cfg.sizes
    experiment = two_arms("aa", f"aa-{cfg.seed}", 0.5, "champion")
    with service(ctx, experiment, "aa") as (url, log_dir):
        _, began = ctx.simulate_day(url, log_dir, sizes.aa_requests, sizes.aa_requests_per_user, 3)
        runs = [
            ctx.simulate_day(url, log_dir, sizes.aa_run_requests, sizes.requests_per_user, 10 + i)[
                1
            ]
            for i in range(sizes.aa_runs)
        ]
    end = runs[0] if runs else None
    logged = experiment_report(log_dir, experiment, start=began, end=end, alpha=cfg.alpha)
    decisions = naives = srms = 0
    for i in range(sizes.resalts):
        resalted = experiment_report(
            log_dir, experiment, start=began, end=end, resalt=f"resalt-{i}", alpha=cfg.alpha
        )
        (comparison,) = resalted.comparisons
        decisions += comparison.significant
        naives += bool(comparison.ctr_per_exposure and comparison.ctr_per_exposure.significant)
        srms += resalted.srm.flagged
    fpr = wilson_ci(decisions, sizes.resalts)
    declared = two_arms("aa", experiment.salt, cfg.skew, "champion")
    wrong = experiment_report(log_dir, declared, start=began, end=end, alpha=cfg.alpha)
    log(f"[aa] false positives {decisions}/{sizes.resalts} (naive test {naives}); "
        f"declared {cfg.skew:g}: SRM p = {wrong.srm.p_value:.2g}")  # fmt: skip
    return {
        "experiment": experiment.name,
        "logged_split": decision(logged),
        "resalts": sizes.resalts,
        "false_positives": decisions,
        "false_positive_rate": fpr.value,
        "false_positive_rate_ci95": [fpr.low, fpr.high],
        "naive_false_positive_rate": naives / max(1, sizes.resalts),
        "srm_flag_rate_of_resalts": srms / max(1, sizes.resalts),
        "target": list(FPR_TARGET),
        "met": FPR_TARGET[0] <= fpr.value <= FPR_TARGET[1],
        "srm": {"assigned": 0.5, **srm_pair(wrong, logged, declared=cfg.skew, true=0.5)},
        "report": save(cfg, "aa", logged),
        "independent_runs": aa_runs(cfg, log_dir, experiment, runs),
    }


def aa_runs(
    cfg: BenchConfig, log_dir: Path, experiment: Experiment, starts: list[datetime]
) -> dict[str, Any]:
    """Each run (its own seed, panel and simulated day) as an A/A test of its own.

    A run is analysed with the split the service logged (the service's salt, so a user is in
    the same arm in every run) and with a fresh salt of its own. Both arms served the same
    model, so the fresh split is what a service restarted with that salt would have logged:
    independent experiments without restarting the service.
    """
    runs = []
    for i, (start, end) in enumerate(zip(starts, [*starts[1:], None], strict=True)):
        served = experiment_report(log_dir, experiment, start=start, end=end, alpha=cfg.alpha)
        salt = f"aa-run-{cfg.seed}-{i}"
        fresh = experiment_report(
            log_dir, experiment, start=start, end=end, resalt=salt, alpha=cfg.alpha
        )
        runs.append({"served_split": decision(served), "fresh_salt": salt, **decision(fresh)})
    return {
        "runs": runs,
        "false_positives_fresh_salt": sum(bool(run["significant"]) for run in runs),
        "false_positives_served_split": sum(
            bool(run["served_split"]["significant"]) for run in runs
        ),
    }


def two_arms(name: str, salt: str, first_weight: float, alias: str) -> Experiment:
    """Arms ``a`` (``first_weight``) and ``b`` (the rest), both serving ``alias``."""
    arms = (Arm("a", alias, first_weight), Arm("b", alias, round(1 - first_weight, 9)))
    return Experiment(name, salt, arms)


def srm_pair(
    wrong: ExperimentReport, right: ExperimentReport, *, declared: float, true: float
) -> dict[str, Any]:
    """SRM with the wrong and with the true weights: only the wrong ones should flag."""
    return {
        "users": list(right.srm.observed),
        f"declared_{declared:g}": {"p_value": wrong.srm.p_value, "flagged": wrong.srm.flagged},
        f"declared_{true:g}": {"p_value": right.srm.p_value, "flagged": right.srm.flagged},
        "met": wrong.srm.flagged and not right.srm.flagged,
    }


def skew_phase(ctx: Context) -> dict[str, Any]:
    """A service assigning ``skew``/rest, analysed as 50/50 (flagged) and as it is (not)."""
    cfg, sizes = ctx.cfg, ctx.cfg.sizes
    served = two_arms("skew", f"skew-{cfg.seed}", cfg.skew, "popular")
    with service(ctx, served, "skew") as (url, log_dir):
        _, began = ctx.simulate_day(
            url, log_dir, sizes.skew_requests, sizes.skew_requests_per_user, 4
        )
    right = experiment_report(log_dir, served, start=began, alpha=cfg.alpha)
    declared = two_arms("skew", served.salt, 0.5, "popular")
    wrong = experiment_report(log_dir, declared, start=began, alpha=cfg.alpha)
    log(f"[skew] assigned {cfg.skew:g}, declared 0.5: SRM p = {wrong.srm.p_value:.2g}")
    return {"assigned": cfg.skew, **srm_pair(wrong, right, declared=0.5, true=cfg.skew)}


# ---------------------------------------------------------------- main


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Every phase of ``cfg.phases`` on one copy of the dataset; the JSON document."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "online experiments",
        **{key: str(getattr(cfg, key)) for key in ("dataset", "model", "config", "out")},
        "sizes": asdict(cfg.sizes),
        "alpha": cfg.alpha,
        "seed": cfg.seed,
    }
    phases = {"ab": ab_phase, "aa": aa_phase, "skew": skew_phase}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mlsd-bench-experiments-") as tmp:
        dataset = prepare_dataset(cfg.dataset, Path(tmp), cfg.config)
        seconds["prepare"] = round(time.perf_counter() - began, 1)
        ctx = Context(cfg, dataset, WorldPreferences.from_dataset(dataset), first_day(dataset))
        for name in cfg.phases:
            started = time.perf_counter()
            log(f"[{name}] ...")
            result[name] = phases[name](ctx)
            seconds[name] = round(time.perf_counter() - started, 1)
    result["checks"] = checks(result)
    result["seconds"] = {**seconds, "total": round(time.perf_counter() - began, 1)}
    result = json_safe(result)
    (cfg.out / "experiments.json").write_text(json.dumps(result, indent=2))
    return result


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def first_day(dataset: Path) -> datetime:
    """Midnight UTC after the dataset's last event: the simulation starts where the data ends."""
    last = read_info(dataset).ts_max
    if last is None:
        raise BenchError(f"{dataset}: dataset.json has no ts_max; is it a dataset directory?")
    end = datetime.fromisoformat(last).astimezone(UTC)
    return datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)


def checks(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's 'done when' items that the phases run measured."""
    out = {}
    if "ab" in result:
        out["ab_significant_lift_for_the_pipeline"] = result["ab"]["pipeline_wins"]
    if "aa" in result:
        out["aa_false_positive_rate_in_1_to_10_percent"] = result["aa"]["met"]
        out["srm_flagged_only_with_wrong_weights_aa"] = result["aa"]["srm"]["met"]
    if "skew" in result:
        out["srm_flagged_only_with_wrong_weights_skewed"] = result["skew"]["met"]
    return out


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    demo = REPO / "demo-output"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=demo / "world", help="a synthetic world")
    parser.add_argument("--model", type=Path, default=demo / "model", help="a feed model dir")
    parser.add_argument("--config", type=Path, default=BenchConfig.config, help="system TOML")
    parser.add_argument("--out", type=Path, help="logs and reports (default: a new temp dir)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    parser.add_argument("--port", type=int, default=0, help="service port (0: a free one)")
    parser.add_argument("--mde", type=float, help="planning relative lift (default: pilot's / 2)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--skew", type=float, default=0.55, help="the skewed first-arm share")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in asdict(Sizes()).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, dest=f"size_{name}", metavar="N")
    args = parser.parse_args(argv)
    missing = [str(p) for p in (args.dataset, args.model) if not p.exists()]
    if missing:
        parser.error(
            f"{', '.join(missing)} not found: run `make demo` first, or pass --dataset (an "
            "`mlsd data synth` world with its feature store) and --model"
        )
    phases = tuple(p for p in args.phases.split(",") if p)
    if unknown := sorted(set(phases) - set(PHASES)):
        parser.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")
    sizes = Sizes(**{k[5:]: v for k, v in vars(args).items() if k.startswith("size_")})
    out = args.out or Path(tempfile.mkdtemp(prefix="mlsd-experiments-"))
    return BenchConfig(
        dataset=args.dataset.resolve(), model=args.model.resolve(), out=out.resolve(),
        config=args.config.resolve(), sizes=sizes, phases=phases, port=args.port,
        alpha=args.alpha, power=args.power, mde=args.mde, skew=args.skew, seed=args.seed,
    )  # fmt: skip


def main() -> None:
    cfg = parse_args()
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the services are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(cfg)
    except BenchError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
