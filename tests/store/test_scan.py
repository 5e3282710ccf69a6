"""StoreScanner, the public scan of a store: every committed row once, in order, with its id.

Oracle: the rows and ids written, kept in memory by the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_bergson.store import (
    GradientStore,
    GradientStoreWriter,
    RowChunk,
    StoreIntegrityError,
    StoreScanner,
    layout_blocks,
)

BLOCKS = layout_blocks([("a", (2, 3), "a", None), ("b", (1, 4), "b", None)])
DIM = 10


def _two_rank_store(tmp_path, dtype="float32"):
    """Rank 0: 11 rows, rank 1: 14 rows, store chunks of 4 (partial chunks on both ranks)."""
    path = tmp_path / "run.zarr"
    kw = {"modules": BLOCKS, "dtype": dtype, "world_size": 2, "chunk_rows": 4}
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(25, DIM, generator=gen)
    ids = np.r_[100:111, 7:21]
    writers = [GradientStoreWriter(path, rank=r, **kw) for r in (0, 1)]
    for w, lo, hi in ((writers[0], 0, 11), (writers[1], 11, 25)):
        for start in range(lo, hi, 3):  # appends that do not line up with chunks
            stop = min(start + 3, hi)
            w.append(grads[start:stop], ids[start:stop], step=0, epoch=0)
        w.close()
    return GradientStore.open(path), grads.numpy(), ids


def _collect(scanner: StoreScanner) -> tuple[list[int], np.ndarray, np.ndarray]:
    starts, rows, ids = [], [], []
    for chunk in scanner:
        assert isinstance(chunk, RowChunk) and len(chunk.rows) == len(chunk.example_ids)
        starts.append(chunk.start)
        rows.append(chunk.rows.clone().numpy())  # buffers are reused: copy before the next
        ids.append(np.array(chunk.example_ids))
    return starts, np.concatenate(rows), np.concatenate(ids)


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_row_once_in_order_with_its_id(tmp_path, chunk_rows, prefetch):
    store, grads, ids = _two_rank_store(tmp_path)
    scanner = StoreScanner(store, chunk_rows=chunk_rows, prefetch=prefetch)
    starts, rows, got_ids = _collect(scanner)
    assert starts == list(range(0, 25, chunk_rows)) and len(scanner) == len(starts)
    np.testing.assert_array_equal(rows, grads)
    np.testing.assert_array_equal(got_ids, ids)


def test_module_subset_and_dtype(tmp_path):
    store, grads, ids = _two_rank_store(tmp_path, dtype="float16")
    b = BLOCKS[1]
    scanner = StoreScanner(store, chunk_rows=6, modules=["b"], dtype=torch.float64)
    _, rows, got_ids = _collect(scanner)
    want = grads[:, b.offset : b.offset + b.size].astype(np.float16).astype(np.float64)
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(got_ids, ids)
    full = _collect(StoreScanner(store, chunk_rows=6, dtype=torch.float64))[1]
    np.testing.assert_array_equal(full, grads.astype(np.float16).astype(np.float64))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_changed_chunk_fails_its_checksum(tmp_path, prefetch):
    store, _, _ = _two_rank_store(tmp_path)
    key = store.path / "rank_1" / "gradients" / "c" / "2" / "0"  # rows 8-11 of rank 1
    data = bytearray(key.read_bytes())
    data[5] ^= 0xFF
    key.write_bytes(bytes(data))
    scanner = StoreScanner(GradientStore.open(store.path), chunk_rows=5, prefetch=prefetch)
    with pytest.raises(StoreIntegrityError, match=r"rank_1/gradients.*chunk 2"):
        _collect(scanner)


def test_bad_arguments_are_refused_before_reading(tmp_path):
    store, _, _ = _two_rank_store(tmp_path)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1; got 0"):
        StoreScanner(store, chunk_rows=0)
    with pytest.raises(ValueError, match="prefetch must be >= 0; got -1"):
        StoreScanner(store, prefetch=-1)
    with pytest.raises(KeyError, match="no module block matches 'c'"):
        StoreScanner(store, modules=["c"])
