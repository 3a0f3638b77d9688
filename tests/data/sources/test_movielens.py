"""MovieLens loaders: real 100K / latest-small, tiny 1M/20M/25M fixtures, download + checksum."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mlsd.data.schema import ContractError, read_info
from mlsd.data.sources.download import fetch, published_md5
from mlsd.data.sources.movielens import (
    DownloadError,
    age_bucket,
    download_movielens,
    import_movielens,
    read_movielens,
    zip_region,
)

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
"""The 19 genres of ML-100K's u.genre, in flag order."""


def read_table(out: Path, name: str, key: str) -> pd.DataFrame:
    return pd.read_parquet(out / f"{name}.parquet").set_index(key)


def zip_folder(folder: Path, archive: Path, top: str) -> Path:
    """Zip a folder's files under ``top/``, the layout of the official archives."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{top}/{path.name}")
    return archive


def write_fake_ml100k(folder: Path) -> Path:
    """Three ratings, three users (one Canadian postcode, one without ratings), two movies."""
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\t4\t888550871\n")
    (folder / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|T8H1N\n3|17|F|student|01002\n"
    )
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")

    def item(item_id: int, title: str, date: str, genres: set[str]) -> str:
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        return f"{item_id}|{title}|{date}||http://us.imdb.com/x|{flags}\n"

    text = item(1, "Toy Story (1995)", "01-Jan-1995", {"Animation", "Children's", "Comedy"})
    text += item(2, "Misérables, Les (1995)", "", {"Drama"})
    (folder / "u.item").write_bytes(text.encode("latin-1"))
    return folder


# --- the real datasets -----------------------------------------------------------------------


@pytest.mark.dataset
def test_ml100k_counts_and_attributes(ml100k_dir: Path, tmp_path: Path) -> None:
    report = import_movielens("movielens-100k", source=ml100k_dir, out=tmp_path, progress=False)
    assert report.info is not None
    assert (report.n_kept, report.n_quarantined) == (100_000, 0)
    assert (report.info.n_users, report.info.n_items) == (943, 1_682)
    users = read_table(tmp_path, "users", "user_id")
    attrs = ["age", "age_bucket", "gender", "occupation", "zip_code", "region"]
    assert users.loc[1, attrs].tolist() == ["24", "18-24", "M", "technician", "85711", "mountain"]
    assert users.loc[74, "region"] == "non-US"  # zip code T8H1N
    items = read_table(tmp_path, "items", "item_id")
    toy_story = items.loc[1]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["genres"] == "Animation|Children's|Comedy"
    assert toy_story["category"] == "Animation"
    assert toy_story["created_ts"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert pd.isna(items.loc[267, "created_ts"])  # "unknown", no release date
    events = pd.read_parquet(tmp_path / "events.parquet")
    row = events[(events.user_id == 196) & (events.item_id == 242)].iloc[0]
    assert (row["value"], row["event"]) == (3.0, "rate")
    assert row["ts"] == pd.Timestamp(881250949, unit="s", tz="UTC")


@pytest.mark.dataset
def test_latest_small_counts_and_genres(ml_latest_small_dir: Path, tmp_path: Path) -> None:
    report = import_movielens(
        "movielens-latest-small", source=ml_latest_small_dir, out=tmp_path, progress=False
    )
    assert report.info is not None
    assert (report.n_kept, report.n_quarantined) == (100_836, 0)
    assert (report.info.n_users, report.info.n_items) == (610, 9_742)
    items = read_table(tmp_path, "items", "item_id")
    assert items.loc[1, "genres"] == "Adventure|Animation|Children|Comedy|Fantasy"
    assert items.loc[1, "category"] == "Adventure"
    assert items.loc[1, "created_ts"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert pd.isna(items.loc[114335, "genres"])  # "(no genres listed)"
    assert list(pd.read_parquet(tmp_path / "users.parquet").columns) == ["user_id"]


@pytest.mark.dataset
def test_zip_source_equals_folder_source(ml100k_dir: Path, tmp_path: Path) -> None:
    archive = zip_folder(ml100k_dir, tmp_path / "ml-100k.zip", "ml-100k")
    from_dir = import_movielens("movielens-100k", source=ml100k_dir, out=tmp_path / "dir")
    from_zip = import_movielens("movielens-100k", source=archive, out=tmp_path / "zip")
    assert from_dir.info is not None
    assert from_zip.info is not None
    assert from_zip.info.content_hash == from_dir.info.content_hash
    for name in ("events", "users", "items"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "zip" / f"{name}.parquet"),
            pd.read_parquet(tmp_path / "dir" / f"{name}.parquet"),
        )


# --- tiny fixtures in the real formats -------------------------------------------------------


def test_ml100k_parser_on_fake_folder(tmp_path: Path) -> None:
    write_fake_ml100k(tmp_path / "ml-100k")
    tables = read_movielens("movielens-100k", tmp_path)  # the folder holding ml-100k/ works too
    assert tables.events[["user_id", "item_id", "value"]].values.tolist() == [
        [1, 1, 5],
        [1, 2, 3],
        [2, 1, 4],
    ]
    assert tables.users is not None
    assert tables.users["zip_code"].tolist() == ["85711", "T8H1N", "01002"]
    assert tables.users["region"].tolist() == ["mountain", "non-US", "northeast"]
    items = tables.items.set_index("item_id")
    assert items.loc[2, "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert items.loc[2, "category"] == "Drama"
    assert pd.isna(items.loc[2, "created_ts"])


def test_ml1m_parser(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    ratings = "1::1193::5::978300760\n2::1::3::978298413\n2::1::3::978298413\n"  # a duplicate
    (folder / "ratings.dat").write_text(ratings)
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::02139\n")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n1193::Misérables, Les::Drama\n"
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    report = import_movielens("movielens-1m", source=folder, out=tmp_path / "out")
    assert (report.n_kept, report.reasons) == (2, {"ratings.dat:duplicate": 1})
    users = read_table(tmp_path / "out", "users", "user_id")
    assert users.loc[1, ["age_bucket", "gender", "occupation"]].tolist() == [
        "Under 18",
        "F",
        "K-12 student",
    ]
    assert users.loc[2, ["age_bucket", "occupation", "zip_code", "region"]].tolist() == [
        "56+",
        "self-employed",
        "02139",
        "northeast",
    ]
    items = read_table(tmp_path / "out", "items", "item_id")
    assert items.loc[1, ["genres", "category"]].tolist() == [
        "Animation|Children's|Comedy",
        "Animation",
    ]
    assert items.loc[1, "created_ts"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert items.loc[1193, "title"] == "Misérables, Les"
    assert pd.isna(items.loc[1193, "created_ts"])  # no year in the title


def test_ml1m_codes_outside_the_documented_tables_are_kept_and_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown age or occupation code had become null, with nothing reported."""
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1::5::978300760\n2::1::3::978298413\n")
    (folder / "users.dat").write_text("1::F::30::25::48067\n2::M::56::99::02139\n")
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n")
    with caplog.at_level("WARNING", logger="mlsd.data.sources.movielens"):
        import_movielens("movielens-1m", source=folder, out=tmp_path / "out")
    users = read_table(tmp_path / "out", "users", "user_id")
    assert users.loc[1, ["age_bucket", "occupation"]].tolist() == ["30", "25"]
    assert users.loc[2, ["age_bucket", "occupation"]].tolist() == ["56+", "99"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "users.dat: 1 row(s) whose age code is not in the documented table (e.g. line 1: 30)"
        in messages
    )
    assert "users.dat: 2 row(s) whose occupation code" in messages


def test_a_non_numeric_ml100k_age_names_the_file_line_and_field(tmp_path: Path) -> None:
    folder = write_fake_ml100k(tmp_path / "ml-100k")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|fifty|F|other|T8H1N\n")
    with pytest.raises(ContractError, match=r"u\.user, line 2: age 'fifty' is not a number"):
        import_movielens("movielens-100k", source=folder, out=tmp_path / "out")


RATINGS_FILES = {
    "movielens-100k": ("ml-100k", "u.data", "\t", ""),
    "movielens-1m": ("ml-1m", "ratings.dat", "::", ""),
    "movielens-20m": ("ml-20m", "ratings.csv", ",", "userId,movieId,rating,timestamp\n"),
}
"""Each ratings format: the archive's folder, the file, its separator and its header."""


def write_ratings(folder: Path, variant: str, rows: list[str]) -> Path:
    """A variant's folder whose ratings file holds ``rows`` (fields joined by ``|``)."""
    top, name, sep, header = RATINGS_FILES[variant]
    if variant == "movielens-100k":
        folder = write_fake_ml100k(folder / top)
    else:
        folder = folder / top
        folder.mkdir(parents=True)
        (folder / "users.dat").write_text("1::F::25::1::48067\n")
        (folder / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n")
        (folder / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    (folder / name).write_text(header + "".join(row.replace("|", sep) + "\n" for row in rows))
    return folder


@pytest.mark.parametrize("variant", list(RATINGS_FILES))
@pytest.mark.parametrize(
    ("damaged", "problem"),
    [
        ("1|abc|3|881250949", "item_id 'abc' is not a number"),
        ("1|1|3", "ts is missing or empty"),
        ("1.5|1|3|881250949", "user_id '1.5' is not an integer"),
        ("1|1|good|881250949", "rating 'good' is not a number"),
        ("1|1|3|99999999999999999999", "ts '99999999999999999999' is beyond the 64-bit"),
    ],
)
def test_a_damaged_ratings_row_names_its_line_and_field(
    tmp_path: Path, variant: str, damaged: str, problem: str
) -> None:
    good = ["1|1|5|874965758", "2|1|4|888550871"]
    # The damaged row after a blank line: line numbers count every line of the file.
    folder = write_ratings(tmp_path, variant, [*good, "", *good, damaged, *good, damaged])
    _, name, _, header = RATINGS_FILES[variant]
    line = 7 if header else 6
    if variant == "movielens-20m":  # ratings.csv names its fields in its header
        for ours, theirs in (("user_id", "userId"), ("item_id", "movieId"), ("ts", "timestamp")):
            problem = problem.replace(ours, theirs)
    archive = zip_folder(folder, tmp_path / "archive.zip", folder.name)
    for source in (folder, archive):
        with pytest.raises(ContractError) as caught:
            read_movielens(variant, source)
        message = str(caught.value)
        assert f"{source}: {name}, line {line}: {problem}" in message, message
        assert "2 such row(s)" in message


def test_a_damaged_row_past_the_first_scan_chunk_gets_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mlsd.data.sources.movielens._SCAN_ROWS", 3)
    rows = [f"{u}|1|4|888550871" for u in range(1, 11)]
    rows[8] = "9|1|4|8885508x1"
    folder = write_ratings(tmp_path, "movielens-20m", [*rows[:4], "", *rows[4:]])
    with pytest.raises(ContractError, match=r"ratings\.csv, line 11: timestamp '8885508x1' is"):
        read_movielens("movielens-20m", folder)


def test_a_row_with_too_many_fields_keeps_the_parsers_line(tmp_path: Path) -> None:
    folder = write_ratings(tmp_path, "movielens-20m", ["1|1|5|874965758", "2|1|4|888550871|7"])
    with pytest.raises(ContractError, match=r"Expected 4 fields in line 3, saw 5\); re-download"):
        read_movielens("movielens-20m", folder)


@pytest.mark.parametrize(
    ("variant", "top"), [("movielens-20m", "ml-20m"), ("movielens-25m", "ml-25m")]
)
def test_movies_csv_variants_from_zip(tmp_path: Path, variant: str, top: str) -> None:
    folder = tmp_path / top
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,11,4.5,1147880044\n2,11,0.5,1147868817\n"
        "2,131262,3.0,1147868828\n"
    )
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "131262,Innocence (2014),(no genres listed)\n"
    )
    archive = zip_folder(folder, tmp_path / f"{top}.zip", top)
    report = import_movielens(variant, source=archive, out=tmp_path / "out")
    assert report.info is not None
    assert (report.n_kept, report.info.n_users, report.info.n_items) == (3, 2, 2)
    items = read_table(tmp_path / "out", "items", "item_id")
    assert items.loc[11, ["title", "category"]].tolist() == [
        "American President, The (1995)",
        "Comedy",
    ]
    assert pd.isna(items.loc[131262, "category"])
    events = pd.read_parquet(tmp_path / "out" / "events.parquet")
    assert sorted(events["value"].tolist()) == [0.5, 3.0, 4.5]


def test_age_buckets_and_regions() -> None:
    ages = pd.Series([7, 17, 18, 24, 25, 44, 45, 49, 50, 55, 56, 73])
    assert age_bucket(ages).tolist() == [
        "Under 18", "Under 18", "18-24", "18-24", "25-34", "35-44",
        "45-49", "45-49", "50-55", "50-55", "56+", "56+",
    ]  # fmt: skip
    zips = pd.Series(["01002", "98101", "V3N4P", None])
    assert zip_region(zips).tolist() == ["northeast", "pacific", "non-US", pd.NA]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="movielens-100k"):
        import_movielens("movielens-7m", source=tmp_path, out=tmp_path / "out")
    with pytest.raises(ContractError, match="no source given"):
        import_movielens("movielens-100k", source=None, out=tmp_path / "out")
    folder = write_fake_ml100k(tmp_path / "ml-100k")
    (folder / "u.user").unlink()
    with pytest.raises(ContractError, match=r"no u\.user inside"):
        import_movielens("movielens-100k", source=folder, out=tmp_path / "out")
    folder = write_fake_ml100k(tmp_path / "damaged" / "ml-100k")
    (folder / "u.data").write_text("1\t1\t5\t874965758\nnot\ta\trating\trow\n")
    with pytest.raises(ContractError, match=r"u\.data, line 2: user_id 'not' is not a number"):
        read_movielens("movielens-100k", folder)
    not_a_zip = write_fake_ml100k(tmp_path / "other") / "u.data"
    with pytest.raises(ContractError, match="not in the MovieLens"):
        read_movielens("movielens-100k", not_a_zip)


# --- download against a local HTTP server ----------------------------------------------------


class FileServer:
    """Serves ``root`` on a free loopback port and records the requested paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                server.requests.append(self.path)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/datasets"

    def publish(self, archive: Path, md5: str | None = None) -> None:
        """Put a zip and its GroupLens-style ``.md5`` file under ``/datasets``."""
        target = self.root / "datasets" / archive.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(archive.read_bytes())
        digest = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
        (target.parent / f"{archive.name}.md5").write_text(f"MD5 ({archive.name}) = {digest}\n")


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    server = FileServer(tmp_path / "www")
    server.root.mkdir()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    thread.join()


@pytest.fixture
def fake_zip(tmp_path: Path) -> Path:
    folder = write_fake_ml100k(tmp_path / "fake" / "ml-100k")
    return zip_folder(folder, tmp_path / "fake" / "ml-100k.zip", "ml-100k")


@pytest.mark.integration
def test_download_verifies_then_reuses_the_cache(
    file_server: FileServer, fake_zip: Path, tmp_path: Path
) -> None:
    file_server.publish(fake_zip)
    cache = tmp_path / "cache"
    path = download_movielens("movielens-100k", cache, base_url=file_server.url, progress=False)
    assert path == cache / "ml-100k.zip"
    assert path.read_bytes() == fake_zip.read_bytes()
    assert sorted(file_server.requests) == ["/datasets/ml-100k.zip", "/datasets/ml-100k.zip.md5"]
    download_movielens("movielens-100k", cache, base_url=file_server.url, progress=False)
    assert len(file_server.requests) == 2  # the verified zip was reused
    path.write_bytes(b"corrupted")
    download_movielens("movielens-100k", cache, base_url=file_server.url, progress=False)
    assert len(file_server.requests) == 4  # a damaged cache is fetched again
    assert path.read_bytes() == fake_zip.read_bytes()


@pytest.mark.integration
def test_download_checksum_mismatch_is_reported_and_deleted(
    file_server: FileServer, fake_zip: Path, tmp_path: Path
) -> None:
    file_server.publish(fake_zip, md5="0" * 32)
    actual = hashlib.md5(fake_zip.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as error:
        download_movielens("movielens-100k", cache, base_url=file_server.url, progress=False)
    message = str(error.value)
    assert f"{file_server.url}/ml-100k.zip" in message
    assert f"expected MD5 {'0' * 32}" in message
    assert f"got {actual}" in message
    assert list(cache.iterdir()) == []


@pytest.mark.integration
def test_download_of_a_missing_file_names_the_url(file_server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"ml-1m\.zip\.md5"):
        download_movielens("movielens-1m", tmp_path, base_url=file_server.url, progress=False)


class _CutChunked(BaseHTTPRequestHandler):
    """Answers a chunked body cut off mid-chunk, as a dropped connection leaves it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        part = b"x" * 100_000
        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.wfile.write(f"{len(part):x}\r\n".encode() + part[:1000])
        self.wfile.flush()
        self.close_connection = True


def test_a_connection_cut_mid_body_is_a_download_error_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    """``http.client.IncompleteRead`` is no ``OSError``: it escaped as an internal error."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CutChunked)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/ml-100k.zip"
        with pytest.raises(DownloadError, match=r"download failed \(IncompleteRead"):
            fetch(url, tmp_path / "ml-100k.zip.part", progress=False)
        with pytest.raises(DownloadError, match="could not fetch the published checksum"):
            published_md5(url + ".md5")
        with pytest.raises(DownloadError, match="download failed"):
            fetch("htp:/nowhere", tmp_path / "x.part", progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_import_downloads_when_no_source_is_given(
    file_server: FileServer, fake_zip: Path, tmp_path: Path
) -> None:
    file_server.publish(fake_zip)
    report = import_movielens(
        "movielens-100k",
        source=None,
        out=tmp_path / "out",
        download=True,
        cache_dir=tmp_path / "cache",
        base_url=file_server.url,
        progress=False,
    )
    assert (report.n_kept, report.n_quarantined) == (3, 0)
    info = read_info(tmp_path / "out")
    assert (info.n_users, info.n_items) == (3, 2)
    assert "GroupLens" in info.licence
