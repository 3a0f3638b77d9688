"""Given splits: a peer's split files read, matched to the events, and evaluated as RecBole does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd.data.sources.movielens import import_movielens
from mlsd.data.sources.synthetic import WorldConfig, synthesize
from mlsd.evaluation.given_split import leave_last_out, read_splits, split_files
from mlsd.evaluation.metrics import ndcg_at_k_score, recall_at_k_score
from mlsd.evaluation.offline import OfflineReport, evaluate_pipeline
from mlsd.evaluation.pipeline import PipelineConfig
from mlsd.evaluation.retrieval import ProtocolConfig, load_dataset
from mlsd.evaluation.stages import recommend_excluding, retrieve
from mlsd.models.ranking.logistic import LogisticRanker
from mlsd.models.retrieval.base import PAD_ITEM
from mlsd.models.retrieval.ease import EASERetriever
from mlsd.models.retrieval.popularity import PopularityRetriever
from tests.conftest import dataset_path

PROTOCOL = ProtocolConfig(n_bootstrap=20)


def events_frame() -> pd.DataFrame:
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(12), unit="h")
    return pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            "item_id": [10, 11, 12, 13, 10, 11, 14, 15, 12, 13, 14, 16],
            "ts": ts,
            "event_type": "rating",
            "value": 4.0,
        }
    )


def write_splits(prefix: Path, parts: dict[str, list[tuple[int, int]]], sep: str = "\t") -> Path:
    suffix = ".tsv" if sep == "\t" else ".csv"
    for name, pairs in parts.items():
        frame = pd.DataFrame(pairs, columns=["user", "item"])
        frame.to_csv(prefix.parent / f"{prefix.name}_{name}{suffix}", sep=sep, index=False)
    return prefix


PARTS = {
    "train": [(1, 10), (1, 11), (2, 10), (2, 11), (3, 12), (3, 13)],
    "valid": [(1, 12), (2, 14), (3, 14)],
    "test": [(1, 13), (2, 15), (3, 16)],
}


def test_split_rows_take_their_events_times_and_values(tmp_path: Path) -> None:
    events = events_frame()
    given = read_splits(write_splits(tmp_path / "p", PARTS), events)
    for name, pairs in PARTS.items():
        got = given.events[name]
        assert sorted(zip(got["user_id"], got["item_id"], strict=True)) == sorted(pairs)
        assert list(got.columns) == list(events.columns)
    test = given.events["test"]
    assert test["ts"].tolist() == events.loc[[3, 7, 11], "ts"].tolist()
    assert given.counts["events_in_no_split"] == 0
    digest = hashlib.sha256((tmp_path / "p_valid.tsv").read_bytes()).hexdigest()
    assert given.sha256["valid"] == digest
    assert given.counts["train_rows"] == 6
    assert given.counts["repeated_rows"] == 0


def test_validation_items_are_excluded_at_test_and_train_is_the_train_split(
    tmp_path: Path,
) -> None:
    events = events_frame()
    given = read_splits(write_splits(tmp_path / "p", PARTS), events)
    items = pd.DataFrame({"item_id": np.arange(10, 20)})
    users = pd.DataFrame({"user_id": [1, 2, 3]})
    val, test, as_of = given.tasks(users, items, PROTOCOL)
    assert as_of == events["ts"].max() + pd.Timedelta(seconds=1)
    assert val.train.cutoff == test.train.cutoff == as_of
    assert len(test.train.events) == len(val.train.events) == 6
    assert [r.tolist() for r in val.relevant] == [[12], [14], [14]]
    assert [r.tolist() for r in test.relevant] == [[13], [15], [16]]
    assert test.exclude is not None
    assert val.exclude is None
    assert [e.tolist() for e in test.exclude] == [[12], [14], [14]]
    retrieved = retrieve(
        test.train,
        test.user_ids,
        {"popularity": lambda: PopularityRetriever(half_life_days=None)},
        k=5,
        exclude=test.exclude,
    )
    lists = retrieved.lists.items["popularity"]
    for row, user in enumerate(test.user_ids):
        listed = set(lists[row][lists[row] != PAD_ITEM].tolist())
        hidden = set(test.exclude[row].tolist())
        train = given.events["train"]
        seen = set(train.loc[train["user_id"] == user, "item_id"])
        assert listed
        assert not listed & hidden
        assert not listed & seen


class FixedLists:
    """A retriever whose lists are given (``recommend`` is all the helper calls)."""

    def __init__(self, items: list[list[int]]) -> None:
        self.items = np.array(items, dtype=np.int64)

    def recommend(
        self, user_ids: object, k: int, *, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        items = self.items[:, :k]
        scores = np.where(items != PAD_ITEM, -np.arange(items.shape[1]), -np.inf)
        return items, scores.astype(np.float32)


def test_recommend_excluding_keeps_order_and_pads() -> None:
    retriever = FixedLists([[5, 6, 7, 8], [1, 2, PAD_ITEM, PAD_ITEM]])
    users = np.array([1, 2])
    items, scores = recommend_excluding(retriever, users, 3, [np.array([6]), np.array([1, 2])])  # type: ignore[arg-type]
    assert items.tolist() == [[5, 7, 8], [PAD_ITEM] * 3]
    assert scores[0].tolist() == [0.0, -2.0, -3.0]
    assert np.isneginf(scores[1]).all()
    wide, _ = recommend_excluding(retriever, users, 6, [np.array([], dtype=np.int64)] * 2)  # type: ignore[arg-type]
    assert wide.tolist() == [[5, 6, 7, 8, PAD_ITEM, PAD_ITEM], [1, 2] + [PAD_ITEM] * 4]


def test_split_files_need_all_three(tmp_path: Path) -> None:
    write_splits(tmp_path / "p", {"train": PARTS["train"], "test": PARTS["test"]})
    with pytest.raises(ValueError, match=r"no valid split \(p_valid.tsv, p_valid.csv"):
        split_files(tmp_path / "p")
    write_splits(tmp_path / "c", PARTS, sep=",")
    assert split_files(tmp_path / "c")["valid"].name == "c_valid.csv"


def test_a_row_without_an_event_is_refused_naming_file_and_row(tmp_path: Path) -> None:
    parts = {**PARTS, "test": [(1, 13), (2, 99), (3, 16)]}
    with pytest.raises(
        ValueError, match=r"p_test.tsv: data row 2 \(user 2, item 99\) matches no event"
    ):
        read_splits(write_splits(tmp_path / "p", parts), events_frame())


def test_a_pair_in_two_splits_is_refused(tmp_path: Path) -> None:
    parts = {**PARTS, "test": [(1, 13), (2, 14), (3, 16)]}
    with pytest.raises(
        ValueError, match=r"user 2, item 14 is in two splits: .*p_test.tsv data row 2"
    ):
        read_splits(write_splits(tmp_path / "p", parts), events_frame())


def test_bad_columns_and_ids_are_named(tmp_path: Path) -> None:
    write_splits(tmp_path / "p", PARTS)
    (tmp_path / "p_valid.tsv").write_text("uid\titem\n1\t12\n")
    with pytest.raises(ValueError, match=r"p_valid.tsv: no user_id column .* it has uid, item"):
        read_splits(tmp_path / "p", events_frame())
    (tmp_path / "p_valid.tsv").write_text("user\titem\n1\t12\n2\tabc\n")
    with pytest.raises(
        ValueError,
        match=r"p_valid.tsv: data row 2 \(after the header\), item_id 'abc' is not an integer",
    ):
        read_splits(tmp_path / "p", events_frame())


def test_infinite_huge_and_empty_inputs_are_named(tmp_path: Path) -> None:
    write_splits(tmp_path / "p", PARTS)
    for value in ("inf", "1e30"):
        (tmp_path / "p_test.tsv").write_text(f"user\titem\n1\t13\n{value}\t15\n")
        with pytest.raises(ValueError, match=rf"p_test.tsv: data row 2 .*user_id '{value}'"):
            read_splits(tmp_path / "p", events_frame())
    (tmp_path / "p_test.tsv").write_text("")
    with pytest.raises(ValueError, match=r"p_test.tsv: not a readable split file"):
        read_splits(tmp_path / "p", events_frame())


def test_parquet_splits_with_recboles_atomic_column_names(tmp_path: Path) -> None:
    for name, pairs in PARTS.items():
        frame = pd.DataFrame(pairs, columns=["user_id:token", "item_id:token"])
        frame.to_parquet(tmp_path / f"q_{name}.parquet")
    given = read_splits(tmp_path / "q", events_frame())
    assert given.events["valid"]["item_id"].tolist() == [12, 14, 14]


def test_repeated_rows_and_unlisted_events_are_counted(tmp_path: Path) -> None:
    parts = {**PARTS, "train": [*PARTS["train"][:-1], (1, 10)]}  # (3, 13) in no split
    given = read_splits(write_splits(tmp_path / "p", parts), events_frame())
    assert given.counts["repeated_rows"] == 1
    assert given.counts["events_in_no_split"] == 1
    assert given.counts["train_events"] == 5


def test_leave_last_out_takes_each_users_last_events_by_time() -> None:
    events = events_frame().iloc[::-1].reset_index(drop=True)  # not in time order
    short = pd.DataFrame(
        {"user_id": [4, 4], "item_id": [10, 11], "ts": events["ts"].iloc[:2].to_numpy()}
    ).assign(event_type="rating", value=4.0)
    given = leave_last_out(pd.concat([events, short], ignore_index=True))
    pairs = {
        name: sorted(zip(frame["user_id"], frame["item_id"], strict=True))
        for name, frame in given.events.items()
    }
    assert pairs["test"] == [(1, 13), (2, 15), (3, 16)]
    assert pairs["valid"] == [(1, 12), (2, 14), (3, 14)]
    assert (4, 10) in pairs["train"]  # two events: too few to leave any out
    assert len(pairs["train"]) == 6 + 2
    two = leave_last_out(events, n=2)  # 4 events a user, 5 needed to leave 2 + 2 out
    assert len(two.events["test"]) == len(two.events["valid"]) == 0
    assert len(two.events["train"]) == 12
    assert given.files == {}
    with pytest.raises(ValueError, match="n=0: must be >= 1"):
        leave_last_out(events, n=0)


def test_leave_last_out_breaks_ties_in_time_by_row_order() -> None:
    events = events_frame()
    events["ts"] = events["ts"].iloc[0]  # every event at the same second
    given = leave_last_out(events)
    assert sorted(given.events["test"]["item_id"]) == [13, 15, 16]


@pytest.fixture(scope="module")
def world_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    """A small world and an 8:1:1 split of its distinct (user, item) pairs, written as
    ``s_{train,valid,test}.tsv`` beside it."""
    tmp_path = tmp_path_factory.mktemp("splits")
    world = tmp_path / "world"
    config = WorldConfig(n_users=200, n_items=120, n_events=12_000, days=30, seed=3)
    synthesize(config, world, progress=False)
    events, _, _ = load_dataset(world)
    pairs = events.drop_duplicates(["user_id", "item_id"])[["user_id", "item_id"]]
    draw = np.random.default_rng(0).random(len(pairs))
    parts = {
        "train": pairs[draw < 0.8],
        "valid": pairs[(draw >= 0.8) & (draw < 0.9)],
        "test": pairs[draw >= 0.9],
    }
    for name, frame in parts.items():
        frame.to_csv(tmp_path / f"s_{name}.tsv", sep="\t", index=False)
    return world, parts


def evaluate_splits(world: Path, prefix: Path | None) -> OfflineReport:
    """Popularity and a logistic ranker on ``prefix``'s split files (``None``: leave-last-out)."""
    return evaluate_pipeline(
        world,
        {"popularity": lambda: PopularityRetriever(half_life_days=None)},
        {"logistic": LogisticRanker},
        protocol=PROTOCOL,
        pipeline=PipelineConfig(
            n_candidates=100, ranker="logistic", baselines=("popularity",), rerank_variants={}
        ),
        protocol_name="splits" if prefix is not None else "leave-last-out",
        splits=prefix,
    )


def test_the_splits_protocol_scores_popularity_as_counted_by_hand(
    world_splits: tuple[Path, dict[str, pd.DataFrame]],
) -> None:
    """The report's popularity baseline equals untimed counts of the train split ranked by
    hand, with each user's train and validation items left out."""
    world, parts = world_splits
    events, _, items = load_dataset(world)
    report = evaluate_splits(world, world.parent / "s")
    assert report.protocol_name == "splits"
    assert "fit on the train split alone" in report.protocol
    assert report.counts["n_train_events"] == int(events.merge(parts["train"]).shape[0])
    counts = events.merge(parts["train"])["item_id"].value_counts()  # events, not pairs
    order = counts.reindex(items["item_id"], fill_value=0).sort_values(
        ascending=False, kind="stable"
    )
    known = pd.concat([parts["train"], parts["valid"]]).groupby("user_id")["item_id"].apply(set)
    relevant = parts["test"].groupby("user_id")["item_id"].apply(list)
    lists = [
        [i for i in order.index if i not in known.get(user, set())][:10] for user in relevant.index
    ]
    expected = np.mean(ndcg_at_k_score(lists, list(relevant), k=10))
    popularity = report.method("popularity").metrics["all"]["ndcg@10"]
    assert popularity is not None
    assert popularity.mean == pytest.approx(expected, abs=1e-12)
    assert report.counts["n_test_users"] == len(relevant)


def test_leave_last_out_runs_as_given_splits_and_labels_itself(
    world_splits: tuple[Path, dict[str, pd.DataFrame]],
) -> None:
    world, _ = world_splits
    report = evaluate_splits(world, None)
    assert report.protocol_name == "leave-last-out"
    assert "Leave-last-one-out, ONLY for comparison" in report.protocol
    events, _, _ = load_dataset(world)
    given = leave_last_out(events)
    assert report.counts["n_train_events"] == len(given.events["train"])
    assert report.cut_points == {}
    assert report.counts["n_test_users"] <= events["user_id"].nunique()


def test_a_split_without_new_items_is_refused_naming_it(
    world_splits: tuple[Path, dict[str, pd.DataFrame]],
) -> None:
    world, parts = world_splits
    for name in ("train", "valid"):
        parts[name].to_csv(world.parent / f"e_{name}.tsv", sep="\t", index=False)
    (world.parent / "e_test.tsv").write_text("user_id\titem_id\n")
    with pytest.raises(ValueError, match=r"e_test.tsv: no user has an item there that is not"):
        evaluate_splits(world, world.parent / "e")


@pytest.mark.dataset
@pytest.mark.parametrize(
    ("split", "ndcg", "recall"), [("protoA", 0.3295, 0.2805), ("protoB", 0.1272, 0.1208)]
)
def test_ease_reproduces_recboles_ease_on_its_own_splits(
    split: str, ndcg: float, recall: float, tmp_path: Path, recbole_ml100k_dir: Path
) -> None:
    """RecBole's published EASE (reg_weight 250) on its exact ML-100K splits: the same model
    under this protocol gives the same NDCG@10 and Recall@10 to 4 decimals, which checks
    the exclusions, the catalog and the metrics against an independent implementation."""
    contract = tmp_path / "ml100k"
    import_movielens(
        "movielens-100k", source=dataset_path("movielens-100k"), out=contract, progress=False
    )
    events, users, items = load_dataset(contract)
    given = read_splits(recbole_ml100k_dir / split, events)
    assert given.counts["events_in_no_split"] == 0
    _, test, _ = given.tasks(users, items, PROTOCOL)
    retrieved = retrieve(
        test.train, test.user_ids, {"ease": lambda: EASERetriever(l2=250.0)}, k=10,
        exclude=test.exclude,
    )  # fmt: skip
    lists = retrieved.lists.items["ease"]
    assert np.mean(ndcg_at_k_score(lists, test.relevant, k=10)) == pytest.approx(ndcg, abs=5e-5)
    assert np.mean(recall_at_k_score(lists, test.relevant, k=10)) == pytest.approx(recall, abs=5e-5)
