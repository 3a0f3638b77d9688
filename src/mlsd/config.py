"""Typed system configs, one TOML file per system under ``configs/``.

Each section maps onto a frozen dataclass that lives beside the code it configures; an unknown
key or a value of the wrong type is an error naming the file, the section and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from mlsd.evaluation.experiments import ExperimentsSection
from mlsd.evaluation.retrieval import MergeConfig, ProtocolConfig, SourceFactory
from mlsd.features.store import FeatureStoreConfig
from mlsd.monitoring.alerts import MonitoringSection
from mlsd.plan.requirements import Requirements

if TYPE_CHECKING:
    from mlsd.evaluation.pipeline import PipelineConfig
    from mlsd.evaluation.stages import RankerFactory
    from mlsd.models.ranking.base import Ranker
    from mlsd.models.retrieval.base import Retriever
    from mlsd.monitoring.logs import LogWriter

DEFAULT_FEED_CONFIG = Path("configs/feed.toml")
DEFAULT_BASELINES = ("popularity", "ease", "als", "bpr")
"""The sources scored alone next to the pipeline, unless ``[ranking].baselines`` says."""


class CrossSectionError(ValueError):
    """Two sections of one config disagree (e.g. a baseline that is not a source)."""


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
    push_process: bool = True
    """``mlsd feed serve`` applies ``POST /v1/events`` pushes in a child process
    (:mod:`mlsd.features.push_process`), so a large batch does not slow recommendations;
    ``false``: in the serving process."""
    push_timeout_s: float = 30.0
    """How long the child may take over one push (10,000 events took 3–6 s here) before it is
    replaced and the POST is a 503."""

    def __post_init__(self) -> None:
        if not self.push_timeout_s > 0:
            raise ValueError(f"push_timeout_s must be > 0, got {self.push_timeout_s}")

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
class ServiceLogSection:
    """``[service_log]``: where ``mlsd feed serve`` logs requests, exposures and feedback, and
    how (the arguments of :class:`mlsd.monitoring.logs.ServiceLog`, and which process writes)."""

    enabled: bool = True
    dir: str = "service-log"
    """Relative to ``--base-dir`` unless absolute."""
    flush_rows: int = 5_000
    flush_interval_s: float = 2.0
    retention_days: int | None = 30
    max_buffered_rows: int = 1_000_000
    candidates_sample_rate: float = 0.02
    """Share of online requests whose ranker rows (every scored candidate with its features)
    go to the ``candidates`` table, what drift monitoring reads; 0 logs none."""
    writer: Literal["process", "thread"] = "process"
    """``"process"``: a child process writes the log (:mod:`mlsd.monitoring.log_process`), so
    no flush runs beside the requests; ``"thread"``: a thread of the service writes it."""
    monitor_interval_s: float = 60.0
    """Seconds between the service's monitoring passes over the last ``[monitoring].window``
    (``mlsd_monitor_*`` gauges on ``/metrics``); 0 turns the in-service monitor off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.candidates_sample_rate <= 1.0:
            raise ValueError(
                f"candidates_sample_rate must be in [0, 1], got {self.candidates_sample_rate}"
            )
        if not self.monitor_interval_s >= 0:
            raise ValueError(f"monitor_interval_s must be >= 0, got {self.monitor_interval_s}")
        if self.flush_rows < 1 or self.max_buffered_rows < self.flush_rows:
            raise ValueError(
                f"need 1 <= flush_rows <= max_buffered_rows, got {self.flush_rows} and "
                f"{self.max_buffered_rows}"
            )
        if not self.flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")
        if self.retention_days is not None and self.retention_days < 1:
            raise ValueError(f"retention_days must be >= 1, got {self.retention_days}")

    def path(self, base_dir: Path) -> Path:
        """The log directory: ``dir`` resolved against ``base_dir``."""
        path = Path(self.dir)
        return path if path.is_absolute() else Path(base_dir) / path

    def open(self, log_dir: Path) -> LogWriter:
        """The log writing into ``log_dir``: a :class:`~mlsd.monitoring.log_process.
        ProcessServiceLog` or a :class:`~mlsd.monitoring.logs.ServiceLog` (``writer``)."""
        from mlsd.monitoring.log_process import ProcessServiceLog
        from mlsd.monitoring.logs import ServiceLog

        options: dict[str, Any] = {
            "flush_rows": self.flush_rows,
            "flush_interval_s": self.flush_interval_s,
            "retention_days": self.retention_days,
            "max_buffered_rows": self.max_buffered_rows,
        }
        if self.writer == "process":
            return ProcessServiceLog(log_dir, **options)
        return ServiceLog(log_dir, **options)


# Candidate sources: each ``[retrieval.<name>]`` table mirrors its retriever's constructor (the
# tests check that fields and defaults match; a ``fallback`` object is not configurable: every
# source falls back to the default popularity); models are imported only when built, so reading
# the config never imports torch.


@dataclass(frozen=True)
class PopularitySource:
    """``[retrieval.popularity]``: time-decayed popularity, every other source's fallback."""

    half_life_days: float | None = 30.0

    def build(self) -> Retriever:
        from mlsd.models.retrieval.popularity import PopularityRetriever

        return PopularityRetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class SegmentPopularitySource:
    """``[retrieval.segment_popularity]``: one vote per user, within the user's segments."""

    segment_by: tuple[str, ...] | None = None
    prior_users: float = 10.0
    half_life_days: tuple[float, ...] = (14.0, 30.0, 90.0, 365.0, 730.0)
    holdout_frac: float = 0.1

    def build(self) -> Retriever:
        from mlsd.models.retrieval.segment_popularity import SegmentPopularityRetriever

        return SegmentPopularityRetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class CovisitationSource:
    """``[retrieval.covisitation]``: the co-visitation retriever."""

    window: int = 20
    session_gap_minutes: float = 30.0
    last_n: int = 20
    recency_decay: float = 0.9
    normalize: Literal["cosine", "row", "none"] = "row"
    max_neighbours: int | None = 200

    def build(self) -> Retriever:
        from mlsd.models.retrieval.covisitation import CovisitationRetriever

        return CovisitationRetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class ALSSource:
    """``[retrieval.als]``: implicit-feedback ALS."""

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15
    half_life_days: float | None = None
    seed: int = 0
    num_threads: int = 2

    def build(self) -> Retriever:
        from mlsd.models.retrieval.implicit_mf import ALSRetriever

        return ALSRetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class BPRSource:
    """``[retrieval.bpr]``: Bayesian personalized ranking."""

    factors: int = 64
    learning_rate: float = 0.01
    regularization: float = 0.01
    iterations: int = 50
    seed: int = 0
    num_threads: int = 2

    def build(self) -> Retriever:
        from mlsd.models.retrieval.implicit_mf import BPRRetriever

        return BPRRetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class EASESource:
    """``[retrieval.ease]``: the closed-form item-item model."""

    l2: float = 200.0
    half_life_days: float | None = None
    max_items: int = 50_000
    num_threads: int = 1

    def build(self) -> Retriever:
        from mlsd.models.retrieval.ease import EASERetriever

        return EASERetriever(**dataclasses.asdict(self))


@dataclass(frozen=True)
class TwoTowerSource:
    """``[retrieval.two_tower]``: the fields of ``TwoTowerConfig`` (see two_tower.py)."""

    dim: int = 64
    history_len: int = 50
    pooling: Literal["mean", "attention"] = "mean"
    temperature: float = 0.05
    learn_temperature: bool = False
    logq_correction: bool = True
    logq_window_events: int = 10_000
    n_random_negatives: int = 0
    history_gap_hours: float = 24.0
    popularity_windows_days: tuple[float, ...] = (7.0, 30.0, 182.0)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 20
    patience: int = 3
    val_frac: float = 0.1
    refit: bool = False
    user_features: tuple[str, ...] | None = None
    max_feature_levels: int = 100
    seed: int = 0
    threads: int = 1

    def build(self) -> Retriever:
        from mlsd.models.retrieval.two_tower import TwoTowerConfig
        from mlsd.models.retrieval.two_tower_train import TwoTowerRetriever

        return TwoTowerRetriever(TwoTowerConfig(**dataclasses.asdict(self)), progress=False)


SourceSection = (
    PopularitySource
    | SegmentPopularitySource
    | CovisitationSource
    | ALSSource
    | BPRSource
    | EASESource
    | TwoTowerSource
)

SOURCE_SECTIONS: dict[str, type[SourceSection]] = {
    "popularity": PopularitySource,
    "segment_popularity": SegmentPopularitySource,
    "covisitation": CovisitationSource,
    "als": ALSSource,
    "bpr": BPRSource,
    "ease": EASESource,
    "two_tower": TwoTowerSource,
}
"""Candidate source name → its config section (which knows how to build the retriever)."""


@dataclass(frozen=True)
class RetrievalSection:
    """``[retrieval]``: which candidate sources, their hyperparameters, the merge, the protocol.

    Attributes:
        sources: names from :data:`SOURCE_SECTIONS`, in merge priority order.
        protocol: the evaluation protocol (the scalar keys of ``[retrieval]``).
        merge: ``[retrieval.merge]``.
        source_configs: name → its ``[retrieval.<name>]`` section (defaults when absent).
    """

    sources: tuple[str, ...] = tuple(SOURCE_SECTIONS)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    source_configs: Mapping[str, SourceSection] = field(
        default_factory=lambda: {name: cls() for name, cls in SOURCE_SECTIONS.items()}
    )

    def factories(self) -> dict[str, SourceFactory]:
        """Name → factory of an unfitted retriever, for every source in ``sources``."""
        return {name: self.source_configs[name].build for name in self.sources}


@dataclass(frozen=True)
class FeedConfig:
    """``configs/feed.toml``: the personalized feed system."""

    features: FeaturesSection = field(default_factory=FeaturesSection)
    feature_store: FeatureStoreSection = field(default_factory=FeatureStoreSection)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    ranking: RankingSection = field(default_factory=lambda: RankingSection())
    service_log: ServiceLogSection = field(default_factory=ServiceLogSection)
    monitoring: MonitoringSection = field(default_factory=MonitoringSection)
    experiments: ExperimentsSection = field(default_factory=ExperimentsSection)
    plan: Requirements = field(default_factory=Requirements)

    def __post_init__(self) -> None:
        sources = self.retrieval.sources
        baselines = self.ranking.baselines
        if baselines is None:  # the default: those of the usual baselines that are sources
            chosen = tuple(b for b in DEFAULT_BASELINES if b in sources)
            object.__setattr__(self, "ranking", dataclasses.replace(self.ranking, baselines=chosen))
            return
        missing = [b for b in baselines if b not in sources]
        if missing:
            raise CrossSectionError(
                f"[ranking].baselines {missing} are not in [retrieval].sources {list(sources)}"
            )

    def with_online_store(self, name: str) -> FeedConfig:
        """This config with another online store (``sqlite`` or ``redis``)."""
        hint = typing.get_type_hints(FeatureStoreSection)["online_store"]
        store = _coerce(name, hint, "online store")
        return dataclasses.replace(
            self, feature_store=dataclasses.replace(self.feature_store, online_store=store)
        )


def feed_config_source(path: Path | None = None) -> str:
    """The one line a command prints to say which config :func:`load_feed_config` reads.

    ``configs/feed.toml`` is relative to the working directory, so a command run elsewhere
    silently gets the built-in defaults; this line says so (and where it looked).
    """
    if path is not None:
        return f"config: {path}"
    if DEFAULT_FEED_CONFIG.is_file():
        return f"config: {DEFAULT_FEED_CONFIG}"
    return f"config: built-in defaults ({DEFAULT_FEED_CONFIG} not found in {Path.cwd()})"


def load_feed_config(path: Path | None = None) -> FeedConfig:
    """Read a feed config; ``None`` reads ``configs/feed.toml`` (relative to the working
    directory) if present, else the defaults. Commands say which with
    :func:`feed_config_source`."""
    if path is None:
        if not DEFAULT_FEED_CONFIG.is_file():
            return FeedConfig()
        path = DEFAULT_FEED_CONFIG
    raw = _read_toml(Path(path))
    unknown = set(raw) - {f.name for f in dataclasses.fields(FeedConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    try:
        config = FeedConfig(
            features=_section(FeaturesSection, raw.get("features", {}), path, "features"),
            feature_store=_section(
                FeatureStoreSection, raw.get("feature_store", {}), path, "feature_store"
            ),
            retrieval=_retrieval_section(raw.get("retrieval", {}), path),
            ranking=_ranking_section(raw.get("ranking", {}), path),
            service_log=_section(
                ServiceLogSection, raw.get("service_log", {}), path, "service_log"
            ),
            monitoring=MonitoringSection.from_mapping(raw.get("monitoring", {}), where=str(path)),
            experiments=ExperimentsSection.from_mapping(
                raw.get("experiments", {}), where=f"{path}: [experiments]"
            ),
            plan=_section(Requirements, raw.get("plan", {}), path, "plan"),
        )
    except CrossSectionError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return config


def load_plan_requirements(
    path: Path | None = None, overrides: Mapping[str, str] | None = None
) -> Requirements:
    """``[plan]`` of a feed config (:func:`load_feed_config`'s file rule), with ``overrides``
    (key → value as TOML would write it, ``"2_000_000"``, ``"0.5"``, ``"flat"``) applied and
    checked as the file's keys are."""
    if path is None and DEFAULT_FEED_CONFIG.is_file():
        path = DEFAULT_FEED_CONFIG
    values = dict(_read_toml(Path(path)).get("plan", {})) if path is not None else {}
    for key, text in (overrides or {}).items():
        try:
            values[key] = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            values[key] = text  # a bare word: a string
    source = str(path) if path is not None else "built-in defaults"
    where = Path(f"{source} with --set") if overrides else Path(source)
    return _section(Requirements, values, where, "plan")


def _retrieval_section(values: dict[str, Any], path: Path) -> RetrievalSection:
    """``[retrieval]``: scalar keys are the protocol, sub-tables the merge and the sources."""
    tables = {"merge", *SOURCE_SECTIONS}
    protocol_keys = {f.name for f in dataclasses.fields(ProtocolConfig)}
    unknown = set(values) - tables - protocol_keys - {"sources"}
    if unknown:
        known = ", ".join(["sources", *sorted(protocol_keys), *sorted(tables)])
        raise ValueError(
            f"{path}: [retrieval] has unknown key(s) {', '.join(sorted(unknown))}; "
            f"known keys and tables: {known}"
        )
    sources = _coerce(
        values.get("sources", list(SOURCE_SECTIONS)),
        tuple[str, ...],
        f"{path}: [retrieval].sources",
    )
    bad = [name for name in sources if name not in SOURCE_SECTIONS]
    if bad or not sources:
        raise ValueError(
            f"{path}: [retrieval].sources names unknown source(s) {bad}; choose from "
            f"{', '.join(SOURCE_SECTIONS)}"
        )
    merge = _section(MergeConfig, values.get("merge", {}), path, "retrieval.merge")
    for key in ("quotas", "cold_quotas"):
        extra = sorted(set(getattr(merge, key)) - set(sources))
        if extra:
            raise ValueError(
                f"{path}: [retrieval.merge].{key} names {extra}, which are not in "
                f"[retrieval].sources {list(sources)}"
            )
    return RetrievalSection(
        sources=sources,
        protocol=_section(
            ProtocolConfig,
            {k: v for k, v in values.items() if k in protocol_keys},
            path,
            "retrieval",
        ),
        merge=merge,
        source_configs={
            name: _section(cls, values.get(name, {}), path, f"retrieval.{name}")
            for name, cls in SOURCE_SECTIONS.items()
        },
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
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a value the section's own checks refuse
        raise ValueError(f"{path}: [{name}]: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ValueError(f"{where}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        errors = []
        for option in options:  # the first type that accepts the value (int before float)
            try:
                return _coerce(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors))
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, where) for v in value)
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


# -- [ranking] ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogisticSection:
    """``[ranking.logistic]``: the baseline ranker (:class:`LogisticRanker`)."""

    C: float = 1.0
    class_weight: Literal["balanced"] | None = None
    max_iter: int = 1000

    def build(self) -> Ranker:
        from mlsd.models.ranking.logistic import LogisticRanker

        return LogisticRanker(**dataclasses.asdict(self))


@dataclass(frozen=True)
class LightGBMSection:
    """``[ranking.lightgbm]`` (binary objective) and ``[ranking.lambdarank]``."""

    objective: Literal["binary", "lambdarank"] = "binary"
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 20
    reg_lambda: float = 0.0
    max_cat_to_onehot: int = 4
    feature_fraction: float = 1.0
    bagging_fraction: float = 1.0
    early_stopping_rounds: int | None = 30
    num_threads: int = 1
    seed: int = 0

    def build(self) -> Ranker:
        from mlsd.models.ranking.gbdt import LightGBMRanker

        return LightGBMRanker(**dataclasses.asdict(self))


@dataclass(frozen=True)
class LambdaRankSection(LightGBMSection):
    objective: Literal["binary", "lambdarank"] = "lambdarank"


@dataclass(frozen=True)
class DeepSection:
    """``[ranking.deep]``: the DCN-v2 ranker (:class:`DeepRankerConfig`'s fields)."""

    embedding_dim: int = 16
    n_cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0
    tasks: Mapping[str, float] = field(default_factory=lambda: {"click": 1.0, "rating": 0.5})
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 20
    patience: int = 3
    seed: int = 0
    threads: int = 1

    def build(self) -> Ranker:
        from mlsd.models.ranking.deep import DeepRanker, DeepRankerConfig

        return DeepRanker(DeepRankerConfig(**dataclasses.asdict(self)), progress=False)


@dataclass(frozen=True)
class EnsembleSection:
    """``[ranking.ensemble]``: the mean of its members' standardised scores
    (:class:`EnsembleRanker`); each member is built from its own ``[ranking.<name>]``."""

    members: tuple[str, ...] = ("logistic", "lightgbm", "lambdarank", "deep")
    weights: Mapping[str, float] = field(default_factory=dict)

    def build(self) -> Ranker:  # members are filled in by RankingSection.factories
        from mlsd.models.ranking.ensemble import EnsembleRanker

        return EnsembleRanker(weights=dict(self.weights) or None)


RankerSection = LogisticSection | LightGBMSection | DeepSection | EnsembleSection

RANKER_SECTIONS: dict[str, type[RankerSection]] = {
    "logistic": LogisticSection,
    "lightgbm": LightGBMSection,
    "lambdarank": LambdaRankSection,
    "deep": DeepSection,
    "ensemble": EnsembleSection,
}
"""Ranker name → its config section (which knows how to build the ranker)."""


@dataclass(frozen=True)
class RerankSection:
    """``[ranking.rerank]``: the last stage (:class:`mlsd.serving.rerank.RerankConfig`)."""

    mmr_lambda: float = 1.0
    freshness_weight: float = 0.0
    freshness_half_life_days: float = 30.0
    freshness_clock: Literal["created", "first_event"] = "created"
    max_per_category: int | None = None
    blocklist: tuple[int, ...] = ()


@dataclass(frozen=True)
class RankingSection:
    """``[ranking]``: the rankers, the pipeline's choice among them, and its evaluation.

    Scalar keys are :class:`mlsd.evaluation.offline.PipelineConfig` fields; ``rankers`` names
    the rankers to fit (each configured by ``[ranking.<name>]``).
    """

    rankers: tuple[str, ...] = tuple(RANKER_SECTIONS)
    ranker: str = "auto"
    n_candidates: int = 200
    ranker_windows: int = 3
    ranker_valid_frac: float = 0.2
    auc_splits: int = 1
    negative_keep_rate: float = 1.0
    calibration: Literal["platt", "isotonic"] = "isotonic"
    baselines: tuple[str, ...] | None = None
    ks: tuple[int, ...] = (10, 20, 50, 100)
    quota_step: float = 0.2
    """The grid step of the pipeline's quota search; every other setting of the pipeline's
    merge is ``[retrieval.merge]``'s. Coarser than ``retrieve-eval``'s 0.1: the pipeline's
    figures and its choices (the ranker, the windows) were measured with it."""
    rerank: RerankSection = field(default_factory=RerankSection)
    ranker_configs: Mapping[str, RankerSection] = field(
        default_factory=lambda: {name: cls() for name, cls in RANKER_SECTIONS.items()}
    )

    def factories(self) -> dict[str, RankerFactory]:
        """Name → factory of an unfitted ranker, for every ranker in ``rankers``."""
        return {name: self._factory(name) for name in self.rankers}

    def _factory(self, name: str) -> RankerFactory:
        section = self.ranker_configs[name]
        if not isinstance(section, EnsembleSection):
            return section.build

        def ensemble() -> Ranker:
            from mlsd.models.ranking.ensemble import EnsembleRanker

            members = [(m, self.ranker_configs[m].build()) for m in section.members]
            return EnsembleRanker(members, weights=dict(section.weights) or None)

        return ensemble

    def pipeline(self, merge: MergeConfig) -> PipelineConfig:
        """The pipeline of ``evaluate``, ``train`` and the benches; ``merge`` is
        ``[retrieval.merge]``, searched on this section's ``quota_step`` grid."""
        from mlsd.evaluation.pipeline import PipelineConfig
        from mlsd.serving.rerank import RerankConfig

        rerank = dataclasses.asdict(self.rerank)
        rerank["blocklist"] = frozenset(rerank["blocklist"])
        pipeline = PipelineConfig(
            n_candidates=self.n_candidates,
            ranker=self.ranker,
            ranker_windows=self.ranker_windows,
            ranker_valid_frac=self.ranker_valid_frac,
            auc_splits=self.auc_splits,
            negative_keep_rate=self.negative_keep_rate,
            calibration=self.calibration,
            rerank=RerankConfig(**rerank),
            baselines=self.baselines if self.baselines is not None else DEFAULT_BASELINES,
            ks=self.ks,
            merge=dataclasses.replace(merge, quota_step=self.quota_step),
        )
        # The report's freshness variant ages items by the configured clock and half-life.
        clock, half_life = self.rerank.freshness_clock, self.rerank.freshness_half_life_days
        variants = {
            name: dataclasses.replace(
                variant, freshness_clock=clock, freshness_half_life_days=half_life
            )
            if variant.freshness_weight > 0
            else variant
            for name, variant in pipeline.rerank_variants.items()
        }
        return dataclasses.replace(pipeline, rerank_variants=variants)


def _ranking_section(values: dict[str, Any], path: Path) -> RankingSection:
    """``[ranking]``: scalar keys, ``[ranking.rerank]`` and one table per ranker."""
    tables = {"rerank", *RANKER_SECTIONS}
    scalars = {f.name for f in dataclasses.fields(RankingSection)} - {"rerank", "ranker_configs"}
    unknown = set(values) - tables - scalars
    if unknown:
        known = ", ".join([*sorted(scalars), *sorted(tables)])
        raise ValueError(
            f"{path}: [ranking] has unknown key(s) {', '.join(sorted(unknown))}; "
            f"known keys and tables: {known}"
        )
    section = _section(
        RankingSection, {k: v for k, v in values.items() if k in scalars}, path, "ranking"
    )
    bad = [name for name in section.rankers if name not in RANKER_SECTIONS]
    if bad or not section.rankers:
        raise ValueError(
            f"{path}: [ranking].rankers names unknown ranker(s) {bad}; choose from "
            f"{', '.join(RANKER_SECTIONS)}"
        )
    if section.ranker not in ("auto", *section.rankers):
        raise ValueError(
            f"{path}: [ranking].ranker = {section.ranker!r} is not 'auto' nor one of "
            f"[ranking].rankers {list(section.rankers)}"
        )
    section = dataclasses.replace(
        section,
        rerank=_section(RerankSection, values.get("rerank", {}), path, "ranking.rerank"),
        ranker_configs={
            name: _section(cls, values.get(name, {}), path, f"ranking.{name}")
            for name, cls in RANKER_SECTIONS.items()
        },
    )
    ensemble = section.ranker_configs["ensemble"]
    if isinstance(ensemble, EnsembleSection):
        bad = [m for m in ensemble.members if m not in RANKER_SECTIONS or m == "ensemble"]
        if bad or not ensemble.members:
            raise ValueError(
                f"{path}: [ranking.ensemble].members {bad} must name rankers among "
                f"{', '.join(n for n in RANKER_SECTIONS if n != 'ensemble')}"
            )
    try:
        section.pipeline(MergeConfig())  # its own checks (ks vs n_candidates, re-rank, grid)
    except ValueError as exc:
        raise ValueError(f"{path}: [ranking]: {exc}") from exc
    return section
