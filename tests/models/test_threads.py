"""torch's thread count inside and after ``torch_threads``."""

from __future__ import annotations

import pytest
import torch

from mlsd.models.threads import torch_threads


def test_torch_threads_sets_and_restores_the_count_even_on_error() -> None:
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    with torch_threads(wanted):
        assert torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(wanted):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
