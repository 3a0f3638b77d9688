"""The leakage guard: features for a label at time t may only use events strictly before t.

A features table holds one row per training row, identified by its row key (by default
:data:`DEFAULT_KEYS`: user, item and the label's timestamp, since one user/item pair can have
several labels at different times), and says how fresh each feature is in one of two ways:

- a ``feature_ts`` column: the time of the latest event used for any feature of the row; when it
  leaks, every feature column of the table is named;
- per-feature ``<feature>__asof`` columns: the time of the latest event used for that feature;
  only the leaking features are named. Both may appear: ``__asof`` wins for its feature.

A row leaks when an as-of time is at or after the label time (``asof >= label_ts``); a missing
as-of time (NaT) means no event was used. Labels without features and features without labels
are counted, not treated as leakage; but feature rows of which none matches a label (keys or
label times written differently, e.g. at another precision) fail the check, which would
otherwise pass without having checked anything. With ``__asof`` columns and no ``feature_ts``,
every other column must have its own ``__asof``: a feature with no as-of time cannot be checked.

Example::

    features = pd.DataFrame({"user_id": [1], "item_id": [5], "label_ts": [t],
                             "user_mean_rating": [3.5], "feature_ts": [t]})
    check_leakage(features, labels).leaky_columns  # ["user_mean_rating"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_KEYS = ("user_id", "item_id", "label_ts")
ASOF_SUFFIX = "__asof"
_ROW = "__features_row"


class LeakageError(ValueError):
    """Features were computed from events at or after their label's time."""

    def __init__(self, report: LeakageReport) -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass
class LeakageReport:
    """The outcome of :func:`check_leakage`.

    Attributes:
        n_rows: feature rows matched to a label, i.e. checked.
        n_leaky_rows: checked rows with at least one feature at or after the label time.
        leaky_columns: the leaking feature columns, in the features table's order.
        example: the first leaky row: its key, label time, and each leaking feature's value and
            as-of time (plus ``features_row``, its 0-based position); ``None`` when clean.
        ok: no leaky rows, and some row was checked (or there was no feature row at all).
        leaky_counts: leaky rows per leaking column.
        n_features_without_label: feature rows whose key has no label (not checked).
        n_labels_without_features: labels whose key has no feature row.
    """

    n_rows: int
    n_leaky_rows: int
    leaky_columns: list[str]
    example: dict[str, Any] | None
    ok: bool
    leaky_counts: dict[str, int] = field(default_factory=dict)
    n_features_without_label: int = 0
    n_labels_without_features: int = 0

    @property
    def nothing_checked(self) -> bool:
        """Feature rows were given but none matched a label: the check checked nothing."""
        return self.n_rows == 0 and self.n_features_without_label > 0

    def summary(self) -> str:
        """One paragraph for people: what leaks, how often, and an example row."""
        if self.nothing_checked:
            return (
                f"nothing checked: none of the {self.n_features_without_label:,} feature rows "
                f"matches any of the {self.n_labels_without_features:,} labels on the row key; "
                "check that both tables write the keys and the label times alike (the same "
                "ids, the same time precision and zone)"
            )
        unmatched = ""
        if self.n_features_without_label or self.n_labels_without_features:
            unmatched = (
                f" ({self.n_features_without_label:,} feature rows without a label and "
                f"{self.n_labels_without_features:,} labels without features were not checked)"
            )
        if self.ok:
            return f"no leakage in {self.n_rows:,} feature rows{unmatched}"
        columns = ", ".join(
            f"{c} ({self.leaky_counts.get(c, 0):,} rows)" for c in self.leaky_columns
        )
        example = ", ".join(f"{k}={v}" for k, v in (self.example or {}).items())
        return (
            f"leakage: {self.n_leaky_rows:,} of {self.n_rows:,} feature rows use events at or "
            f"after their label time; leaky columns: {columns}. Example row: {example}. Features "
            f"for a label at time t may only use events strictly before t{unmatched}."
        )


def _asof_columns(
    columns: Sequence[str],
    row_key: Sequence[str],
    label_ts_col: str,
    feature_ts_col: str,
    name: str,
) -> dict[str, str]:
    """Map each feature column to the column holding its as-of time."""
    asof = {c[: -len(ASOF_SUFFIX)]: c for c in columns if c.endswith(ASOF_SUFFIX)}
    for feature, column in asof.items():
        if feature not in columns:
            raise ValueError(f"{name}: column {column!r} has no feature column {feature!r}")
    skip = {*row_key, label_ts_col, feature_ts_col, *asof.values()}
    unlisted = [column for column in columns if column not in skip and column not in asof]
    if feature_ts_col in columns:
        for column in unlisted:
            asof[column] = feature_ts_col
        if not asof:
            asof[feature_ts_col] = feature_ts_col
    elif asof and unlisted:
        raise ValueError(
            f"{name}: feature column(s) {unlisted} have no as-of time, so their leakage "
            f"cannot be checked; add {unlisted[0] + ASOF_SUFFIX!r} (the time of the latest "
            f"event it used) for each, or a {feature_ts_col!r} column for all of them"
        )
    if not asof:
        raise ValueError(
            f"{name}: no {feature_ts_col!r} column and no '<feature>{ASOF_SUFFIX}' columns; "
            "add the time of the latest event used to compute each row's features"
        )
    return {c: asof[c] for c in sorted(asof, key=list(columns).index)}


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    for column in columns:
        if column not in frame.columns:
            raise ValueError(
                f"{name}: column {column!r} is missing; it has {', '.join(map(str, frame.columns))}"
            )


def _as_time(values: pd.Series, column: str, name: str) -> pd.Series:
    """Datetimes as UTC (naive taken as UTC); numbers (e.g. day indices) stay numbers."""
    if values.isna().all():  # e.g. an empty CSV column: no event was used
        return pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values
    try:
        parsed = pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: column {column!r} does not hold timestamps ({exc})") from exc
    return parsed.dt.as_unit("ns")


def _labels_by_key(
    labels: pd.DataFrame, row_key: list[str], label_ts_col: str, name: str
) -> pd.DataFrame:
    columns = list(dict.fromkeys([*row_key, label_ts_col]))
    table = labels[columns]
    missing = int(table[label_ts_col].isna().sum())
    if missing:
        raise ValueError(f"{name}: {missing:,} labels have no {label_ts_col!r}")
    if label_ts_col in row_key:
        return table.drop_duplicates(row_key)
    duplicated = table.duplicated(row_key)
    if duplicated.any():
        raise ValueError(
            f"{name}: {int(duplicated.sum()):,} labels share a key ({', '.join(row_key)}) with "
            f"another label, so their label time is ambiguous; add {label_ts_col!r} to the "
            "features table and the keys"
        )
    return table


def _example(
    features: pd.DataFrame, row: pd.Series, leaky: list[str], asof: dict[str, str], head: list[str]
) -> dict[str, Any]:
    source = features.iloc[int(row[_ROW])]
    example: dict[str, Any] = {c: row[c] for c in head}
    example["features_row"] = int(row[_ROW])
    for feature in leaky:
        if feature in features.columns and feature != asof[feature]:
            example[feature] = source[feature]
        example[asof[feature]] = row[asof[feature]]
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in example.items()}


def _check(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    keys: Sequence[str],
    label_ts_col: str,
    feature_ts_col: str,
    names: tuple[str, str],
) -> LeakageReport:
    row_key = list(dict.fromkeys(keys))
    if label_ts_col not in row_key and label_ts_col in features.columns:
        row_key.append(label_ts_col)  # several labels per pair: a row is also its label time
    _require(features, row_key, names[0])
    _require(labels, [*row_key, label_ts_col], names[1])
    asof = _asof_columns(list(features.columns), row_key, label_ts_col, feature_ts_col, names[0])
    asof_cols = list(dict.fromkeys(asof.values()))
    left = features[row_key + asof_cols].assign(**{_ROW: np.arange(len(features))})
    right = _labels_by_key(labels, row_key, label_ts_col, names[1])
    for column in asof_cols:
        left[column] = _as_time(left[column], column, names[0])
    if label_ts_col in row_key:
        left[label_ts_col] = _as_time(left[label_ts_col], label_ts_col, names[0])
    right = right.assign(**{label_ts_col: _as_time(right[label_ts_col], label_ts_col, names[1])})
    try:
        merged = left.merge(right, on=row_key, how="outer", indicator=True, sort=False)
        matched = merged[merged["_merge"] == "both"].sort_values(_ROW)
        leaks = pd.DataFrame({f: matched[c] >= matched[label_ts_col] for f, c in asof.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot match {names[0]} to {names[1]} on {', '.join(row_key)} and compare "
            f"as-of times with {label_ts_col!r}: {exc}"
        ) from exc
    counts = {f: int(n) for f, n in leaks.sum().items() if n > 0}
    leaky_rows = leaks.any(axis=1)
    example = None
    if leaky_rows.any():
        first = matched[leaky_rows].iloc[0]
        in_row = [f for f in counts if leaks.loc[first.name, f]]
        head = list(dict.fromkeys([*row_key, label_ts_col]))
        example = _example(features, first, in_row, asof, head)
    unlabelled = int((merged["_merge"] == "left_only").sum())
    return LeakageReport(
        n_rows=len(matched),
        n_leaky_rows=int(leaky_rows.sum()),
        leaky_columns=list(counts),
        example=example,
        ok=not counts and (len(matched) > 0 or unlabelled == 0),
        leaky_counts=counts,
        n_features_without_label=unlabelled,
        n_labels_without_features=int((merged["_merge"] == "right_only").sum()),
    )


def check_leakage(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
    label_ts_col: str = "label_ts",
    feature_ts_col: str = "feature_ts",
) -> LeakageReport:
    """Check that every feature row was computed from events strictly before its label time.

    Args:
        features: one row per training row: ``keys``, then features with ``feature_ts`` or
            ``<feature>__asof`` columns (timestamps, or numbers such as day indices).
        labels: ``keys`` and ``label_ts_col``.
        keys: the row key. When it omits ``label_ts_col`` but the features table has that
            column, it joins the key too (a user/item pair can have several labels).
        label_ts_col: the label's timestamp column.
        feature_ts_col: the single as-of column, when the table has no ``__asof`` columns.

    Returns:
        A :class:`LeakageReport`; ``report.ok`` is True when nothing leaks.
    """
    return _check(features, labels, keys, label_ts_col, feature_ts_col, ("features", "labels"))


def assert_no_leakage(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
    label_ts_col: str = "label_ts",
    feature_ts_col: str = "feature_ts",
) -> None:
    """Raise :class:`LeakageError` (naming the columns, with an example row) if anything leaks."""
    report = check_leakage(
        features, labels, keys=keys, label_ts_col=label_ts_col, feature_ts_col=feature_ts_col
    )
    if not report.ok:
        raise LeakageError(report)


def _read_table(path: Path, role: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {role} file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the {role} table ({exc})") from exc
    raise ValueError(f"{path}: {role} must be a .parquet or .csv file, not {suffix or 'no suffix'}")


def check_leakage_files(
    features: Path,
    labels: Path,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
    label_ts_col: str = "label_ts",
    feature_ts_col: str = "feature_ts",
) -> LeakageReport:
    """:func:`check_leakage` on two files (Parquet, or CSV with ISO timestamps)."""
    names = (str(features), str(labels))
    frames = (_read_table(features, "features"), _read_table(labels, "labels"))
    return _check(*frames, keys, label_ts_col, feature_ts_col, names)
