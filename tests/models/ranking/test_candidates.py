"""Ranker rows: the request path's float block is the training frame, value for value."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from mlsd.features.definitions import FeatureConfig
from mlsd.models.ranking.candidates import (
    _DICT_ROWS,
    FeatureLayout,
    Vocabulary,
    _as_string,
    ranker_frame,
    ranker_inputs,
    request_columns,
)

CONFIG = FeatureConfig(categories=("art", "books", "cars"), user_attributes=("region",))
LAYOUT = FeatureLayout(
    numeric=(
        "events_30d",
        "item_age_days",
        "score_als",
        "item_users_all",
        "merged_position",
        "affinity_mean_30d",
    ),
    categorical=("region", "category", "claimed_source"),
)
VOCABULARY = Vocabulary(
    {
        "region": ["north", "south"],
        "category": ["art", "books", "unknown"],
        "claimed_source": ["als", "popularity"],
    }
)


def _factorized(vocabulary: Vocabulary, column: str, values: npt.ArrayLike) -> list[int]:
    """The codes as the vocabulary gave them before its str fast path: factorize, then look
    up each distinct value's string."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    table = {v: i + 1 for i, v in enumerate(vocabulary.values[column])}
    names = [v if isinstance(v, str) else _as_string(v) for v in uniques]
    lut = np.array([table.get(str(v), 0) for v in names] + [table.get("unknown", 0)])
    return [int(c) for c in lut[codes]]


@pytest.mark.parametrize(
    "values",
    [
        ["art", "books", "nope", "art", "unknown"],
        ["art", None, np.nan, "books", pd.NA],
        [1, "art", 2.0, None],
        [np.str_("art"), "books"],
        [],
    ],
)
def test_encode_gives_the_factorized_codes(values: list[Any]) -> None:
    codes = VOCABULARY.encode({"category": np.array(values, dtype=object)})["category"]
    assert codes.dtype == np.int64
    assert codes.tolist() == _factorized(VOCABULARY, "category", values)


def test_encode_reads_a_broadcast_value_once() -> None:
    one = np.broadcast_to(np.array(["south"], dtype=object), (4,))
    assert VOCABULARY.encode({"region": one})["region"].tolist() == [2, 2, 2, 2]
    missing = np.broadcast_to(np.array([None], dtype=object), (3,))
    assert VOCABULARY.encode({"region": missing})["region"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("n", [_DICT_ROWS - 1, _DICT_ROWS, 5 * _DICT_ROWS])
@pytest.mark.parametrize(
    "pool",
    [
        ["art", "books", "cars"],
        ["art", "books", "nope", "unknown"],
        ["art", None, np.nan, pd.NA, 1, 2.0, np.str_("books")],
    ],
)
def test_long_columns_are_factorized_to_the_same_codes(n: int, pool: list[Any]) -> None:
    # Batch prediction's columns (100K rows) are factorized, a request's looked up value by
    # value: the same codes either way.
    rng = np.random.default_rng(n)
    values = np.empty(n, dtype=object)
    values[:] = [pool[i] for i in rng.integers(0, len(pool), n)]
    codes = VOCABULARY.encode({"category": values})["category"]
    assert codes.dtype == np.int64
    assert codes.tolist() == _factorized(VOCABULARY, "category", values)


def _request(n: int, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "item_id": np.arange(n, dtype=np.int64),
        "events_30d": rng.integers(0, 50, n).astype(np.float32),
        "item_age_days": np.where(rng.random(n) < 0.2, -1.0, rng.random(n) * 400),
        "score_als": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
        "item_users_all": rng.integers(0, 1000, n).astype(np.float64),
        "merged_position": np.log1p(np.arange(n)).astype(np.float32),
        "cat_mean_30d": np.broadcast_to(rng.random((1, 3)).astype(np.float32), (n, 3)),
        "category_index": rng.integers(-1, 3, n),
        "region": np.broadcast_to(np.array(["south"], dtype=object), (n,)),
        "category": rng.choice(np.array(["art", "books", "cars", None], dtype=object), n),
        "claimed_source": rng.choice(np.array(["als", "popularity"], dtype=object), n),
    }


def test_ranker_inputs_are_the_ranker_frame_as_a_block() -> None:
    columns = _request(300)
    matrix, schema = ranker_inputs(columns, LAYOUT, VOCABULARY, CONFIG)
    frame, frame_schema = ranker_frame(columns, LAYOUT, VOCABULARY, CONFIG)
    assert schema == frame_schema
    assert list(frame.columns) == [*LAYOUT.numeric, *LAYOUT.categorical]
    assert (frame.dtypes[list(LAYOUT.numeric)] == np.float64).all()
    assert (frame.dtypes[list(LAYOUT.categorical)] == np.int64).all()
    np.testing.assert_array_equal(matrix, schema.matrix(frame))
    pd.testing.assert_frame_equal(schema.frame(matrix), frame, check_exact=True)
    schema.check(frame)
    schema.check_matrix(matrix)


def _row_major_block(columns: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    """ranker_inputs as it was first written: each column into a row-major block, then the
    transforms on column selections and np.nan_to_num."""
    k = len(LAYOUT.numeric)
    matrix = np.empty((len(columns["item_id"]), k + len(LAYOUT.categorical)))
    numeric = matrix[:, :k]
    for j, column in enumerate(LAYOUT.numeric):
        if column == "affinity_mean_30d":
            means, index = columns["cat_mean_30d"], columns["category_index"]
            numeric[:, j] = [m[i] if i >= 0 else 0.0 for m, i in zip(means, index, strict=True)]
        else:
            numeric[:, j] = columns[column]
    values = numeric[:, LAYOUT.logged]
    numeric[:, LAYOUT.logged] = np.where(values >= 0, np.log1p(np.maximum(values, 0.0)), -1.0)
    numeric[:, LAYOUT.counts] = np.log1p(np.maximum(numeric[:, LAYOUT.counts], 0.0))
    np.nan_to_num(numeric, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    codes = VOCABULARY.encode({c: columns[c] for c in LAYOUT.categorical})
    for j, column in enumerate(LAYOUT.categorical):
        matrix[:, k + j] = codes[column]
    return matrix


@pytest.mark.parametrize("n", [1, 300, 2_000])
def test_ranker_inputs_is_the_row_major_block_to_the_bit(n: int) -> None:
    # Built feature by feature and transposed once: the same bits (NaN and ±inf → 0, -0.0
    # kept) in the same row-major layout LightGBM scored before.
    columns = _request(n, seed=n)
    columns["score_als"][: min(n, 3)] = [np.inf, -np.inf, -0.0][: min(n, 3)]
    matrix, _ = ranker_inputs(columns, LAYOUT, VOCABULARY, CONFIG)
    assert matrix.flags.c_contiguous
    want = _row_major_block(columns)
    np.testing.assert_array_equal(matrix.view(np.int64), want.view(np.int64))


@pytest.mark.parametrize("seed", [0, 1])
def test_request_columns_of_owned_rows_are_the_repeated_user_rows(seed: int) -> None:
    # Batch prediction passes each user once with the owner of every candidate row: the
    # columns must be those of the user rows repeated per candidate.
    rng = np.random.default_rng(seed)
    m, n = 6, 90
    owner = np.sort(rng.integers(0, m, n))
    pairs = {"item_id": rng.integers(0, 50, n), "score_als": rng.normal(size=n)}
    users = {
        "events_30d": rng.integers(0, 9, m).astype(np.float32),
        "cat_mean_30d": rng.random((m, 3)).astype(np.float32),
        "region": rng.choice(np.array(["north", "south", None], dtype=object), m),
    }
    items = {
        "category_index": rng.integers(-1, 4, n),  # 3: a category past the user's columns
        "category": rng.choice(np.array(["art", "books"], dtype=object), n),
        "claimed_source": rng.choice(np.array(["als", "popularity"], dtype=object), n),
    }
    derived = {"item_age_days": rng.random(n) * 9}
    extras = {"item_users_all": rng.random(n), "merged_position": rng.random(n)}

    def columns(user: dict[str, Any], owner: npt.NDArray[np.int64] | None) -> dict[str, Any]:
        return request_columns(
            pairs,
            user=user,
            items=items,
            derived=derived,
            extras=extras,
            layout=LAYOUT,
            config=CONFIG,
            owner=owner,
        )

    want = columns({k: v[owner] for k, v in users.items()}, None)
    got = columns(users, owner)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].dtype == want[name].dtype, name


def test_the_offline_frame_and_the_request_columns_give_the_same_block() -> None:
    # Training reads a DataFrame (pair_features, category names, its own index); a request
    # reads arrays: one function, so one block, with one rule for a missing value (0 before
    # the transforms, whatever the column's transform).
    columns = _request(50, seed=1)
    columns["item_age_days"][:3] = np.nan
    columns["events_30d"][3:5] = np.nan
    offline = pd.DataFrame(
        {
            name: list(values) if values.ndim > 1 else values
            for name, values in columns.items()
            if name != "category_index"
        },
        index=np.arange(100, 150),
    )
    offline["category"] = [
        CONFIG.categories[i] if i >= 0 else None for i in columns["category_index"]
    ]
    columns["category"] = offline["category"].to_numpy(dtype=object)
    matrix, _ = ranker_inputs(columns, LAYOUT, VOCABULARY, CONFIG)
    frame, schema = ranker_frame(offline, LAYOUT, VOCABULARY, CONFIG)
    assert list(frame.index) == list(range(100, 150))
    np.testing.assert_array_equal(matrix, schema.matrix(frame))


@pytest.mark.parametrize(
    ("column", "bad", "message"),
    [
        ("score_als", np.inf, "is not finite"),
        ("category", 4.0, "outside"),
        ("region", -1.0, "outside"),
        ("claimed_source", 0.5, "not an integer"),
        ("claimed_source", np.nan, "outside"),
    ],
)
def test_check_matrix_names_the_column_and_row(column: str, bad: float, message: str) -> None:
    matrix, schema = ranker_inputs(_request(20), LAYOUT, VOCABULARY, CONFIG)
    matrix[7, schema.columns.index(column)] = bad
    with pytest.raises(ValueError, match=f"rows: column '{column}' row 7: .*{message}"):
        schema.check_matrix(matrix, name="rows")
    with pytest.raises(ValueError, match="expected"):
        schema.check_matrix(matrix[:, 1:])
