"""MovieLens (GroupLens) → the dataset contract: 100K, latest-small, 1M, 20M and 25M.

``source`` is the unpacked folder or the official zip, read in place (nothing is extracted).
Every rating becomes one event ``rate`` with ``value`` = the rating (0.5-5 stars).

Attributes written:

- users (100K and 1M only; the other variants carry no demographics, so users are derived from
  the events): ``age_bucket`` (the ML-1M buckets ``Under 18``, ``18-24``, ... ``56+``; ML-100K ages
  are bucketed the same way and also kept raw as ``age``), ``gender``, ``occupation`` (ML-1M codes
  mapped to their names), ``zip_code`` (as given) and ``region``: the USPS national area of the
  zip code's first digit (``0`` → ``northeast`` ... ``9`` → ``pacific``, see ``ZIP_AREAS``),
  ``non-US`` when the code does not start with a digit (ML-100K has a few Canadian postcodes).
- items: ``title``, ``genres`` (``|``-joined, in the source's order), ``category`` (the first
  genre), ``created_ts``. ML-100K has a release date; for the other variants ``created_ts`` is
  1 January of the year in the title (the convention most ML-100K release dates follow, e.g.
  ``01-Jan-1995``), null when the title has no year. ``(no genres listed)`` becomes null
  ``genres`` and ``category``. ML-100K also keeps ``imdb_url``.
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from mlsd.data.schema import ContractError, DatasetInfo
from mlsd.data.sources.download import DownloadError as DownloadError  # re-exported
from mlsd.data.sources.download import download_verified
from mlsd.data.validate import ValidationReport, write_dataset

logger = logging.getLogger(__name__)

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
LICENCE = "GroupLens research use; do not redistribute (see README in the source)"
RATE_EVENT = "rate"

AGE_BUCKETS = {
    1: "Under 18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-49",
    50: "50-55",
    56: "56+",
}
"""ML-1M age codes (the lower bound of each bucket) → bucket names; ML-100K ages use the same."""

ML1M_OCCUPATIONS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer",
)  # fmt: skip
"""ML-1M occupation codes 0-20, in code order (from the ML-1M README)."""

ZIP_AREAS = {
    "0": "northeast",  # CT MA ME NH NJ RI VT, PR
    "1": "mid-atlantic",  # DE NY PA
    "2": "south-atlantic",  # DC MD NC SC VA WV
    "3": "southeast",  # AL FL GA MS TN
    "4": "great-lakes",  # IN KY MI OH
    "5": "upper-midwest",  # IA MN MT ND SD WI
    "6": "central",  # IL KS MO NE
    "7": "south-central",  # AR LA OK TX
    "8": "mountain",  # AZ CO ID NM NV UT WY
    "9": "pacific",  # AK CA HI OR WA
}
"""USPS national areas by the first digit of a US zip code."""

NO_GENRES = "(no genres listed)"

RATING_DTYPES = {"user_id": "int64", "item_id": "int64", "rating": "float32", "ts": "int64"}
"""Ratings are read typed (a malformed row is an error, not a quarantined row): the official
files are checksummed, so a row that does not parse means a damaged or wrong file, and typed
columns keep 25M ratings in ~600 MB instead of several GB of strings. When the typed read fails,
the file is read again as text, in chunks of ``_SCAN_ROWS`` rows, to name the first bad line."""

_SCAN_ROWS = 1_000_000


@dataclass(frozen=True)
class MovieLensTables:
    """One variant parsed into contract-shaped frames, before validation."""

    events: pd.DataFrame
    users: pd.DataFrame | None
    items: pd.DataFrame
    input_files: dict[str, str]


class MovieLensFiles:
    """Opens a variant's files by name from its unpacked folder or its official zip.

    A folder may hold the files directly or the archive's top folder (``ml-100k/u.data``).
    """

    def __init__(self, source: Path, folder: str) -> None:
        self.source = Path(source)
        self.folder = folder
        if not self.source.exists():
            raise ContractError(f"{self.source}: not found; pass the unpacked folder or the zip.")

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        """Open one file of the variant (e.g. ``u.data``); a parse error names the file."""
        try:
            with self._open(name) as fh:
                yield fh
        except ContractError:
            raise
        # pandas' ParserError is a ValueError; an integer beyond int64 is an OverflowError.
        except (ValueError, OverflowError, zipfile.BadZipFile) as exc:
            detail = str(exc).strip()  # pandas' tokenizer errors end in a newline
            raise ContractError(
                f"{self.source}: {name} is not in the MovieLens {self.folder} format ({detail}); "
                "re-download it or check the variant."
            ) from exc

    @contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        if self.source.is_dir():
            for path in (self.source / name, self.source / self.folder / name):
                if path.is_file():
                    with path.open("rb") as fh:
                        yield fh
                    return
            raise self._missing(name)
        with zipfile.ZipFile(self.source) as archive:
            members = [m for m in archive.namelist() if m == name or m.endswith("/" + name)]
            if not members:
                raise self._missing(name)
            with archive.open(min(members, key=len)) as fh:
                yield fh

    def _missing(self, name: str) -> ContractError:
        return ContractError(
            f"{self.source}: no {name} inside (looked for {name} and {self.folder}/{name}); "
            f"pass the unpacked {self.folder} folder or the official {self.folder}.zip."
        )


@dataclass(frozen=True)
class MovieLensVariant:
    """One published MovieLens dataset: its archive name and its parser."""

    name: str
    archive: str
    reader: Callable[[MovieLensFiles], MovieLensTables]

    @property
    def folder(self) -> str:
        """The archive's top folder, e.g. ``ml-100k``."""
        return self.archive.removesuffix(".zip")


def _read_table(fh: IO[bytes], sep: str, names: list[str], **kwargs: object) -> pd.DataFrame:
    """Read a header-less MovieLens file; quoting is off because titles hold bare quotes."""
    return pd.read_csv(fh, sep=sep, header=None, names=names, quoting=csv.QUOTE_NONE, **kwargs)


def _ratings(frame: pd.DataFrame) -> pd.DataFrame:
    """``user_id, item_id, rating, ts`` → contract events, file order kept."""
    # One category instead of a string per row: 25M rows of "rate" would cost ~2 GB as objects.
    event = pd.Categorical.from_codes(np.zeros(len(frame), dtype=np.int8), [RATE_EVENT])
    return pd.DataFrame(
        {
            "user_id": frame["user_id"],
            "item_id": frame["item_id"],
            "ts": frame["ts"],
            "event": event,
            "value": frame["rating"],
        }
    )


def age_bucket(age: pd.Series) -> pd.Series:
    """Ages in years → the ML-1M bucket names (``Under 18`` ... ``56+``)."""
    bounds = sorted(AGE_BUCKETS)
    edges = [-float("inf"), *bounds[1:], float("inf")]
    cut = pd.cut(age, bins=edges, right=False, labels=[AGE_BUCKETS[b] for b in bounds])
    return cut.astype("string")


def _numbers(
    raw: pd.DataFrame, file: str, *, integers: Collection[str] = (), first_line: int = 1
) -> pd.DataFrame:
    """The columns of ``raw`` (strings as read) as numbers; a ContractError names the first line
    holding a field that is not one, and the field.

    ``raw``'s index is each row's line less ``first_line`` (the default index of a file read
    without skipping lines; ``first_line`` is 2 after a header). The columns in ``integers`` must
    hold an integer in the int64 range; the others may be empty.
    """
    numbers = raw.apply(partial(pd.to_numeric, errors="coerce"))
    bad = numbers.isna() & raw.notna()
    for column in integers:
        n = numbers[column]
        bad[column] = n.isna() | (n % 1 != 0) | (n.abs() > 2.0**63)
    rows = bad.any(axis=1).to_numpy()
    if not rows.any():
        return numbers
    row = int(np.argmax(rows))
    field = str(bad.columns[int(np.argmax(bad.iloc[row].to_numpy()))])
    value, number = raw[field].iloc[row], numbers[field].iloc[row]
    if pd.isna(value):
        problem = f"{field} is missing or empty"
    elif pd.isna(number):
        problem = f"{field} {value!r} is not a number"
    elif number % 1 != 0:
        problem = f"{field} {value!r} is not an integer"
    else:
        problem = f"{field} {value!r} is beyond the 64-bit integer range"
    lines = f"lines {first_line + int(raw.index[0])}-{first_line + int(raw.index[-1])}"
    raise ContractError(
        f"{file}, line {first_line + int(raw.index[row])}: {problem} ({int(rows.sum())} such "
        f"row(s) in {lines}); the file is damaged: take it from the archive again"
    )


def _read_ratings(
    files: MovieLensFiles,
    name: str,
    read: Callable[..., Any],
    columns: list[str],
    *,
    first_line: int = 1,
) -> pd.DataFrame:
    """Read a ratings file typed as :data:`RATING_DTYPES` with ``read(fh, **kwargs)``, whose
    ``columns`` are in that order; when it does not parse, a ContractError names the first
    damaged line and field (not only the file, which may hold 25M lines)."""
    integers = [
        c for c, dtype in zip(columns, RATING_DTYPES.values(), strict=True) if "int" in dtype
    ]
    try:
        with files.open(name) as fh:
            ratings: pd.DataFrame = read(
                fh, dtype=dict(zip(columns, RATING_DTYPES.values(), strict=True))
            )
            return ratings
    except ContractError:
        # Read as text again (blank lines kept, so the index counts lines) to find the line.
        with (
            files.open(name) as fh,
            read(fh, dtype=str, chunksize=_SCAN_ROWS, skip_blank_lines=False) as chunks,
        ):
            label = f"{files.source}: {name}"
            for chunk in chunks:
                chunk = chunk.dropna(how="all")  # blank lines, which the typed read skips
                if len(chunk):
                    _numbers(chunk, label, integers=integers, first_line=first_line)
        raise  # no field is wrong as a number: the typed read's own error says what is


def _decoded(codes: pd.Series, names: Mapping[int, str], file: str, field: str) -> pd.Series:
    """Numeric ``codes`` → their ``names``; a code the table lacks keeps its number as text
    (nothing is dropped) and a warning names the file, the field and how many rows."""
    decoded = codes.map(names).astype("string")
    unknown = decoded.isna() & codes.notna()
    if unknown.any():
        first = int(np.argmax(unknown.to_numpy()))
        logger.warning(
            "%s: %d row(s) whose %s code is not in the documented table (e.g. line %d: %s); "
            "kept as the number",
            file, int(unknown.sum()), field, first + 1, codes.iloc[first],
        )  # fmt: skip
        decoded = decoded.fillna(codes.astype("string"))
    return decoded


def zip_region(zip_code: pd.Series) -> pd.Series:
    """Zip codes → USPS national area names (``ZIP_AREAS``), ``non-US`` when not a digit."""
    first = zip_code.astype("string").str.strip().str[0]
    region = first.map(ZIP_AREAS).astype("string")
    return region.where(first.isna() | first.str.isdigit(), "non-US")


def year_from_title(title: pd.Series) -> pd.Series:
    """``Toy Story (1995)`` → 1995-01-01 UTC; null without a trailing ``(year)``."""
    year = title.str.extract(r"\((\d{4})\)\s*$", expand=False)
    return _utc_us(pd.to_datetime(year, format="%Y", utc=True, errors="coerce"))


def _utc_us(ts: pd.Series) -> pd.Series:
    """Microsecond UTC timestamps, the contract's resolution."""
    return ts.astype("datetime64[us, UTC]")


def _split_genres(genres: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``A|B`` genre strings → (genres, category = first genre), nulls for no genres."""
    genres = genres.astype("string").replace(NO_GENRES, pd.NA)
    return genres, genres.str.split("|").str[0]


def read_ml100k(files: MovieLensFiles) -> MovieLensTables:
    """Parse ML-100K: ``u.data`` (tab), ``u.user``, ``u.item`` and ``u.genre`` (``|``, latin-1)."""
    ratings = _read_ratings(
        files,
        "u.data",
        partial(_read_table, sep="\t", names=list(RATING_DTYPES)),
        list(RATING_DTYPES),
    )
    with files.open("u.user") as fh:
        columns = ["user_id", "age", "gender", "occupation", "zip_code"]
        users = _read_table(
            fh, "|", columns, dtype={"zip_code": str, "occupation": str, "age": str}
        )
    users.insert(1, "age_bucket", age_bucket(_numbers(users[["age"]], "u.user")["age"]))
    for column in ("age", "gender", "occupation", "zip_code"):
        users[column] = users[column].astype("string")
    users["region"] = zip_region(users["zip_code"])
    return MovieLensTables(
        events=_ratings(ratings),
        users=users,
        items=_ml100k_items(files),
        input_files={"events": "u.data", "users": "u.user", "items": "u.item"},
    )


def _ml100k_items(files: MovieLensFiles) -> pd.DataFrame:
    with files.open("u.genre") as fh:
        genre_table = _read_table(fh, "|", ["name", "index"], encoding="latin-1").dropna()
    genre_names = genre_table.sort_values("index")["name"].tolist()
    columns = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *genre_names]
    with files.open("u.item") as fh:
        raw = _read_table(fh, "|", columns, encoding="latin-1", dtype={"title": str})
    flags = raw[genre_names].to_numpy() == 1
    joined = ["|".join(g for g, on in zip(genre_names, row, strict=True) if on) for row in flags]
    genres, category = _split_genres(pd.Series(joined, dtype="string").replace("", pd.NA))
    return pd.DataFrame(
        {
            "item_id": raw["item_id"],
            "title": raw["title"].astype("string"),
            "genres": genres,
            "category": category,
            "created_ts": _utc_us(
                pd.to_datetime(raw["release_date"], format="%d-%b-%Y", utc=True, errors="coerce")
            ),
            "imdb_url": raw["imdb_url"].astype("string"),
        }
    )


def _read_double_colon(fh: IO[bytes], names: list[str], **kwargs: object) -> pd.DataFrame:
    """Read an ML-1M ``::``-separated file; ``::`` → tab lets pandas' fast C parser read it."""
    text = fh.read().replace(b"::", b"\t")
    return _read_table(io.BytesIO(text), "\t", names, encoding="latin-1", **kwargs)


def read_ml1m(files: MovieLensFiles) -> MovieLensTables:
    """Parse ML-1M: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1)."""
    names = list(RATING_DTYPES)
    ratings = _read_ratings(files, "ratings.dat", partial(_read_double_colon, names=names), names)
    with files.open("users.dat") as fh:
        columns = ["user_id", "gender", "age", "occupation", "zip_code"]
        raw = _read_double_colon(fh, columns, dtype={"zip_code": str, "gender": str})
    users = pd.DataFrame(
        {
            "user_id": raw["user_id"],
            "age_bucket": _decoded(raw["age"], AGE_BUCKETS, "users.dat", "age"),
            "gender": raw["gender"].astype("string"),
            "occupation": _decoded(
                raw["occupation"], dict(enumerate(ML1M_OCCUPATIONS)), "users.dat", "occupation"
            ),
            "zip_code": raw["zip_code"].astype("string"),
            "region": zip_region(raw["zip_code"]),
        }
    )
    with files.open("movies.dat") as fh:
        movies = _read_double_colon(fh, ["item_id", "title", "genres"], dtype={"title": str})
    return MovieLensTables(
        events=_ratings(ratings),
        users=users,
        items=_movies(movies),
        input_files={"events": "ratings.dat", "users": "users.dat", "items": "movies.dat"},
    )


def _movies(movies: pd.DataFrame) -> pd.DataFrame:
    """``item_id, title, genres`` (``|``-joined) → contract items."""
    genres, category = _split_genres(movies["genres"])
    return pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "title": movies["title"].astype("string"),
            "genres": genres,
            "category": category,
            "created_ts": year_from_title(movies["title"].astype("string")),
        }
    )


def read_movies_csv(files: MovieLensFiles) -> MovieLensTables:
    """Parse latest-small, 20M or 25M: ``ratings.csv`` and ``movies.csv`` (UTF-8, header)."""
    names = {"userId": "user_id", "movieId": "item_id", "rating": "rating", "timestamp": "ts"}
    ratings = _read_ratings(files, "ratings.csv", pd.read_csv, list(names), first_line=2)
    ratings = ratings.rename(columns=names)
    with files.open("movies.csv") as fh:
        movies = pd.read_csv(fh, dtype={"movieId": "int64", "title": str, "genres": str})
    movies = movies.rename(columns={"movieId": "item_id"})
    return MovieLensTables(
        events=_ratings(ratings),
        users=None,
        items=_movies(movies),
        input_files={"events": "ratings.csv", "items": "movies.csv"},
    )


VARIANTS: dict[str, MovieLensVariant] = {
    "movielens-100k": MovieLensVariant("movielens-100k", "ml-100k.zip", read_ml100k),
    "movielens-latest-small": MovieLensVariant(
        "movielens-latest-small", "ml-latest-small.zip", read_movies_csv
    ),
    "movielens-1m": MovieLensVariant("movielens-1m", "ml-1m.zip", read_ml1m),
    "movielens-20m": MovieLensVariant("movielens-20m", "ml-20m.zip", read_movies_csv),
    "movielens-25m": MovieLensVariant("movielens-25m", "ml-25m.zip", read_movies_csv),
}


def get_variant(variant: str) -> MovieLensVariant:
    """Look up a variant by name, with the known names in the error."""
    if variant not in VARIANTS:
        raise ContractError(
            f"unknown MovieLens variant {variant!r}; choose one of {list(VARIANTS)}."
        )
    return VARIANTS[variant]


def read_movielens(variant: str, source: Path) -> MovieLensTables:
    """Parse one variant from its unpacked folder or official zip, without validating it."""
    spec = get_variant(variant)
    return spec.reader(MovieLensFiles(source, spec.folder))


def import_movielens(
    variant: str,
    *,
    source: Path | None,
    out: Path,
    download: bool = False,
    cache_dir: Path | None = None,
    base_url: str = GROUPLENS_BASE_URL,
    progress: bool = True,
) -> ValidationReport:
    """Import a MovieLens variant into the contract directory ``out``.

    Args:
        variant: a key of ``VARIANTS``, e.g. ``movielens-100k``.
        source: the unpacked folder or the official zip; None with ``download=True`` fetches it.
        out: the contract directory to write.
        download: fetch the official zip into ``cache_dir`` (verified against its MD5).
        cache_dir: where downloads are kept; defaults to ``~/.cache/mlsd/movielens``.
    """
    spec = get_variant(variant)
    if source is None:
        if not download:
            raise ContractError(
                f"{variant}: no source given; pass the unpacked folder or {spec.archive}, "
                "or allow the download from GroupLens."
            )
        cache = cache_dir or Path.home() / ".cache" / "mlsd" / "movielens"
        source = download_movielens(variant, cache, base_url=base_url, progress=progress)
    tables = read_movielens(variant, source)
    info = DatasetInfo(name=variant, source=f"{base_url}/{spec.archive}", licence=LICENCE)
    return write_dataset(
        out,
        events=tables.events,
        users=tables.users,
        items=tables.items,
        info=info,
        ts_format="unix",
        input_files=tables.input_files,
    )


def download_movielens(
    variant: str,
    dest_dir: Path,
    *,
    base_url: str = GROUPLENS_BASE_URL,
    progress: bool = True,
) -> Path:
    """Download a variant's official zip into ``dest_dir``, verified against the published MD5.

    A zip already in ``dest_dir`` that matches the MD5 saved beside it is reused without network.

    Returns:
        The path of the verified zip.

    Raises:
        DownloadError: the download failed, or the checksum does not match (the file is deleted).
    """
    spec = get_variant(variant)
    url = f"{base_url.rstrip('/')}/{spec.archive}"
    return download_verified(url, Path(dest_dir) / spec.archive, progress=progress)
