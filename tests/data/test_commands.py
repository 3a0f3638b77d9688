"""``mlsd data ...`` commands on the real public datasets, as the issue's acceptance states them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mlsd.cli import run
from mlsd.data.schema import read_info

pytestmark = pytest.mark.dataset


def test_import_movielens_100k_command(ml100k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml100k"
    assert (
        run(["data", "import", "movielens-100k", "--source", str(ml100k_dir), "--out", str(out)])
        == 0
    )
    info = read_info(out)
    assert (info.n_events, info.n_users, info.n_items) == (100_000, 943, 1_682)
    users = pq.read_table(out / "users.parquet").to_pandas()
    items = pq.read_table(out / "items.parquet").to_pandas()
    assert {"age_bucket", "gender", "occupation", "region"} <= set(users.columns)
    assert {"title", "genres", "category"} <= set(items.columns)
    assert users["occupation"].notna().all()


def test_import_movielens_latest_small_command(ml_latest_small_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    args = ["data", "import", "movielens-latest-small", "--source", str(ml_latest_small_dir)]
    assert run([*args, "--out", str(out)]) == 0
    assert read_info(out).n_events == 100_836


def test_import_csv_command_on_both_movielens_sets(
    ml100k_dir: Path, ml_latest_small_dir: Path, tmp_path: Path
) -> None:
    out_100k = tmp_path / "csv100k"
    code = run(
        ["data", "import", "csv", "--events", str(ml100k_dir / "u.data"), "--sep", "\\t",
         "--no-header", "--user-col", "0", "--item-col", "1", "--value-col", "2",
         "--ts-col", "3", "--out", str(out_100k)]
    )  # fmt: skip
    assert code == 0
    assert (read_info(out_100k).n_events, read_info(out_100k).n_users) == (100_000, 943)

    out_small = tmp_path / "csvsmall"
    code = run(
        ["data", "import", "csv", "--events", str(ml_latest_small_dir / "ratings.csv"),
         "--user-col", "userId", "--item-col", "movieId", "--value-col", "rating",
         "--ts-col", "timestamp", "--items", str(ml_latest_small_dir / "movies.csv"),
         "--out", str(out_small)]
    )  # fmt: skip
    assert code == 0
    info = read_info(out_small)
    assert (info.n_events, info.n_users, info.n_items) == (100_836, 610, 9_742)
    assert info.quarantined == {}


def test_import_without_source_or_download_is_a_usage_error(tmp_path: Path) -> None:
    assert run(["data", "import", "movielens-100k", "--out", str(tmp_path / "x")]) != 0


def test_split_command_reproduces_the_design_figures(ml100k_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ml100k"
    assert (
        run(["data", "import", "movielens-100k", "--source", str(ml100k_dir), "--out", str(out)])
        == 0
    )
    assert run(["data", "split", str(out), "--val-frac", "0.1", "--test-frac", "0.2"]) == 0
    manifest = json.loads((out / "split" / "split.json").read_text())
    test = manifest["windows"]["test"]
    assert (test["n_users"], test["n_warm_users"]) == (301, 109)
    assert manifest["dataset"]["content_hash"] == read_info(out).content_hash
    # The dev copy: ML-100K before that test window, 79,999 of its 100,000 events.
    dev = tmp_path / "ml100k-dev"
    assert run(["data", "dev-copy", str(out), "--out", str(dev)]) == 0
    info = read_info(dev)
    assert (info.name, info.n_events) == ("movielens-100k-dev", 79_999)
    assert info.extra["dev_copy"]["before"] == manifest["t2"]


def _feature_tables(tmp_path: Path, *, leaky: bool) -> tuple[Path, Path]:
    label_ts = pd.to_datetime(["2024-01-02", "2024-01-03", "2024-01-04"], utc=True)
    labels = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "label_ts": label_ts})
    asof = label_ts - pd.Timedelta(hours=1)
    features = labels.assign(
        n_views=[3, 4, 1],
        n_views__asof=asof,
        mean_rating=[4.0, 3.5, 2.0],
        mean_rating__asof=label_ts if leaky else asof,  # computed *including* the label's event
    )
    features_path, labels_path = tmp_path / "features.parquet", tmp_path / "labels.parquet"
    features.to_parquet(features_path)
    labels.to_parquet(labels_path)
    return features_path, labels_path


def test_check_leakage_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features, labels = _feature_tables(tmp_path, leaky=False)
    assert run(["data", "check-leakage", "--features", str(features), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "checked 3 feature rows matched to a label" in out
    assert "0 feature rows without a label and 0 labels without features" in out
    assert "no leakage: 3 feature rows" in out

    features, labels = _feature_tables(tmp_path, leaky=True)
    assert run(["data", "check-leakage", "--features", str(features), "--labels", str(labels)]) == 1
    out = capsys.readouterr().out
    assert "mean_rating" in out
    assert "n_views" not in out.split("columns:")[1].split("\n")[0]
    assert "example row" in out


def test_check_leakage_command_fails_when_feature_rows_match_no_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same wall-clock label time, once with a zone and once naive (read as UTC): no match.
    features = tmp_path / "features.csv"
    features.write_text(
        "user_id,item_id,label_ts,n_views,feature_ts\n"
        "1,5,2024-01-01T12:00:00+02:00,3,2024-01-01T09:00:00+02:00\n"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("user_id,item_id,label_ts\n1,5,2024-01-01T12:00:00\n")
    assert run(["data", "check-leakage", "--features", str(features), "--labels", str(labels)]) == 1
    out = capsys.readouterr().out
    assert "checked 0 feature rows" in out
    assert "all 1 feature rows" in out
    assert "time zone" in out
    assert "no leakage" not in out

    # One of two feature rows unmatched: the matched one is clean, the command still fails.
    features.write_text(
        "user_id,item_id,label_ts,n_views,feature_ts\n"
        "1,5,2024-01-01T12:00:00Z,3,2024-01-01T09:00:00Z\n"
        "2,5,2024-01-01T12:00:00Z,3,2024-01-01T09:00:00Z\n"
    )
    assert run(["data", "check-leakage", "--features", str(features), "--labels", str(labels)]) == 1
    out = capsys.readouterr().out
    assert "checked 1 feature rows" in out
    assert "1 of 2 feature rows" in out
    assert "no leakage" not in out


@pytest.mark.parametrize("command", [["validate"], ["split"], ["dev-copy", "--out", "dev"]])
def test_a_csv_file_given_for_a_dataset_directory_points_at_import_csv(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("clicks.csv").write_text("user,item,ts\n1,2,3\n")
    assert run(["data", command[0], "clicks.csv", *command[1:]]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert f"clicks.csv is a file, but `mlsd data {command[0]}` takes a dataset directory" in said
    assert "mlsd data import csv --events clicks.csv" in said
    assert "Errno" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clicks.csv"]
