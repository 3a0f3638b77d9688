"""Given splits: evaluate on another library's exact train / validation / test files (or on
leave-last-one-out, :func:`leave_last_out`, whose split is made here).

A peer library's published numbers can be set beside mlsd's only on the same split of the same
data. This protocol reads a peer's three split files (``PREFIX_train.tsv``, ``PREFIX_valid.tsv``
and ``PREFIX_test.tsv``; ``.csv`` or ``.parquet`` too), each a list of (user, item) pairs, and
evaluates the way RecBole evaluates general recommendation:

- every source and ranker is fit on the train split only; the ranker learns from candidates for
  the validation split's users, its items the labels; nothing is refit on train + validation;
- at test, the items of a user's train and validation splits are excluded from every list, and
  the user's test items are relevant; full ranking over the whole catalog.

Rows are matched to the dataset's events by (user, item), so each split keeps the events' times
and values (the feature step needs them). A row that matches no event, or a pair listed in two
splits, is refused, naming the file and row: a split of other data would give numbers that
only look comparable. Events of the dataset that no split lists are counted and left out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlsd.evaluation.random_split import random_task
from mlsd.evaluation.retrieval import EvalTask, ProtocolConfig

SPLITS = ("train", "valid", "test")
SUFFIXES = (".tsv", ".csv", ".parquet")
USER_COLUMNS = ("user_id", "user", "user_id:token")
ITEM_COLUMNS = ("item_id", "item", "item_id:token")
"""Accepted column names: mlsd's, RecBole's split files', RecBole's atomic files'."""


@dataclass(frozen=True)
class GivenSplits:
    """The dataset's events divided as a peer's split files say.

    Attributes:
        events: ``train``, ``valid`` and ``test`` events (the dataset's rows, times and values).
        files: each split's file (none for :func:`leave_last_out`'s split of the data).
        counts: rows per file, repeated rows merged, events per split and events in no split.
        sha256: each file's SHA-256 (a peer's figures apply to the exact files measured).
    """

    events: dict[str, pd.DataFrame]
    files: dict[str, Path]
    counts: dict[str, int]
    sha256: dict[str, str]

    def tasks(
        self, users: pd.DataFrame, items: pd.DataFrame, protocol: ProtocolConfig
    ) -> tuple[EvalTask, EvalTask, pd.Timestamp]:
        """The validation task (train → valid), the test task (train → test, with the
        validation items excluded) and the one ``as_of`` both are featured at: a second after
        the last event of any split, as every split's events precede the evaluation."""
        train, valid, test = (self.events[name] for name in SPLITS)
        last = max(frame["ts"].max() for frame in self.events.values() if len(frame))
        as_of = pd.Timestamp(last) + pd.Timedelta(seconds=1)
        val_task, _ = random_task(train, valid, users, items, protocol, as_of=as_of)
        test_task, _ = random_task(train, test, users, items, protocol, as_of=as_of, hidden=valid)
        return val_task, test_task, as_of


def leave_last_out(events: pd.DataFrame, *, n: int = 1) -> GivenSplits:
    """Leave-last-one-out (``n`` = 1): each user's last ``n`` events by time are the test
    split, the ``n`` before them the validation split, the rest train; a user with fewer than
    ``2 * n + 1`` events keeps them all in train. Ties in time keep the events' order.

    Evaluated as given splits are (fit on train only, validation items excluded at test), so
    a user's validation item is not in their features at test: the setup of RecBole's
    general-recommendation leave-one-out, not of sequential models that read it."""
    if n < 1:
        raise ValueError(f"leave-last-out n={n}: must be >= 1")
    frame = events.reset_index(drop=True)
    users = frame["user_id"].to_numpy(np.int64)
    order = np.lexsort((np.arange(len(frame)), frame["ts"].to_numpy(), users))
    sorted_users = users[order]
    _, starts, sizes = np.unique(sorted_users, return_index=True, return_counts=True)
    from_end = np.repeat(starts + sizes, sizes) - np.arange(len(frame)) - 1  # 0 = user's last
    long_enough = np.repeat(sizes >= 2 * n + 1, sizes)
    split = np.where(~long_enough | (from_end >= 2 * n), 0, np.where(from_end < n, 2, 1))
    assigned = np.empty(len(frame), dtype=np.int64)
    assigned[order] = split
    parts = {name: frame[assigned == i].reset_index(drop=True) for i, name in enumerate(SPLITS)}
    counts = {f"{name}_events": len(part) for name, part in parts.items()}
    counts["events_in_no_split"] = 0
    return GivenSplits(parts, {}, counts, {})


def split_files(prefix: Path) -> dict[str, Path]:
    """``PREFIX_train``, ``PREFIX_valid`` and ``PREFIX_test`` with the first suffix found."""
    prefix = Path(prefix)
    files: dict[str, Path] = {}
    for name in SPLITS:
        found = [p for s in SUFFIXES if (p := prefix.parent / f"{prefix.name}_{name}{s}").is_file()]
        if not found:
            tried = ", ".join(f"{prefix.name}_{name}{s}" for s in SUFFIXES)
            raise ValueError(
                f"{prefix.parent}: no {name} split ({tried}); --splits takes the files' common "
                f"prefix, e.g. DIR/protoA for DIR/protoA_train.tsv, DIR/protoA_valid.tsv and "
                "DIR/protoA_test.tsv"
            )
        files[name] = found[0]
    return files


def read_split(path: Path) -> pd.DataFrame:
    """One split file as ``user_id, item_id`` int64 pairs, in file order."""
    try:
        if path.suffix == ".parquet":
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable split file ({exc})") from exc
    columns = {}
    for target, names in (("user_id", USER_COLUMNS), ("item_id", ITEM_COLUMNS)):
        present = [n for n in names if n in raw.columns]
        if not present:
            raise ValueError(
                f"{path}: no {target} column (one of {', '.join(names)}); it has "
                f"{', '.join(map(str, raw.columns))}"
            )
        columns[present[0]] = target
    out = raw[list(columns)].rename(columns=columns)
    for column in ("user_id", "item_id"):
        values = pd.to_numeric(out[column], errors="coerce").to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= 2**63)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: data row {row + 1} (after the header), {column} "
                f"{str(out[column].iloc[row])!r} is not an integer id ({int(bad.sum())} rows "
                "like it); the splits must use the dataset's ids"
            )
        out[column] = pd.to_numeric(out[column]).astype(np.int64)
    return out.reset_index(drop=True)


def read_splits(prefix: Path, events: pd.DataFrame, *, dataset: str = "the dataset") -> GivenSplits:
    """The three split files of ``prefix`` matched to ``events`` (see the module docstring).

    Raises:
        ValueError: a file is missing or unreadable, a row matches no event of ``dataset``
            (naming the first and the count), or a pair is in two splits.
    """
    files = split_files(prefix)
    pairs = {name: read_split(path) for name, path in files.items()}
    counts = {f"{name}_rows": len(frame) for name, frame in pairs.items()}
    owner = pd.concat(
        [frame.assign(split=name, row=np.arange(len(frame))) for name, frame in pairs.items()],
        ignore_index=True,
    )
    repeated = owner.duplicated(["user_id", "item_id", "split"])
    counts["repeated_rows"] = int(repeated.sum())
    owner = owner[~repeated.to_numpy()]
    twice = owner.duplicated(["user_id", "item_id"], keep=False)
    if twice.any():
        first = owner[twice.to_numpy()].sort_values(["user_id", "item_id", "split"]).iloc[:2]
        (a, b) = first.itertuples(index=False)
        raise ValueError(
            f"user {a.user_id}, item {a.item_id} is in two splits: {files[a.split]} data row "
            f"{a.row + 1} and {files[b.split]} data row {b.row + 1} ({int(twice.sum()) // 2} "
            "pairs like it); a pair belongs to one split: split the distinct (user, item) pairs"
        )
    keyed = events.merge(
        owner[["user_id", "item_id", "split"]], on=["user_id", "item_id"], how="left"
    )
    known = owner.merge(
        events[["user_id", "item_id"]].drop_duplicates(), how="left", indicator=True
    )
    unmatched = known[known["_merge"] == "left_only"]
    if len(unmatched):
        row = unmatched.iloc[0]
        where = f"{files[str(row['split'])]}: data row {int(row['row']) + 1}"
        raise ValueError(
            f"{where} (user {row['user_id']}, item {row['item_id']}) matches no event of "
            f"{dataset} ({len(unmatched)} rows of the "
            "splits match none); the splits must come from the same data, with its ids"
        )
    split_of = keyed["split"]
    counts["events_in_no_split"] = int(split_of.isna().sum())
    columns = list(events.columns)
    split_events = {
        name: keyed.loc[(split_of == name).to_numpy(), columns].reset_index(drop=True)
        for name in SPLITS
    }
    counts.update({f"{name}_events": len(frame) for name, frame in split_events.items()})
    digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    return GivenSplits(split_events, files, counts, digests)
