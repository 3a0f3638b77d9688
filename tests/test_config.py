"""System configs: the shipped TOML loads, and mistakes name the file, section and key."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from mlsd.config import (
    SOURCE_SECTIONS,
    FeedConfig,
    TwoTowerSource,
    load_feed_config,
    load_plan_requirements,
)
from mlsd.evaluation.quotas import MergeConfig
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.implicit_mf import ALSRetriever, BPRRetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.segment_popularity import SegmentPopularityRetriever
from mlsd.monitoring.log_process import ProcessServiceLog
from tests.conftest import REPO


def test_shipped_feed_config_loads_with_typed_values() -> None:
    config = load_feed_config(REPO / "configs" / "feed.toml")
    assert config.features.windows_days == (1, 7, 30)
    assert config.features.history_len == 50
    assert config.feature_store.online_store == "sqlite"
    assert config.feature_store.store_config().online_store == "sqlite"


def test_repo_dir_is_relative_to_the_dataset(tmp_path: Path) -> None:
    config = FeedConfig()
    assert config.feature_store.repo_path(tmp_path) == tmp_path / "feature_repo"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[features]\nhistory_lenn = 5\n", r"\[features\] has unknown key 'history_lenn'"),
        ("[features]\nhistory_len = 'five'\n", r"\[features\]\.history_len: expected an integer"),
        ("[features]\nwindows_days = 7\n", r"windows_days: expected a list"),
        ("[feature_store]\nonline_store = 'dynamo'\n", r"expected one of 'sqlite', 'redis'"),
        ("[feature_store]\npush_timeout_s = 0\n", r"\[feature_store\]: push_timeout_s must be > 0"),
        ("[serving]\nport = 1\n", r"unknown section\(s\) serving"),
        ("[retrieval]\nsources = ['als', 'svd']\n", r"\[retrieval\]\.sources names unknown.*'svd'"),
        ("[retrieval]\nkss = [10]\n", r"\[retrieval\] has unknown key\(s\) kss"),
        ("[retrieval]\nks = [0, 10]\n", r"\[retrieval\]: ks and ndcg_k must be >= 1"),
        ("[retrieval]\nsplit_by = 'users'\n", r"split_by: expected one of 'events', 'time'"),
        ("[retrieval]\nval_frac = 'a tenth'\n", r"val_frac: expected a number"),
        ("[retrieval.als]\nfactor = 8\n", r"\[retrieval.als\] has unknown key 'factor'"),
        ("[retrieval.merge]\ntune = 1\n", r"tune: expected true or false"),
        ("[retrieval.merge]\nquota_step = 0.3\n", r"quota_step must divide 1"),
        ("[retrieval.merge]\nmethod = 'borda'\n", r"method: expected one of 'quotas', 'rrf'"),
        ("[retrieval.merge]\nrank_constant = 0\n", r"rank_constant must be > 0"),
        ("[retrieval.merge]\nquotas = {als = 1.5}\n", r"must be in \[0, 1\]"),
        ("[retrieval.merge]\nquotas = {als = 'half'}\n", r"quotas.als: expected an integer"),
        (
            "[retrieval]\nsources = ['als']\n[retrieval.merge]\nquotas = {ease = 0.5}\n",
            r"quotas names \['ease'\], which are not in \[retrieval\].sources",
        ),
        (
            "[retrieval]\nsources = ['als']\n[retrieval.merge]\ncold_quotas = {ease = 0.5}\n",
            r"cold_quotas names \['ease'\], which are not in \[retrieval\].sources",
        ),
        (
            "[retrieval.segment_popularity]\nhalf_life_days = 30.0\n",
            r"\[retrieval.segment_popularity\].half_life_days: expected a list",
        ),
        ("[features\n", r"not valid TOML"),
    ],
)
def test_config_errors_name_file_section_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_feed_config(path)
    assert str(path) in str(info.value)


def test_override_of_the_online_store_is_checked() -> None:
    assert FeedConfig().with_online_store("redis").feature_store.online_store == "redis"
    with pytest.raises(ValueError, match="online store: expected one of"):
        FeedConfig().with_online_store("memcached")


def test_shipped_retrieval_section_is_typed() -> None:
    retrieval = load_feed_config(REPO / "configs" / "feed.toml").retrieval
    assert set(retrieval.sources) == set(SOURCE_SECTIONS)
    assert retrieval.protocol.ks == (50, 100, 200, 500)
    assert retrieval.protocol.ndcg_k == 10
    assert retrieval.protocol.split_by == "events"
    assert retrieval.protocol.min_value is None
    assert retrieval.merge.tune is True
    assert retrieval.merge.tune_k == 200
    assert retrieval.merge.by_segment is True
    segments = retrieval.source_configs["segment_popularity"]
    assert segments.half_life_days == (14.0, 30.0, 90.0, 365.0, 730.0)  # type: ignore[union-attr]
    assert isinstance(retrieval.source_configs["ease"].l2, float)  # type: ignore[union-attr]
    assert list(retrieval.factories()) == list(retrieval.sources)


def test_quotas_keep_fractions_and_counts_apart(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "[retrieval]\nsources = ['als', 'popularity']\nmin_value = 4\n"
        "[retrieval.merge]\ntune = false\nquotas = {als = 150, popularity = 0.25}\n"
        "[retrieval.als]\nfactors = 8\n",
    )
    retrieval = load_feed_config(path).retrieval
    assert retrieval.merge.quotas == {"als": 150, "popularity": 0.25}
    assert isinstance(retrieval.merge.quotas["als"], int)
    assert retrieval.protocol.min_value == 4.0
    factories = retrieval.factories()
    assert list(factories) == ["als", "popularity"]
    als = factories["als"]()
    assert isinstance(als, ALSRetriever)
    assert als.factors == 8
    assert factories["als"]() is not als  # a fresh retriever per window


@pytest.mark.parametrize(
    ("section", "retriever"),
    [
        ("popularity", PopularityRetriever),
        ("segment_popularity", SegmentPopularityRetriever),
        ("covisitation", CovisitationRetriever),
        ("als", ALSRetriever),
        ("bpr", BPRRetriever),
        ("ease", EASERetriever),
    ],
)
def test_source_sections_mirror_their_retriever(section: str, retriever: type) -> None:
    """Same parameter names and defaults as the constructor: the config cannot drift from it."""
    params = inspect.signature(retriever).parameters
    expected = {n: p.default for n, p in params.items() if n != "fallback"}  # an object
    fields = {f.name: f.default for f in dataclasses.fields(SOURCE_SECTIONS[section])}
    assert fields == expected
    assert isinstance(SOURCE_SECTIONS[section]().build(), retriever)


def test_two_tower_section_mirrors_two_tower_config() -> None:
    from mlsd.models.retrieval.two_tower import TwoTowerConfig
    from mlsd.models.retrieval.two_tower_train import TwoTowerRetriever

    expected = {f.name: f.default for f in dataclasses.fields(TwoTowerConfig)}
    assert {f.name: f.default for f in dataclasses.fields(TwoTowerSource)} == expected
    built = TwoTowerSource(dim=16, pooling="attention").build()
    assert isinstance(built, TwoTowerRetriever)
    assert built.config == TwoTowerConfig(dim=16, pooling="attention")


def test_loading_the_config_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from mlsd.config import load_feed_config; "
        f"load_feed_config({str(REPO / 'configs' / 'feed.toml')!r}); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- [ranking] ---------------------------------------------------------------------------------


def test_shipped_ranking_section_builds_every_ranker() -> None:
    from mlsd.models.ranking.deep import DeepRanker
    from mlsd.models.ranking.ensemble import EnsembleRanker
    from mlsd.models.ranking.gbdt import LightGBMRanker
    from mlsd.models.ranking.logistic import LogisticRanker

    ranking = load_feed_config(REPO / "configs" / "feed.toml").ranking
    rankers = {name: make() for name, make in ranking.factories().items()}
    assert isinstance(rankers["logistic"], LogisticRanker)
    assert isinstance(rankers["lightgbm"], LightGBMRanker)
    assert isinstance(rankers["lambdarank"], LightGBMRanker)
    assert rankers["lambdarank"].objective == "lambdarank"
    assert isinstance(rankers["deep"], DeepRanker)
    assert dict(rankers["deep"].config.tasks) == {"click": 1.0, "rating": 0.5}
    ensemble = rankers["ensemble"]
    assert isinstance(ensemble, EnsembleRanker)
    assert [name for name, _ in ensemble.members or []] == [
        "logistic",
        "lightgbm",
        "lambdarank",
        "deep",
    ]
    assert ranking.pipeline(MergeConfig()).ranker == "ensemble"
    pipeline = ranking.pipeline(MergeConfig())
    assert pipeline.ks == (10, 20, 50, 100)
    assert pipeline.baselines == ("popularity", "ease", "als", "bpr")


def test_the_pipeline_merges_as_retrieval_merge_says_on_its_own_grid(tmp_path: Path) -> None:
    """``evaluate`` and ``train`` used to merge by ``MergeConfig``'s defaults whatever
    ``[retrieval.merge]`` said: a configured fusion never reached the bundle."""
    text = (
        '[retrieval.merge]\nmethod = "rrf"\nrank_constant = 10.0\ntune = false\n'
        "quotas = { popularity = 0.5, ease = 0.5 }\n"
    )
    feed = load_feed_config(_write(tmp_path, text))
    merge = feed.ranking.pipeline(feed.retrieval.merge).merge
    assert (merge.method, merge.rank_constant, merge.tune) == ("rrf", 10.0, False)
    assert dict(merge.quotas) == {"popularity": 0.5, "ease": 0.5}
    assert merge.quota_step == 0.2  # [ranking].quota_step, not [retrieval.merge]'s 0.1
    feed = load_feed_config(_write(tmp_path, "[ranking]\nquota_step = 0.25\n"))
    assert feed.ranking.pipeline(feed.retrieval.merge).merge.quota_step == 0.25
    with pytest.raises(ValueError, match=r"\[ranking\]: quota_step must divide 1"):
        load_feed_config(_write(tmp_path, "[ranking]\nquota_step = 0.3\n"))


def test_the_reports_freshness_variant_reads_the_configured_clock(tmp_path: Path) -> None:
    text = '[ranking.rerank]\nfreshness_clock = "first_event"\nfreshness_half_life_days = 7.0\n'
    pipeline = load_feed_config(_write(tmp_path, text)).ranking.pipeline(MergeConfig())
    fresh = pipeline.rerank_variants["freshness 0.3"]
    assert (fresh.freshness_weight, fresh.freshness_clock) == (0.3, "first_event")
    assert fresh.freshness_half_life_days == 7.0
    assert pipeline.rerank_variants["mmr 0.7"].freshness_clock == "created"  # no boost: as is
    assert pipeline.rerank.freshness_clock == "first_event"


def test_ranker_sections_keep_the_rankers_defaults() -> None:
    # The sections copy the rankers' defaults (so loading a config never imports torch);
    # this keeps the copies honest.
    from mlsd.config import DeepSection, LightGBMSection, LogisticSection
    from mlsd.models.ranking.deep import DeepRankerConfig
    from mlsd.models.ranking.gbdt import LightGBMRanker
    from mlsd.models.ranking.logistic import LogisticRanker

    for section, target in ((LogisticSection, LogisticRanker), (LightGBMSection, LightGBMRanker)):
        defaults = {
            name: p.default
            for name, p in inspect.signature(target.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        assert dataclasses.asdict(section()) == defaults
    deep = dataclasses.asdict(DeepSection())
    reference = DeepRankerConfig()
    for name, value in deep.items():
        if name != "tasks":  # the feed adds a rating head
            assert value == getattr(reference, name), name


def test_baselines_default_to_the_configured_sources(tmp_path: Path) -> None:
    config = load_feed_config(_write(tmp_path, '[retrieval]\nsources = ["popularity", "ease"]\n'))
    assert config.ranking.baselines == ("popularity", "ease")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[retrieval]\nsources = ["popularity"]\n[ranking]\nbaselines = ["ease"]\n', "baselines"),
        ('[ranking]\nrankers = ["forest"]\n', "unknown ranker"),
        ('[ranking]\nranker = "deep"\nrankers = ["logistic"]\n', "ranking].ranker"),
        ("[ranking]\nn_candidates = 50\n", "n_candidates"),
        ("[ranking.rerank]\nmmr_lambda = 2.0\n", "mmr_lambda"),
        ('[ranking.rerank]\nfreshness_clock = "release"\n', "freshness_clock"),
        ('[ranking.lightgbm]\nobjective = "poisson"\n', "ranking.lightgbm].objective"),
        ("[ranking]\nwindows = 3\n", "unknown key"),
        ('[ranking.ensemble]\nmembers = ["forest"]\n', "ranking.ensemble].members"),
    ],
)
def test_ranking_mistakes_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as caught:
        load_feed_config(path)
    assert str(path) in str(caught.value)


def test_service_log_section(tmp_path: Path) -> None:
    default = load_feed_config(_write(tmp_path, ""))
    assert default.service_log.enabled
    assert default.service_log.path(tmp_path) == tmp_path / "service-log"
    text = '[service_log]\ndir = "/var/log/mlsd"\nflush_rows = 100\nflush_interval_s = 1\n'
    section = load_feed_config(_write(tmp_path, text)).service_log
    assert section.path(tmp_path) == Path("/var/log/mlsd")
    assert section.writer == "process"
    log = section.open(tmp_path / "log")
    try:
        assert isinstance(log, ProcessServiceLog)
        assert (log.flush_rows, log.flush_interval_s, log.retention_days) == (100, 1.0, 30)
    finally:
        log.close()
    threaded = load_feed_config(_write(tmp_path, '[service_log]\nwriter = "thread"\n'))
    assert threaded.service_log.writer == "thread"
    for bad, message in [
        ('writer = "fork"', "writer"),
        ("flush_rows = 0", "flush_rows"),
        ("flush_interval_s = 0", "flush_interval_s"),
        ("rotate = true", "unknown key"),
    ]:
        path = _write(tmp_path, f"[service_log]\n{bad}\n")
        with pytest.raises(ValueError, match=message) as caught:
            load_feed_config(path)
        assert "[service_log]" in str(caught.value)


@pytest.fixture
def plan_config(tmp_path: Path) -> Path:
    path = tmp_path / "feed.toml"
    path.write_text("[plan]\ndaily_active_users = 864_000\nprecomputed_share = 0.5\n")
    return path


def test_plan_reads_the_config_and_set_overrides_it(plan_config: Path) -> None:
    assert load_plan_requirements(plan_config).daily_active_users == 864_000
    assert load_feed_config(plan_config).plan.daily_active_users == 864_000
    plan = load_plan_requirements(
        plan_config, {"users": "2_000_000", "index": "flat", "peak_to_average": "2"}
    )
    assert (plan.daily_active_users, plan.precomputed_share) == (864_000, 0.5)
    assert (plan.users, plan.index, plan.peak_to_average) == (2_000_000, "flat", 2.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"userz": "1"}, "unknown key 'userz'"),
        ({"users": "many"}, r"\[plan\]\.users: expected an integer"),
        ({"index": "ivf"}, "expected one of 'auto', 'flat', 'hnsw', 'ivfpq'"),
        ({"users": "0"}, "users must be > 0"),
    ],
)
def test_a_bad_override_names_the_key(
    plan_config: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_plan_requirements(plan_config, overrides)
