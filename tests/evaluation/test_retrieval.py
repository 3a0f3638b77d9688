"""The retrieval harness: the protocol's windows, leakage, brute-force metrics, quota tuning."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.data.split import split_dataset
from mlsd.evaluation.metrics import recall_at_k_score
from mlsd.evaluation.quotas import best_quotas, climb_quotas
from mlsd.evaluation.retrieval import (
    MERGED,
    MergeConfig,
    ProtocolConfig,
    RetrievalReport,
    SourceFactory,
    SourceRun,
    catalog_as_of,
    evaluate_retrieval,
    make_task,
    quota_grid,
    tune_quotas,
    tune_segment_quotas,
)
from mlsd.models.retrieval.base import (
    FloatArray,
    IntArray,
    InteractionMatrix,
    RetrievalData,
    Retriever,
)
from mlsd.models.retrieval.covisitation import CovisitationRetriever
from mlsd.models.retrieval.merge import Fusion, merge_candidates
from mlsd.models.retrieval.popularity import PopularityRetriever
from mlsd.models.retrieval.topk import recommend_from_scores
from tests.models.retrieval.contract import frame

FAST = ProtocolConfig(ks=(5, 20, 50), ndcg_k=10, n_bootstrap=50)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(n_users=300, n_items=200, n_events=30_000, days=20, seed=11)
    synthesize(config, out, progress=False)
    return out


class _ByIdRetriever(Retriever):
    """Ranks items by id, lowest first: a ranking simple enough to score by brute force."""

    name = "by_id"

    def fit(self, train: RetrievalData) -> Self:
        self.interactions_ = InteractionMatrix.from_events(train.events, train.items["item_id"])
        return self

    def recommend(
        self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
    ) -> tuple[IntArray, FloatArray]:
        scores = -self.interactions_.item_ids.astype(np.float32)
        return recommend_from_scores(
            user_ids,
            k,
            interactions=self.interactions_,
            score_rows=lambda rows: np.broadcast_to(scores, (len(rows), len(scores))),
            fallback_scores=scores,
            exclude_seen=exclude_seen,
        )


def test_make_task_relevant_excludes_seen_items_and_splits_warm_from_cold() -> None:
    events = frame(
        [
            (1, 10, "2024-01-01"),
            (1, 11, "2024-01-02"),
            (2, 10, "2024-01-02"),
            (1, 11, "2024-01-05"),  # seen before the cutoff: not relevant
            (1, 12, "2024-01-06"),
            (1, 12, "2024-01-07"),  # twice in the window: one relevant item
            (2, 10, "2024-01-06"),  # user 2's only window event was seen: user left out
            (3, 13, "2024-01-08"),  # cold user
            (3, 14, "2024-01-09"),  # after the window end
        ]
    )
    items = pd.DataFrame({"item_id": [10, 11, 12, 13, 14]})
    cutoff, end = pd.Timestamp("2024-01-04", tz="UTC"), pd.Timestamp("2024-01-09", tz="UTC")
    task = make_task(events, pd.DataFrame({"user_id": [1, 2, 3]}), items, cutoff=cutoff, end=end)
    assert task.user_ids.tolist() == [1, 3]
    assert [r.tolist() for r in task.relevant] == [[12], [13]]
    assert task.warm.tolist() == [True, False]
    assert task.n_active_users == 3
    assert task.train.events["ts"].max() < cutoff
    assert len(task.train.events) == 3
    everything = make_task(events, events[["user_id"]], items, cutoff=cutoff, end=None)
    assert [r.tolist() for r in everything.relevant] == [[12], [13, 14]]


def test_min_value_keeps_only_liked_items() -> None:
    events = frame([(1, 10, "2024-01-01"), (1, 11, "2024-01-05"), (1, 12, "2024-01-06")])
    events["value"] = np.array([5.0, 2.0, 4.0], dtype=np.float32)
    items = pd.DataFrame({"item_id": [10, 11, 12]})
    cutoff = pd.Timestamp("2024-01-04", tz="UTC")
    task = make_task(events, events[["user_id"]], items, cutoff=cutoff, end=None, min_value=4.0)
    assert [r.tolist() for r in task.relevant] == [[12]]
    assert task.n_active_users == 1


def test_catalog_as_of_leaves_out_items_created_later() -> None:
    cutoff = pd.Timestamp("2024-01-10", tz="UTC")
    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "created_ts": pd.to_datetime(
                ["2024-01-01", "2024-02-01", None, "2024-03-01"], utc=True
            ),
        }
    )
    before = frame([(1, 4, "2024-01-05")])  # item 4 has an event, so it exists despite its date
    assert catalog_as_of(items, before, cutoff)["item_id"].tolist() == [1, 3, 4]
    assert catalog_as_of(items[["item_id"]], before, cutoff)["item_id"].tolist() == [1, 2, 3, 4]


def _recall(report: RetrievalReport, method: str, k: int, segment: str = "all") -> float:
    estimate = report.method(method).metrics[segment][f"recall@{k}"]
    assert estimate is not None
    return estimate.mean


def _brute_force_recall(world: Path, t2: pd.Timestamp, k: int) -> tuple[float, int, int]:
    """Recall@k of ``_ByIdRetriever`` over the test users, from the raw files with sets."""
    events = pq.read_table(world / "events.parquet").to_pandas()
    items = pq.read_table(world / "items.parquet").to_pandas()
    before, after = events[events["ts"] < t2], events[events["ts"] >= t2]
    created = pd.to_datetime(items["created_ts"], utc=True)
    exists = (created < t2) | items["item_id"].isin(before["item_id"])
    catalog = sorted(items.loc[exists, "item_id"].tolist())
    recalls, n_warm = [], 0
    for user, group in after.groupby("user_id"):
        seen = set(before.loc[before["user_id"] == user, "item_id"].tolist())
        relevant = set(group["item_id"].tolist()) - seen
        if not relevant:
            continue
        n_warm += bool(seen)
        ranked = [i for i in catalog if i not in seen][:k]
        recalls.append(len(relevant & set(ranked)) / len(relevant))
    return float(np.mean(recalls)), len(recalls), n_warm


def test_metrics_match_a_brute_force_count(world: Path) -> None:
    report = evaluate_retrieval(world, {"by_id": _ByIdRetriever}, protocol=FAST)
    t2 = pd.Timestamp(report.t2)
    recall, n_users, n_warm = _brute_force_recall(world, t2, 20)
    assert _recall(report, "by_id", 20) == pytest.approx(recall)
    assert report.counts["n_test_users"] == n_users
    assert report.counts["n_warm_users"] == n_warm
    assert report.validation is None
    assert [m.name for m in report.methods] == ["by_id"]  # no merge without a MergeConfig


def test_cut_points_and_counts_agree_with_the_split_module(world: Path, tmp_path: Path) -> None:
    """The harness and ``split_dataset`` (DuckDB) see the same windows."""
    report = evaluate_retrieval(world, {"popularity": PopularityRetriever}, protocol=FAST)
    split = split_dataset(world, val_frac=0.1, test_frac=0.2, out=tmp_path / "split")
    assert pd.Timestamp(report.t1) == split.spec.t1
    assert pd.Timestamp(report.t2) == split.spec.t2
    assert report.counts["n_test_active_users"] == split.stats["test"]["n_users"]
    assert report.counts["n_train_events"] == (
        split.stats["train"]["n_events"] + split.stats["val"]["n_events"]
    )


class _Spy:
    """A factory that records what every retriever it makes is fit on and asked for."""

    def __init__(self) -> None:
        self.fits: list[tuple[pd.Timestamp, pd.Timestamp]] = []
        self.users: list[IntArray] = []

    def __call__(self) -> Retriever:
        spy = self

        class _Recorded(PopularityRetriever):
            def fit(self, train: RetrievalData) -> Self:
                spy.fits.append((train.cutoff, train.events["ts"].max()))
                return super().fit(train)

            def recommend(
                self, user_ids: npt.ArrayLike, k: int, *, exclude_seen: bool = True
            ) -> tuple[IntArray, FloatArray]:
                spy.users.append(np.asarray(user_ids))
                return super().recommend(user_ids, k, exclude_seen=exclude_seen)

        return _Recorded()


def test_sources_see_only_events_before_each_cutoff(world: Path) -> None:
    spy = _Spy()
    sources: dict[str, SourceFactory] = {"spy": spy, "by_id": _ByIdRetriever}
    report = evaluate_retrieval(world, sources, protocol=FAST, merge=MergeConfig(tune_k=20))
    t1, t2 = pd.Timestamp(report.t1), pd.Timestamp(report.t2)
    assert [cutoff for cutoff, _ in spy.fits] == [t1, t2]  # validation fit, then the refit
    assert all(last < cutoff for cutoff, last in spy.fits)
    assert spy.fits[0][1] >= t1 - pd.Timedelta(hours=6)  # the fit did get the recent events
    events = pq.read_table(world / "events.parquet").to_pandas()
    val_users = set(events.loc[(events["ts"] >= t1) & (events["ts"] < t2), "user_id"])
    assert set(spy.users[0].tolist()) <= val_users
    assert len(spy.users[1]) == report.counts["n_test_users"]


def _scramble_test_window(world: Path, out: Path, t2: pd.Timestamp) -> None:
    """A copy of ``world`` whose test-window events point at other items (times unchanged)."""
    shutil.copytree(world, out)
    table = pq.read_table(world / "events.parquet")
    ts = table["ts"].to_pandas()
    items = table["item_id"].to_numpy().copy()
    after = (ts >= t2).to_numpy()
    items[after] = np.random.default_rng(0).permutation(items[after])[::-1]
    column = table.schema.get_field_index("item_id")
    table = table.set_column(column, table.schema.field(column), pa.array(items))
    pq.write_table(table, out / "events.parquet")


def test_quota_tuning_never_sees_the_test_window(world: Path, tmp_path: Path) -> None:
    sources: dict[str, SourceFactory] = {
        "covisitation": CovisitationRetriever,
        "popularity": PopularityRetriever,
        "by_id": _ByIdRetriever,
    }
    merge = MergeConfig(tune_k=20, quota_step=0.25)
    first = evaluate_retrieval(world, sources, protocol=FAST, merge=merge)
    _scramble_test_window(world, tmp_path / "scrambled", pd.Timestamp(first.t2))
    second = evaluate_retrieval(tmp_path / "scrambled", sources, protocol=FAST, merge=merge)
    assert (second.t1, second.t2) == (first.t1, first.t2)
    assert second.validation == first.validation
    assert second.quotas == first.quotas

    # ... while the test numbers did change: the scrambled window is another test.
    assert _recall(second, MERGED, 20) != pytest.approx(_recall(first, MERGED, 20))


def test_report_json_has_intervals_segments_and_timings(world: Path) -> None:
    sources: dict[str, SourceFactory] = {
        "covisitation": CovisitationRetriever,
        "by_id": _ByIdRetriever,
    }
    report = evaluate_retrieval(world, sources, protocol=FAST, merge=MergeConfig(tune_k=20))
    raw = json.loads(report.to_json())
    assert [m["name"] for m in raw["methods"]] == ["covisitation", "by_id", MERGED]
    assert "full ranking" in raw["protocol"].lower()
    assert (
        raw["counts"]["n_warm_users"] + raw["counts"]["n_cold_users"]
        == raw["counts"]["n_test_users"]
    )
    for method in raw["methods"]:
        assert method["fit_seconds"] >= 0
        assert set(method["metrics"]) == {"all", "warm", "cold"}
        assert set(method["metrics"]["all"]) == {"recall@5", "recall@20", "recall@50", "ndcg@10"}
        for estimate in method["metrics"]["all"].values():
            assert estimate["low"] <= estimate["mean"] <= estimate["high"]
    merged = report.method(MERGED)
    assert merged.fit_seconds == pytest.approx(
        sum(report.method(n).fit_seconds for n in ("covisitation", "by_id"))
    )
    assert sum(report.quotas.values()) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no method 'als'"):
        report.method("als")


def test_an_empty_segment_is_null_and_a_cold_one_scored(world: Path) -> None:
    # This world's last 1% of events come from warm users only; the last 50% has cold ones.
    for test_frac, has_cold in ((0.01, False), (0.5, True)):
        protocol = ProtocolConfig(ks=(5,), ndcg_k=5, n_bootstrap=20, test_frac=test_frac)
        report = evaluate_retrieval(world, {"by_id": _ByIdRetriever}, protocol=protocol)
        assert (report.counts["n_cold_users"] > 0) is has_cold
        cold = json.loads(report.to_json())["methods"][0]["metrics"]["cold"]["recall@5"]
        assert (cold is not None) is has_cold


def test_tune_quotas_finds_the_complementary_split() -> None:
    """Source a knows the first half of the users, b the second; the best merge is half/half."""
    n_users, k = 40, 10
    relevant = [np.arange(u * 100, u * 100 + 5) for u in range(n_users)]
    noise = np.arange(10_000, 10_000 + k)
    know = np.stack([np.concatenate([r, noise[:5]]) for r in relevant])
    guess = np.broadcast_to(noise, (n_users, k))
    half = (np.arange(n_users) < n_users // 2)[:, None]
    runs = {
        "a": SourceRun(np.where(half, know, guess), 0.0, 0.0),
        "b": SourceRun(np.where(half, guess, know), 0.0, 0.0),
        "c": SourceRun(np.asarray(guess), 0.0, 0.0),
    }
    quotas, recall, n_grid = tune_quotas(runs, relevant, MergeConfig(tune_k=k, quota_step=0.1))
    assert quotas == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})
    assert recall == pytest.approx(1.0)
    assert n_grid == math.comb(10 + 2, 2)


def test_warm_and_cold_users_get_quotas_of_their_own() -> None:
    """Source a knows the warm users, b the cold ones: each segment's quotas pick its source."""
    n_users, k = 40, 10
    relevant = [np.arange(u * 100, u * 100 + k) for u in range(n_users)]
    know = np.stack(relevant)
    guess = np.broadcast_to(np.arange(10_000, 10_000 + k), (n_users, k))
    warm = np.arange(n_users) < 30
    lists = {"a": np.where(warm[:, None], know, guess), "b": np.where(warm[:, None], guess, know)}
    config = MergeConfig(tune_k=k, quota_step=0.5)
    quotas, cold_quotas, n_grid = tune_segment_quotas(lists, relevant, warm, config)
    assert (quotas, cold_quotas, n_grid) == ({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, 3)
    # One search over everyone serves the 30 warm users and fails the 10 cold ones.
    joint = dataclasses.replace(config, by_segment=False)
    assert tune_segment_quotas(lists, relevant, warm, joint)[:2] == ({"a": 1.0, "b": 0.0}, None)
    # Too few cold users to tune on: they take the all-users quotas.
    few = dataclasses.replace(config, min_segment_users=11)
    quotas, cold_quotas, _ = tune_segment_quotas(lists, relevant, warm, few)
    assert quotas == cold_quotas == {"a": 1.0, "b": 0.0}


def test_report_has_cold_quotas_only_when_split(world: Path) -> None:
    sources: dict[str, SourceFactory] = {
        "covisitation": CovisitationRetriever,
        "by_id": _ByIdRetriever,
    }
    protocol = dataclasses.replace(FAST, test_frac=0.5)  # the last half has cold users
    merge = MergeConfig(tune_k=20, quota_step=0.5, min_segment_users=1)
    split = evaluate_retrieval(world, sources, protocol=protocol, merge=merge)
    cold_quotas = split.cold_quotas
    assert cold_quotas is not None
    assert sum(cold_quotas.values()) == pytest.approx(1.0)
    assert split.validation is not None
    assert split.validation.cold_quotas == cold_quotas
    assert set(split.validation.segment_recall) == {"warm", "cold"}
    assert set(split.validation.segment_recall["cold"]) == {"covisitation", "by_id", MERGED}
    joint = dataclasses.replace(merge, by_segment=False)
    report = evaluate_retrieval(world, sources, protocol=protocol, merge=joint)
    assert report.cold_quotas is None
    assert json.loads(report.to_json())["cold_quotas"] is None
    fixed = MergeConfig(tune=False, quotas={"by_id": 1.0}, cold_quotas={"covisitation": 1.0})
    report = evaluate_retrieval(world, sources, protocol=protocol, merge=fixed)
    assert (report.quotas, report.cold_quotas) == ({"by_id": 1.0}, {"covisitation": 1.0})
    # The protocol text said "quotas tuned on validation" whatever the merge was.
    assert "fixed quotas ({'by_id': 1.0}, cold users {'covisitation': 1.0}; not tuned)" in (
        report.protocol
    )
    assert "tuned on validation" not in report.protocol
    # The merged cold users' lists are covisitation's (its cold fallback), warm ones by_id's.
    for segment, source in (("cold", "covisitation"), ("warm", "by_id")):
        assert _recall(report, MERGED, 20, segment) == pytest.approx(
            _recall(report, source, 20, segment)
        )


def test_the_quota_search_scores_each_merge_by_its_recall() -> None:
    """The fast search (claimed entries x relevant entries) agrees with the merged lists' recall."""
    rng = np.random.default_rng(3)
    n_users, k = 25, 15
    lists = {name: np.stack([rng.permutation(60)[:20] for _ in range(n_users)]) for name in "abc"}
    lists["c"][:, 8:] = -1
    relevant = [rng.choice(70, size=rng.integers(1, 12), replace=False) for _ in range(n_users)]
    for quotas in quota_grid(list(lists), 0.25)[::4]:
        _, recall = best_quotas(lists, relevant, [quotas], k=k)
        merged = merge_candidates({n: lst[:, :k] for n, lst in lists.items()}, quotas, k)
        assert recall == pytest.approx(recall_at_k_score(merged.item_ids, relevant, k=k).mean())


def test_quota_grid() -> None:
    grid = quota_grid(["a", "b", "c"], 0.25)
    assert len(grid) == math.comb(4 + 2, 2)
    assert all(sum(q.values()) == pytest.approx(1.0) for q in grid)
    assert {"a": 1.0, "b": 0.0, "c": 0.0} in grid
    assert len({tuple(q.values()) for q in grid}) == len(grid)
    with pytest.raises(ValueError, match="must divide 1"):
        quota_grid(["a"], 0.3)


def test_a_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"events.parquet: not found"):
        evaluate_retrieval(tmp_path, {"by_id": _ByIdRetriever})


@pytest.mark.dataset
def test_ml100k_protocol_has_the_design_figures(ml100k_dir: Path, tmp_path: Path) -> None:
    """DESIGN.md: the last 20% of ML-100K as test leaves 301 test users, 109 of them warm."""
    from mlsd.data.sources.movielens import import_movielens

    import_movielens("movielens-100k", source=ml100k_dir, out=tmp_path / "ml", progress=False)
    report = evaluate_retrieval(tmp_path / "ml", {"popularity": PopularityRetriever}, protocol=FAST)
    assert report.counts["n_test_users"] == 301
    assert report.counts["n_warm_users"] == 109


def test_the_fused_search_finds_what_two_sources_agree_on_and_quotas_cannot() -> None:
    """a and b each list 10 items of their own first, then the same 10 relevant ones; c lists
    junk. Any quotas take the sources' first items; fusion ranks the shared items first."""
    n_users, k = 30, 10
    relevant = [np.arange(u * 100, u * 100 + k) for u in range(n_users)]
    shared = np.stack(relevant)
    own = {n: np.arange(base, base + k)[None, :] + 1000 * np.arange(n_users)[:, None]
           for n, base in (("a", 50_000), ("b", 60_000), ("c", 70_000))}  # fmt: skip
    lists = {
        "a": np.concatenate([own["a"], shared], axis=1),
        "b": np.concatenate([own["b"], shared[:, ::-1]], axis=1),
        "c": np.concatenate([own["c"], own["c"] + 500], axis=1),
    }
    config = MergeConfig(tune_k=k, quota_step=0.1, method="rrf", by_segment=False)
    quotas, cold_quotas, tried = tune_segment_quotas(lists, relevant, np.ones(30, bool), config)
    assert cold_quotas is None
    assert quotas["a"] > 0
    assert quotas["b"] > 0
    assert tried < math.comb(10 + 2, 2)  # the grid has 66 points
    fused = merge_candidates(lists, quotas, k, fusion=config.fusion)
    assert recall_at_k_score(fused.item_ids, relevant, k=k).mean() == pytest.approx(1.0)
    _, best_by_quotas = best_quotas(lists, relevant, quota_grid(list(lists), 0.1), k=k)
    assert best_by_quotas == 0.0


def test_the_fused_search_scores_each_point_by_the_fused_lists_recall() -> None:
    rng = np.random.default_rng(5)
    n_users, k = 30, 15
    lists = {name: np.stack([rng.permutation(60)[:20] for _ in range(n_users)]) for name in "abc"}
    lists["c"][:, 8:] = -1
    relevant = [rng.choice(70, size=rng.integers(1, 12), replace=False) for _ in range(n_users)]
    fusion = Fusion("rrf", rank_constant=5.0)
    quotas, recall, tried = climb_quotas(lists, relevant, 0.25, k=k, fusion=fusion)
    assert sum(quotas.values()) == pytest.approx(1.0)
    assert tried >= 4  # the even split and each source alone at least
    merged = merge_candidates({n: lst[:, :k] for n, lst in lists.items()}, quotas, k, fusion=fusion)
    assert recall == pytest.approx(recall_at_k_score(merged.item_ids, relevant, k=k).mean())
    # No point of the grid beats the one found by more than the climb's local view allows:
    # at least, none of its single-step neighbours does.
    for other in quota_grid(list(lists), 0.25):
        steps = sum(abs(other[n] - quotas[n]) for n in lists) / 0.25
        if round(steps) == 2:
            fused = merge_candidates(
                {n: lst[:, :k] for n, lst in lists.items()}, other, k, fusion=fusion
            )
            assert recall_at_k_score(fused.item_ids, relevant, k=k).mean() <= recall + 1e-12


def test_a_fused_merge_is_tuned_scored_and_named_in_the_report(world: Path) -> None:
    sources: dict[str, SourceFactory] = {
        "covisitation": CovisitationRetriever,
        "by_id": _ByIdRetriever,
    }
    merge = MergeConfig(tune_k=20, quota_step=0.5, method="rrf", rank_constant=10.0)
    report = evaluate_retrieval(world, sources, protocol=FAST, merge=merge)
    assert report.fusion == Fusion("rrf", 10.0)
    assert report.to_dict()["fusion"] == {"method": "rrf", "rank_constant": 10.0}
    assert sum(report.quotas.values()) == pytest.approx(1.0)
    fixed = MergeConfig(
        tune=False, quotas={"covisitation": 0.5, "by_id": 0.5}, method="rrf", rank_constant=10.0
    )
    fused = evaluate_retrieval(world, sources, protocol=FAST, merge=fixed)
    quota = evaluate_retrieval(
        world, sources, protocol=FAST, merge=dataclasses.replace(fixed, method="quotas")
    )
    # The two merges of the same lists differ, and each source alone is the same in both.
    assert _recall(fused, "by_id", 20, "all") == _recall(quota, "by_id", 20, "all")
    assert fused.method(MERGED).metrics != quota.method(MERGED).metrics
