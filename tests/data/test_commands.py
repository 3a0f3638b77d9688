"""``mlsd data ...`` commands on the real public datasets, as the issue's acceptance states them."""

from __future__ import annotations

from pathlib import Path

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
