"""The store reader against the rows that were written (a numpy oracle): every index form,
rows spanning ranks and chunks, column orders, dtypes, empty and one-row stores, skipped
rows, module selection and every error message (holes that surviving mutants showed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_bergson.store import (
    GradientStore,
    GradientStoreWriter,
    IncompleteStoreWarning,
    layout_blocks,
)

BLOCKS = layout_blocks([("fc", (2, 2), "fc", None), ("attn.head_0", (1, 2), "attn", 0)])
DIM = 6


def two_ranks(path: Path, dtype: str = "float32") -> np.ndarray:
    """Rank 0 holds rows 0-4, rank 1 rows 5-11 (chunks of 3); rank 1 skipped two rows."""
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(12, DIM, generator=gen) * 4).round() / 4  # exact in float16
    kw = {"modules": BLOCKS, "dtype": dtype, "world_size": 2, "chunk_rows": 3}
    with (
        GradientStoreWriter(path, rank=0, **kw) as w0,
        GradientStoreWriter(path, rank=1, **kw) as w1,
    ):
        w0.append(rows[:5], example_id=range(5), step=0, epoch=0)
        w1.record_skipped([70, 71], step=3, epoch=1)
        w1.append(rows[5:], example_id=range(5, 12), step=0, epoch=0)
    return rows.numpy()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "g.zarr"
    rows = two_ranks(path)
    return GradientStore.open(path), rows


@pytest.fixture(scope="module")
def store(written):
    return written[0]


@pytest.fixture(scope="module")
def rows(written):
    return written[1]


def test_every_index_form_equals_the_written_rows(store, rows):
    g = store.gradients
    assert len(g.guards) == 2 and g.shape == (12, DIM)
    np.testing.assert_array_equal(g[-12], rows[0])
    np.testing.assert_array_equal(g.take(7, np.array([4, 5])), rows[7, 4:6])
    np.testing.assert_array_equal(g[4:9], rows[4:9])  # across ranks, not from 0
    np.testing.assert_array_equal(g[1:11:2], rows[1:11:2])
    mask = np.arange(12) % 3 == 0
    np.testing.assert_array_equal(g[mask], rows[mask])
    picks = [0, 2, 4, 6, 8, 11, -1, 2]  # gaps inside each rank, repeats, negatives
    np.testing.assert_array_equal(g[picks], rows[picks])
    np.testing.assert_array_equal(g[[0, 3]], rows[[0, 3]])  # rank 1 untouched
    np.testing.assert_array_equal(g[np.array([[1, 2], [9, 10]])], rows[[1, 2, 9, 10]])
    cols = np.array([0, 2, 1, 3])  # spans 4 columns, but out of order
    np.testing.assert_array_equal(g.take([5, 1], cols), rows[[5, 1]][:, cols])


def test_out_of_range_rows_are_refused_with_the_row_count(store):
    g = store.gradients
    for bad in (12, -13):
        with pytest.raises(IndexError, match=rf"^row {bad} out of range for 12 rows$"):
            g[bad]
    for bad in ([12], [-13]):
        with pytest.raises(IndexError, match=r"^row indices out of range for 12 rows$"):
            g[bad]
    np.testing.assert_array_equal(g[[-12]], g[[0]])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_keep_the_store_dtype_until_read_converts(tmp_path, dtype):
    rows = two_ranks(tmp_path / "g.zarr", dtype)
    store = GradientStore.open(tmp_path / "g.zarr")
    assert store.gradients[[1, 6]].dtype == store.gradients[2:7].dtype == np.dtype(dtype)
    assert store.read([1, 6], dtype=torch.float64).dtype == torch.float64
    chunks = list(store.iter_chunks(chunk_rows=5, dtype=torch.float64))
    assert [s for s, _ in chunks] == [0, 5, 10] and chunks[0][1].dtype == torch.float64
    np.testing.assert_array_equal(torch.cat([c for _, c in chunks]).numpy(), rows)
    with pytest.raises(ValueError, match=r"^chunk_rows must be >= 1; got -1$"):
        next(store.iter_chunks(chunk_rows=-1))


def test_columns_skipped_rows_and_ranks(store, rows):
    store = GradientStore.open(store.path)  # opened in this test (mutmut maps calls to tests)
    assert store.columns().tolist() == list(range(DIM))
    assert store.columns("attn").tolist() == [4, 5]  # a string, not a list
    np.testing.assert_array_equal(store.read([3], modules="fc").numpy(), rows[[3], :4])
    assert store.ranks.dtype == np.int32 and store.ranks.tolist() == [0] * 5 + [1] * 7
    assert store.skipped == [
        {"rank": 1, "example_id": 70, "step": 3, "epoch": 1},
        {"rank": 1, "example_id": 71, "step": 3, "epoch": 1},
    ]
    assert store.verify(progress=False).ok


def test_unknown_module_lists_at_most_ten_parents(tmp_path):
    for n, tail in ((10, ""), (11, " ...")):
        blocks = layout_blocks([(f"m{i:02d}", (1, 1), f"m{i:02d}", None) for i in range(n)])
        with GradientStoreWriter(tmp_path / f"{n}.zarr", modules=blocks, dtype="float32") as w:
            w.append(np.ones((1, n)), example_id=[0], step=0, epoch=0)
        names = [f"m{i:02d}" for i in range(10)]
        with pytest.raises(KeyError) as err:
            GradientStore.open(tmp_path / f"{n}.zarr").columns(["nope"])
        want = f"no module block matches 'nope'; available modules include {names}{tail}"
        assert err.value.args[0] == want


def test_empty_and_one_row_stores(tmp_path):
    with GradientStoreWriter(tmp_path / "e.zarr", modules=BLOCKS, dtype="float32"):
        pass
    empty = GradientStore.open(tmp_path / "e.zarr")
    assert len(empty) == 0 and empty.gradients.shape == (0, DIM)
    dtypes = {k: getattr(empty, k).dtype for k in ("example_ids", "steps", "epochs", "finite")}
    assert dtypes == {
        "example_ids": np.int64,
        "steps": np.int64,
        "epochs": np.int32,
        "finite": bool,
    }
    assert empty.example_ids.shape == (0,) and empty.skipped == []
    with GradientStoreWriter(tmp_path / "o.zarr", modules=BLOCKS, dtype="float32") as w:
        w.append(np.arange(DIM)[None], example_id=[5], step=0, epoch=0)
    one = GradientStore.open(tmp_path / "o.zarr")
    assert one.gradients[[-1, 0]].tolist() == [list(range(DIM))] * 2


def test_auxiliary_directory_names(store):
    for bad in ("", "a/b", ".hidden", "rank_3", "zarr.json"):
        with pytest.raises(ValueError, match=rf"^bad store subdirectory name {bad!r}; try one of"):
            store.subdir(bad)


def test_incomplete_store_warns_at_the_callers_line(tmp_path):
    w = GradientStoreWriter(tmp_path / "i.zarr", modules=BLOCKS, dtype="float32", chunk_rows=2)
    w.append(np.ones((2, DIM)), example_id=[0, 1], step=0, epoch=0)
    w.flush()
    with pytest.warns(IncompleteStoreWarning) as rec:
        GradientStore.open(tmp_path / "i.zarr")
    assert rec[0].filename == __file__
    w.close()
