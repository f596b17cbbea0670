"""Expert parallelism with no (token, choice) rows at all: the combine returns zeros of the output shape."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from engine.model.expert_parallel import ExpertParallel


class _Switch:
    """Never asked for rows here (there are none)."""

    layer = 3

    def run_pairs(self, rows: mx.array, ids: np.ndarray, call_pairs: int = 0) -> mx.array:
        raise AssertionError("no rows: no expert runs")


@pytest.mark.parametrize("combine", ["gather", "auto", "all_sum"])
def test_no_rows_give_zeros_of_the_output_shape(combine: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(mx.distributed, "all_gather", lambda m, group=None: mx.concatenate([m, m], axis=0))
    monkeypatch.setattr(mx.distributed, "all_sum", lambda m, group=None: m + m)
    host_idx = np.zeros((1, 0, 4), dtype=np.int64)  # batch 1, no tokens, K 4
    x = mx.zeros((1, 0, 8), dtype=mx.bfloat16)
    for rank in range(2):
        par = ExpertParallel(group=None, rank=rank, size=2, combine=combine)
        y = par.run_layer(_Switch(), x, host_idx)  # type: ignore[arg-type]
        assert y.shape == (1, 0, 4, 8) and y.dtype == mx.bfloat16
