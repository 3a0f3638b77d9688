"""``InteractionMatrix``: the users × items matrix every retriever's fit builds."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from mlsd.models.retrieval.base import InteractionMatrix
from tests.models.retrieval.contract import frame

EVENTS = frame([(1, 10, "2024-01-01"), (2, 11, "2024-01-02"), (2, 99, "2024-01-03")])


def test_events_are_counted_on_the_catalog() -> None:
    matrix = InteractionMatrix.from_events(EVENTS, [11, 10, 12], users=[3])
    assert matrix.item_ids.tolist() == [10, 11, 12]
    assert matrix.user_ids.tolist() == [1, 2, 3]
    # item 99 is not in the catalog: dropped.
    assert matrix.user_items.toarray().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_no_events_give_an_empty_matrix_over_the_catalog() -> None:
    matrix = InteractionMatrix.from_events(EVENTS.iloc[:0], [10, 11])
    assert matrix.user_items.shape == (0, 2)


@pytest.mark.parametrize(
    "catalog", [[], pd.Series([], dtype="int64"), np.array([], dtype=np.int64)]
)
def test_an_empty_catalog_is_a_value_error_naming_the_items_table(catalog: npt.ArrayLike) -> None:
    with pytest.raises(ValueError, match=r"catalog is empty \(items\.item_id has no rows\)"):
        InteractionMatrix.from_events(EVENTS, catalog)
