"""The whole-pipeline harness: protocols, ranker rows, lists, report consistency, training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from mlsd.data.sampling import downsample_negatives_mask
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.offline import (
    PIPELINE,
    OfflineReport,
    best_baseline,
    evaluate_pipeline,
    gate_scores,
    temporal_text,
    train_pipeline,
)
from mlsd.evaluation.pipeline import PipelineConfig
from mlsd.evaluation.quotas import MergeConfig
from mlsd.evaluation.random_split import random_split_per_user
from mlsd.evaluation.retrieval import ProtocolConfig, load_dataset, make_task
from mlsd.evaluation.scoring import group_ndcg
from mlsd.evaluation.stages import RankerFactory, SourceFactory, rank_lists, split_groups
from mlsd.models.ranking.bundle import BUNDLE_JSON, RankingBundle
from mlsd.models.ranking.candidates import CLAIMED_SOURCE
from mlsd.models.ranking.gbdt import LightGBMRanker
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.merge import QUOTAS, Fusion
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.serving.rerank import RerankConfig
from tests.models.ranking.contract import synthetic_ranking_data

FAST = ProtocolConfig(n_bootstrap=50)
SOURCES: dict[str, SourceFactory] = {
    "popularity": PopularityRetriever,
    "covisitation": CovisitationRetriever,
}
RANKERS: dict[str, RankerFactory] = {
    "logistic": LogisticRanker,
    "lightgbm": lambda: LightGBMRanker(n_estimators=50),
}
PIPELINE_CONFIG = PipelineConfig(
    n_candidates=100,
    ranker="logistic",
    ranker_windows=2,
    baselines=("popularity", "covisitation"),
    rerank_variants={"mmr 0.5": RerankConfig(mmr_lambda=0.5)},
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(n_users=400, n_items=150, n_events=40_000, days=40, seed=5)
    synthesize(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def report(world: Path) -> OfflineReport:
    return evaluate_pipeline(
        world,
        SOURCES,
        RANKERS,
        protocol=FAST,
        pipeline=PIPELINE_CONFIG,
        derived={"same": lambda fitted, fit, valid: fitted["logistic"]},
    )


def test_report_scores_every_method_on_the_same_users(report: OfflineReport, world: Path) -> None:
    names = [m.name for m in report.methods]
    assert names == [
        "popularity",
        "covisitation",
        "ranker logistic",
        "ranker lightgbm",
        "ranker same",
        PIPELINE,
    ]
    # A derived ranker is scored by the same code: a copy of logistic scores the same.
    assert report.method("ranker same").metrics == report.method("ranker logistic").metrics
    events, users, items = load_dataset(world)
    t2 = pd.Timestamp(report.cut_points["t2"])
    test = make_task(events, users, items, cutoff=t2, end=None)
    assert report.counts["n_test_users"] == len(test.user_ids)
    assert report.counts["n_warm_users"] == int(test.warm.sum())
    for method in report.methods:
        for segment, metrics in method.metrics.items():
            assert set(metrics) >= {f"ndcg@{k}" for k in report.ks}
            for name, estimate in metrics.items():
                if estimate is None:
                    continue
                assert 0.0 <= estimate.low <= estimate.mean <= estimate.high <= 1.0, (
                    method.name,
                    segment,
                    name,
                )


def test_pipeline_without_rerank_effects_equals_its_ranker(report: OfflineReport) -> None:
    # The default re-rank config is the identity on unseen candidates, so the pipeline's lists
    # are the chosen ranker's: the two rows of the report must agree exactly.
    assert report.pipeline_ranker == "logistic"
    pipeline = report.method(PIPELINE).metrics["all"]
    ranker = report.method("ranker logistic").metrics["all"]
    for name in pipeline:
        assert pipeline[name] == ranker[name]


def test_recall_grows_with_k_and_rerank_variants_trade_accuracy(report: OfflineReport) -> None:
    for method in report.methods:
        recalls = [method.metrics["all"][f"recall@{k}"].mean for k in report.ks]  # type: ignore[union-attr]
        assert recalls == sorted(recalls)
    variants = {v["variant"]: v for v in report.rerank}
    assert variants["mmr 0.5"]["ild@10"] >= variants["ranked, no re-ranking"]["ild@10"]
    assert set(report.timings) >= {"retrieval (test)", "fit ranker logistic", "re-rank (test)"}


def test_ranker_rows_cover_every_window(report: OfflineReport) -> None:
    counts = report.counts
    assert counts["n_ranker_groups"] > counts["n_validation_users"]  # two windows
    assert 0 < counts["n_ranker_positives"] < counts["n_ranker_rows"]
    assert {s.name for s in report.rankers} == {*RANKERS, "same"}
    for score in report.rankers:
        assert 0.0 <= score.valid_ndcg <= 1.0
        assert 0.5 < score.valid_auc <= 1.0


def test_the_pipeline_is_compared_with_each_baseline_on_the_same_users(
    report: OfflineReport,
) -> None:
    assert [(c.method, c.baseline, c.metric) for c in report.comparisons] == [
        (PIPELINE, "popularity", "ndcg@10"),
        (PIPELINE, "covisitation", "ndcg@10"),
    ]
    mine = report.method(PIPELINE).metrics
    for comparison in report.comparisons:
        theirs = report.method(comparison.baseline).metrics
        for segment, paired in comparison.segments.items():
            assert paired is not None, segment  # the world has warm and cold test users
            a, b = mine[segment]["ndcg@10"], theirs[segment]["ndcg@10"]
            assert a is not None
            assert b is not None
            assert paired.ratio == pytest.approx(a.mean / b.mean)
            assert paired.difference == pytest.approx(a.mean - b.mean)
            assert paired.ratio_low <= paired.ratio <= paired.ratio_high
            assert paired.difference_low <= paired.difference <= paired.difference_high
    raw = report.to_dict()["comparisons"][0]
    assert set(raw["segments"]["all"]) == {
        "ratio", "ratio_low", "ratio_high", "difference", "difference_low", "difference_high"
    }  # fmt: skip


def test_best_baseline_and_json(report: OfflineReport) -> None:
    name, value = best_baseline(report)
    assert name in ("popularity", "covisitation")
    assert value == max(
        report.method(n).metrics["all"]["ndcg@10"].mean  # type: ignore[union-attr]
        for n in ("popularity", "covisitation")
    )
    raw = report.to_dict()
    assert raw["protocol_name"] == "temporal"
    assert "full ranking" in raw["protocol"]


def test_the_protocol_text_states_the_ranker_windows(report: OfflineReport) -> None:
    """ranker_windows = 2: the text names both windows, their cutoffs, and the split by user."""
    text = report.protocol
    assert "2 label windows" in text
    assert "one label window" not in text
    t1, t2 = pd.Timestamp(report.cut_points["t1"]), pd.Timestamp(report.cut_points["t2"])
    assert f"[{(t1 - (t2 - t1)).isoformat()}, {t1.isoformat()})" in text
    assert f"[{t1.isoformat()}, {t2.isoformat()})" in text
    assert "refit on the events before its start" in text
    assert "held-out split is by user" in text
    assert "in every window" in text
    one = temporal_text(FAST, dataclasses.replace(PIPELINE_CONFIG, ranker_windows=1))
    assert "one label window, [t1, t2)" in one
    assert "3 label windows" in temporal_text(FAST, PipelineConfig(ranker_windows=3))


def test_rank_lists_orders_each_users_candidates() -> None:
    pairs = pd.DataFrame({"user_id": [3, 3, 3, 7, 7], "item_id": [10, 11, 12, 10, 13]})
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.4])
    items, ordered = rank_lists(np.array([3, 5, 7]), pairs, scores, k=2)
    assert items.tolist() == [[11, 12], [-1, -1], [13, 10]]
    assert ordered[0].tolist() == [0.9, 0.5]
    assert np.isneginf(ordered[1]).all()
    with pytest.raises(ValueError, match="sorted"):
        rank_lists(np.array([7, 3]), pairs, scores, k=2)


def test_split_groups_keeps_users_whole() -> None:
    data = synthetic_ranking_data(n_groups=50, group_size=8, seed=1)
    users = data.groups.copy()
    fit, valid = split_groups(data, users, valid_frac=0.2, seed=0)
    assert len(fit.features) + len(valid.features) == len(data.features)
    assert not set(fit.groups.tolist()) & set(valid.groups.tolist())
    assert len(np.unique(valid.groups)) == 10


def test_split_groups_holds_out_users_in_every_window() -> None:
    """A group is one user in one window; a held-out user's other windows are held out too."""
    n_users, n_windows, per_group = 40, 3, 4
    # group g = window * n_users + user, as to_rows keys them
    data = synthetic_ranking_data(n_groups=n_users * n_windows, group_size=per_group, seed=2)
    users = data.groups % n_users
    fit, valid = split_groups(data, users, valid_frac=0.25, seed=5)
    fit_users = set((fit.groups % n_users).tolist())
    valid_users = set((valid.groups % n_users).tolist())
    assert not fit_users & valid_users  # no user has rows on both sides
    assert len(valid_users) == 10
    assert len(valid.features) == 10 * n_windows * per_group
    again, _ = split_groups(data, users, valid_frac=0.25, seed=5)
    assert np.array_equal(again.groups, fit.groups)  # seeded
    with pytest.raises(ValueError, match="user ids"):
        split_groups(data, users[:-1], valid_frac=0.25, seed=5)


def test_group_ndcg_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 15)
    labels = (rng.random(len(groups)) < 0.2).astype(float)
    scores = rng.random(len(groups))
    expected = [
        ndcg_score([labels[groups == g]], [scores[groups == g]], k=10)
        for g in range(20)
        if labels[groups == g].any()
    ]
    assert group_ndcg(labels, scores, groups, k=10) == pytest.approx(np.mean(expected))
    assert math.isnan(group_ndcg(np.zeros(4), scores[:4], np.zeros(4, np.int64), k=10))


def test_random_split_per_user_is_stratified_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    events = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(30), rng.integers(1, 40, size=30)),
        }
    )
    events["item_id"] = np.arange(len(events))
    events["ts"] = pd.Timestamp("2020-01-01", tz="UTC")
    train, test = random_split_per_user(events, test_frac=0.25, seed=1)
    assert len(train) + len(test) == len(events)
    assert not set(train["item_id"]) & set(test["item_id"])
    sizes = events.groupby("user_id").size()
    in_test = test.groupby("user_id").size().reindex(sizes.index, fill_value=0)
    expected = np.minimum(np.round(0.25 * sizes), sizes - 1)
    assert (in_test == expected).all()
    again, _ = random_split_per_user(events, test_frac=0.25, seed=1)
    assert again["item_id"].tolist() == train["item_id"].tolist()


def test_random_protocol_runs_and_labels_itself(world: Path) -> None:
    def run(windows: int) -> OfflineReport:
        config = PipelineConfig(
            n_candidates=100,
            ranker="logistic",
            baselines=("popularity",),
            rerank_variants={},
            ranker_windows=windows,
        )
        return evaluate_pipeline(
            world,
            SOURCES,
            {"logistic": LogisticRanker},
            protocol=ProtocolConfig(n_bootstrap=20, test_frac=0.25),
            pipeline=config,
            protocol_name="random-per-user",
        )

    report, one = run(2), run(1)
    assert report.protocol_name == "random-per-user"
    assert "ONLY for comparison" in report.protocol
    assert "learns from 2 inner random split(s)" in report.protocol
    assert report.counts["n_cold_users"] == 0
    # Each label window is its own inner split of the same users (each draw's users with a
    # held-out event): about twice the ranker's requests.
    groups = report.counts["n_ranker_groups"]
    assert groups == pytest.approx(2 * one.counts["n_ranker_groups"], rel=0.02)
    assert report.counts["n_test_users"] == one.counts["n_test_users"]


def test_train_pipeline_bundle_round_trips(world: Path, tmp_path: Path) -> None:
    bundle, trained = train_pipeline(
        world, SOURCES, RANKERS, protocol=FAST, pipeline=PIPELINE_CONFIG
    )
    assert bundle.ranker_name == "logistic"
    assert sum(float(q) for q in bundle.quotas.values()) == pytest.approx(1.0)
    loaded = RankingBundle.load(bundle.save(tmp_path / "bundle"))
    features = trained.rows.data.features
    np.testing.assert_array_equal(loaded.ranker.predict(features), bundle.ranker.predict(features))
    assert loaded.calibration_scale == bundle.calibration_scale == "log_odds"
    np.testing.assert_array_equal(loaded.probabilities(features), bundle.probabilities(features))
    # A bundle saved before the scale was recorded: its calibrator read prior_corrected scores.
    meta_path = tmp_path / "bundle" / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    del meta["calibration_scale"]
    meta_path.write_text(json.dumps(meta))
    old = RankingBundle.load(tmp_path / "bundle")
    assert old.calibration_scale == "prior_corrected"
    meta["calibration_scale"] = "probits"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"bundle.json: calibration_scale 'probits'"):
        RankingBundle.load(tmp_path / "bundle")
    probs = loaded.calibrator.transform(loaded.ranker.predict(features))
    np.testing.assert_allclose(probs, bundle.calibrator.transform(bundle.ranker.predict(features)))
    assert loaded.layout == bundle.layout
    assert loaded.feature_config == bundle.feature_config
    assert loaded.quotas == bundle.quotas
    assert loaded.cold_quotas == bundle.cold_quotas == trained.cold_quotas
    assert not list((tmp_path / "bundle").rglob("*.pkl"))


def test_the_gate_scores_the_held_out_users_of_the_last_window_only(world: Path) -> None:
    """The registry's gate value (stored and head to head) is of [t1, t2), not of every window;
    no held-out user has a row the rankers were fitted on."""
    _, trained = train_pipeline(world, SOURCES, RANKERS, protocol=FAST, pipeline=PIPELINE_CONFIG)
    rows, valid = trained.rows, trained.valid_data
    assert valid is not None
    held_out = np.isin(rows.data.groups, np.unique(valid.groups))
    assert not set(rows.users[held_out].tolist()) & set(rows.users[~held_out].tolist())
    assert set(rows.window.tolist()) == {0, 1}  # ranker_windows = 2
    pairs, data = trained.gate_rows()
    last = held_out & (rows.window == 1)
    assert 0 < len(data.features) == last.sum() < len(valid.features)
    assert np.array_equal(pairs["user_id"].to_numpy(), rows.users[last])
    assert set(pairs["user_id"].tolist()) <= set(trained.validation.user_ids.tolist())
    gate = gate_scores(trained)
    ranker = trained.rankers[trained.chosen]
    expected = group_ndcg(data.label, ranker.predict(data.features), data.groups, k=10)
    assert gate.name == trained.chosen
    assert gate.valid_ndcg == pytest.approx(expected)
    everything = group_ndcg(valid.label, ranker.predict(valid.features), valid.groups, k=10)
    chosen = next(s for s in trained.scores if s.name == trained.chosen)
    assert chosen.valid_ndcg == pytest.approx(everything)  # the scores table: every window


def test_auc_splits_refit_every_ranker_on_other_draws_of_held_out_users(
    world: Path, tmp_path: Path
) -> None:
    """auc_splits = 3: each ranker's AUC on the pipeline's draw, then on two more draws (seeds
    after the protocol's), each a fresh fit; the report shows their mean and spread."""
    config = dataclasses.replace(PIPELINE_CONFIG, auc_splits=3)
    _, trained = train_pipeline(world, SOURCES, RANKERS, protocol=FAST, pipeline=config)
    for score in trained.scores:
        assert len(score.valid_auc_splits) == 3
        assert score.valid_auc_splits[0] == score.valid_auc
        assert len(set(score.valid_auc_splits)) == 3  # other users, other fits
    rows = trained.rows
    fit, valid = split_groups(
        rows.data, rows.users, valid_frac=config.ranker_valid_frac, seed=FAST.seed + 2
    )
    assert trained.valid_data is not None
    assert not np.array_equal(np.unique(valid.groups), np.unique(trained.valid_data.groups))
    again = roc_auc_score(valid.label, LogisticRanker().fit(fit, valid).predict(valid.features))
    logistic = next(s for s in trained.scores if s.name == "logistic")
    assert logistic.valid_auc_splits[2] == pytest.approx(again)
    with pytest.raises(ValueError, match="auc_splits=0"):
        PipelineConfig(auc_splits=0)


def test_cold_users_candidates_are_merged_with_the_cold_quotas(world: Path) -> None:
    # As in the retrieval harness: a user without events before the window's start gets the
    # cold quotas (every source answers them with its fallback list).
    merge = MergeConfig(tune=False, quotas={"covisitation": 1.0}, cold_quotas={"popularity": 1.0})
    config = dataclasses.replace(PIPELINE_CONFIG, ranker_windows=1, merge=merge)
    protocol = dataclasses.replace(FAST, val_frac=0.5)  # the last half has cold users
    bundle, trained = train_pipeline(world, SOURCES, RANKERS, protocol=protocol, pipeline=config)
    assert bundle.quotas == {"covisitation": 1.0}
    assert bundle.cold_quotas == {"popularity": 1.0}
    task = trained.validation
    cold_users = set(task.user_ids[~task.warm].tolist())
    assert 0 < len(cold_users) < len(task.user_ids)
    pairs = trained.rows.pairs
    claimed = pairs.groupby(pairs["user_id"].isin(cold_users))[CLAIMED_SOURCE].agg(set)
    assert claimed[True] == {"popularity"}
    assert "covisitation" in claimed[False]
    # Tuned by segment (the default), the report says both.
    report = evaluate_pipeline(world, SOURCES, RANKERS, protocol=FAST, pipeline=PIPELINE_CONFIG)
    assert report.to_dict()["cold_quotas"] == report.cold_quotas


def test_a_fused_merge_reaches_the_rankers_rows_and_the_bundle(world: Path, tmp_path: Path) -> None:
    fusion = Fusion("rrf", rank_constant=10.0)
    merge = MergeConfig(
        tune=False,
        quotas={"covisitation": 0.5, "popularity": 0.5},
        method="rrf",
        rank_constant=10.0,
    )
    config = dataclasses.replace(PIPELINE_CONFIG, ranker_windows=1, merge=merge)
    bundle, trained = train_pipeline(world, SOURCES, RANKERS, protocol=FAST, pipeline=config)
    assert bundle.fusion == fusion
    # The ranker's rows are the fused candidates: an item both sources list is claimed by the
    # one contributing more, and the candidates are the fused top n_candidates.
    quota_bundle, quota_trained = train_pipeline(
        world, SOURCES, RANKERS, protocol=FAST,
        pipeline=dataclasses.replace(config, merge=dataclasses.replace(merge, method="quotas")),
    )  # fmt: skip
    fused_pairs = set(map(tuple, trained.rows.pairs[["user_id", "item_id"]].to_numpy().tolist()))
    quota_pairs = set(
        map(tuple, quota_trained.rows.pairs[["user_id", "item_id"]].to_numpy().tolist())
    )
    assert fused_pairs != quota_pairs
    loaded = RankingBundle.load(bundle.save(tmp_path / "bundle"))
    assert loaded.fusion == fusion
    assert RankingBundle.load(quota_bundle.save(tmp_path / "quota")).fusion.method == "quotas"
    # A bundle from before the fusion option merged by quotas; a bad one is refused.
    meta_path = tmp_path / "bundle" / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    del meta["merge"]
    meta_path.write_text(json.dumps(meta))
    assert RankingBundle.load(tmp_path / "bundle").fusion == QUOTAS
    meta["merge"] = {"method": "borda"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"bundle.json: merge .*'borda'.*use 'quotas' or 'rrf'"):
        RankingBundle.load(tmp_path / "bundle")


def test_unknown_ranker_and_bad_bundle_are_clear_errors(world: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pipeline ranker 'nope'"):
        evaluate_pipeline(
            world, SOURCES, RANKERS, pipeline=PipelineConfig(ranker="nope", n_candidates=100)
        )
    with pytest.raises(ValueError, match="not a ranking bundle"):
        RankingBundle.load(tmp_path)


def test_negative_downsampling_is_recalibrated(world: Path) -> None:
    config = PipelineConfig(
        n_candidates=100,
        ranker="logistic",
        negative_keep_rate=0.2,
        baselines=("popularity",),
        rerank_variants={},
    )
    report = evaluate_pipeline(
        world, SOURCES, {"logistic": LogisticRanker}, protocol=FAST, pipeline=config
    )
    calibration = report.calibration
    assert calibration["negative_keep_rate"] == 0.2
    # The foundation's recalibration maps the downsampled model back to the click rate...
    # (without it, odds inflated 5x put the error near the base rate itself)
    assert calibration["ece_before_calibrator"] is not None
    assert calibration["ece_before_calibrator"] < 0.5 * calibration["base_rate"]
    # ...and the held-out calibrator finishes the job.
    assert calibration["ece_calibrated"] <= calibration["ece_before_calibrator"] + 0.02
    positives = report.counts["n_ranker_positives"]
    assert 0 < positives < report.counts["n_ranker_rows"]


def test_held_out_log_loss_is_only_for_rankers_whose_scores_are_probabilities() -> None:
    # A LambdaRank score or an ensemble's mean z-score is no log-odds: its sigmoid's log loss
    # measured the score's scale, making the better ranker look worse than a constant.
    from mlsd.evaluation.offline import _ranker_scores

    train, valid = synthetic_ranking_data(seed=1), synthetic_ranking_data(seed=2)
    listwise = LightGBMRanker(objective="lambdarank", n_estimators=20).fit(train)
    pointwise = LogisticRanker().fit(train)
    assert math.isnan(_ranker_scores("lambdarank", listwise, valid, 0.0).valid_log_loss)
    scores = _ranker_scores("logistic", pointwise, valid, 0.0)
    base_rate = valid.label.mean()
    constant = -(base_rate * math.log(base_rate) + (1 - base_rate) * math.log(1 - base_rate))
    assert scores.valid_log_loss < constant  # a real probability, better than the base rate
    # Fit on a fifth of the negatives, scored on all of them: corrected for the sampling, its
    # log loss is about the full fit's; uncorrected, the sampling alone inflated it.
    keep = downsample_negatives_mask(train.label, keep_rate=0.2, seed=0)
    sampled = LogisticRanker().fit(train.take(np.flatnonzero(keep)))
    corrected = _ranker_scores("logistic", sampled, valid, 0.0, keep_rate=0.2).valid_log_loss
    raw = _ranker_scores("logistic", sampled, valid, 0.0).valid_log_loss
    assert corrected == pytest.approx(scores.valid_log_loss, rel=0.03)
    assert raw > 1.2 * corrected
