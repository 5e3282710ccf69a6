"""capture/rows.py: a batch's rows from block rows, and the non-finite policy (hand-computed)."""

from __future__ import annotations

import pytest
import torch

from lightning_bergson.capture import Block
from lightning_bergson.capture.rows import (
    BatchRows,
    NonFiniteGradientError,
    NonFinitePolicy,
    RowAssembler,
)

BLOCKS = [Block("a", (1, 2), "a", None), Block("b", (2, 1), "b", None)]


def test_rows_are_summed_over_passes_scaled_and_ordered_like_the_blocks():
    rows = RowAssembler(BLOCKS)
    rows.add("b", torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    rows.add("a", torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
    rows.add("b", torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))  # a second pass
    got = rows.assemble(2, torch.tensor([2.0, -1.0]))
    assert got.dtype == torch.float64 and rows.missing == []  # the rows' dtype: exact
    assert got.tolist() == [[2.0, 2.0, 4.0, 4.0], [-2.0, -2.0, -3.0, -5.0]]
    assert rows.assemble(2, torch.ones(2)) is None  # consumed: nothing left
    rows.add("b", torch.ones(2, 2))
    assert rows.assemble(2, torch.ones(2)).tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2
    assert rows.missing == ["a"]
    rows.add("a", torch.ones(2, 2))
    rows.clear()  # a new micro-batch starts
    assert rows.assemble(2, torch.ones(2)) is None


def _batch():
    grads = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, float("inf")], [4.0, 5.0]])
    finite = torch.isfinite(grads).all(dim=1)
    ids = torch.tensor([10, 11, 12, 13])
    return BatchRows(grads, ids, finite, loss=torch.arange(4.0), advantage=None)


def test_skip_keeps_the_finite_rows_and_names_the_others():
    policy = NonFinitePolicy("skip", "g.zarr")
    kept, skipped = policy.apply(_batch(), step=3, epoch=1)
    assert skipped == [11, 12]
    assert kept.example_id.tolist() == [10, 13] and kept.loss.tolist() == [0.0, 3.0]
    assert kept.grads.tolist() == [[1.0, 2.0], [4.0, 5.0]] and bool(kept.finite.all())
    message = policy.report(epoch=1, rank=1)
    assert message.startswith("rank 1: 2 examples had non-finite gradients in epoch 1")
    assert "[11, 12]" in message and "GradientStore.skipped" in message
    assert policy.report(epoch=1) is None  # reported once


def test_warn_stores_them_flagged_and_raise_stops():
    rows, skipped = NonFinitePolicy("warn", "g.zarr").apply(_batch(), step=3, epoch=1)
    assert skipped == [] and rows.finite.tolist() == [True, False, False, True]
    with pytest.raises(NonFiniteGradientError, match=r"ids \[11, 12\] at step 3 \(epoch 1\)"):
        NonFinitePolicy("raise", "g.zarr").apply(_batch(), step=3, epoch=1)
    with pytest.raises(ValueError, match="on_nonfinite='drop' is not one of 'warn', 'raise'"):
        NonFinitePolicy("drop", "g.zarr")  # type: ignore[arg-type]
