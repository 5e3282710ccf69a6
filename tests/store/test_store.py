"""Tests for the Zarr v3 gradient store (lightning_bergson.store)."""

from __future__ import annotations

import errno
import json
import re
import threading
import warnings
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch
import zarr

import lightning_bergson.store.writer as store_mod
from lightning_bergson.store import (
    GradientStore,
    GradientStoreWriteError,
    GradientStoreWriter,
    IncompleteStoreWarning,
    ModuleBlock,
    layout_blocks,
)

# Two heads of "attn.q" (2x3 each), an exact 4x2 "mlp" block and a 1x3 "head" block: D = 23.
BLOCKS = layout_blocks(
    [
        ("attn.q.head_0", (2, 3), "attn.q", 0),
        ("attn.q.head_1", (2, 3), "attn.q", 1),
        ("mlp.fc", (4, 2), "mlp.fc", None),
        ("lm_head", (1, 3), "lm_head", None),
    ]
)
DIM = 23
ARRAYS = {
    "gradients": None,  # dtype depends on the store
    "example_id": "int64",
    "step": "int64",
    "epoch": "int32",
    "loss": "float32",
    "finite": "bool",
    "advantage": "float32",
}


def _write(path: Path, sizes: list[int], *, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    """Append batches of the given sizes, close, and return the concatenated inputs."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"modules": BLOCKS, "chunk_rows": 8, **kwargs}
    grads, ids, steps, losses = [], [], [], []
    with GradientStoreWriter(path, **kwargs) as writer:
        start = 0
        for i, b in enumerate(sizes):
            g = torch.randn(b, DIM, generator=gen) * 3
            idx = np.arange(start, start + b) * 7 + seed
            loss = torch.rand(b, generator=gen)
            writer.append(
                g, example_id=torch.from_numpy(idx), step=[i] * b, epoch=i // 2, loss=loss
            )
            grads.append(g.numpy()), ids.append(idx), losses.append(loss.numpy())
            steps.append(np.full(b, i))
            start += b
    return {
        "gradients": np.concatenate(grads),
        "example_id": np.concatenate(ids),
        "step": np.concatenate(steps),
        "epoch": np.concatenate(steps) // 2,
        "loss": np.concatenate(losses),
    }


def _json(path: Path) -> dict:
    with path.open() as f:
        return json.load(f)


def test_layout_blocks_and_json_round_trip():
    assert [(b.offset, b.size) for b in BLOCKS] == [(0, 6), (6, 6), (12, 8), (20, 3)]
    assert BLOCKS[1] == ModuleBlock("attn.q.head_1", 6, 6, (2, 3), "attn.q", 1)
    assert [ModuleBlock.from_json(json.loads(json.dumps(b.to_json()))) for b in BLOCKS] == BLOCKS


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_rows_modules_and_chunks(tmp_path, dtype):
    sizes = [3, 5, 1, 11, 7, 2]  # 29 rows: 3 whole chunks of 8 and a partial one
    ref = _write(tmp_path / "run.zarr", sizes, dtype=dtype)
    expected = ref["gradients"].astype(dtype).astype(np.float32)
    store = GradientStore.open(tmp_path / "run.zarr")
    assert store.complete and len(store) == store.num_rows == 29
    assert store.gradients.shape == (29, DIM) and store.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(store.read(slice(None)).numpy(), expected)
    attrs = {"example_id": "example_ids", "step": "steps", "epoch": "epochs", "loss": "losses"}
    for key, attr in attrs.items():
        np.testing.assert_array_equal(getattr(store, attr), ref[key])
    assert store.finite.all() and (store.ranks == 0).all()

    rows = [28, 3, 3, 0, 17, 9, 28]
    np.testing.assert_array_equal(store.read(rows).numpy(), expected[rows])
    np.testing.assert_array_equal(store.read(5).numpy(), expected[[5]])
    np.testing.assert_array_equal(store.read(np.array([-1, 2])).numpy(), expected[[28, 2]])
    np.testing.assert_array_equal(store.gradients[4:20:3], expected[4:20:3].astype(dtype))
    np.testing.assert_array_equal(store.gradients[7], expected[7].astype(dtype))

    cases = {
        ("mlp.fc",): np.r_[12:20],
        ("attn.q",): np.r_[0:12],  # parent selects both heads
        ("attn.q.head_1", "lm_head"): np.r_[6:12, 20:23],
        ("*head_0", "lm_*"): np.r_[0:6, 20:23],  # globs
        ("lm_head", "attn.q.head_0"): np.r_[0:6, 20:23],  # store order, not request order
    }
    for modules, cols in cases.items():
        np.testing.assert_array_equal(store.columns(modules), cols)
        got = store.read(rows, modules=modules, dtype=torch.float64)
        assert got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), expected[rows][:, cols])

    for chunk in (1, 5, 8, 100, None):
        parts = list(store.iter_chunks(chunk, modules=["mlp.fc", "attn.q.head_0"]))
        assert [s for s, _ in parts] == list(range(0, 29, chunk or 8))
        full = torch.cat([t for _, t in parts]).numpy()
        np.testing.assert_array_equal(full, expected[:, np.r_[0:6, 12:20]])


def test_unknown_module_raises_key_error(tmp_path):
    _write(tmp_path / "run.zarr", [4])
    store = GradientStore.open(tmp_path / "run.zarr")
    with pytest.raises(KeyError, match=r"'decoder\.\*'.*mlp\.fc"):
        store.read([0], modules=["mlp.fc", "decoder.*"])
    with pytest.raises(IndexError):
        store.read([4])


def test_golden_on_disk_layout(tmp_path):
    path = tmp_path / "run.zarr"
    meta = {"model": "tiny", "projection": {"dim": 16, "seed": 0}, "loss_reduction": "sum"}
    _write(path, [5, 6], dtype="float16", metadata=meta)
    root = _json(path / "zarr.json")
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    attrs = root["attributes"]
    assert isinstance(attrs.pop("package_version"), str)
    assert attrs == {
        "schema_version": 2,
        "format": "lightning_bergson.gradient_store",
        "modules": [
            {
                "name": "attn.q.head_0",
                "offset": 0,
                "size": 6,
                "shape": [2, 3],
                "parent": "attn.q",
                "head": 0,
            },
            {
                "name": "attn.q.head_1",
                "offset": 6,
                "size": 6,
                "shape": [2, 3],
                "parent": "attn.q",
                "head": 1,
            },
            {
                "name": "mlp.fc",
                "offset": 12,
                "size": 8,
                "shape": [4, 2],
                "parent": "mlp.fc",
                "head": None,
            },
            {
                "name": "lm_head",
                "offset": 20,
                "size": 3,
                "shape": [1, 3],
                "parent": "lm_head",
                "head": None,
            },
        ],
        "dim": 23,
        "dtype": "float16",
        "chunk_rows": 8,
        "world_size": 1,
        "complete": True,
        "model": "tiny",
        "projection": {"dim": 16, "seed": 0},
        "loss_reduction": "sum",
    }
    assert sorted(p.name for p in path.iterdir()) == ["rank_0", "zarr.json"]
    group = _json(path / "rank_0" / "zarr.json")
    assert group["node_type"] == "group"
    assert group["attributes"] == {"rank": 0, "committed_rows": 11, "complete": True}
    names = sorted(p.name for p in (path / "rank_0").iterdir() if p.is_dir())
    assert names == sorted(ARRAYS)
    for name, dtype in ARRAYS.items():
        arr = _json(path / "rank_0" / name / "zarr.json")
        tail = [23] if name == "gradients" else []
        assert arr["node_type"] == "array" and arr["zarr_format"] == 3
        assert arr["shape"] == [11, *tail]
        assert arr["data_type"] == (dtype or "float16")
        assert arr["chunk_grid"] == {
            "name": "regular",
            "configuration": {"chunk_shape": [8, *tail]},
        }
        assert arr["chunk_key_encoding"]["configuration"]["separator"] == "/"
        assert [c["name"] for c in arr["codecs"]] == ["bytes", "crc32c"]  # no compression
    # Chunks are plain little-endian bytes and their crc32c: chunk 1 of example_id holds rows
    # 8..15 (3 written, the rest padding), then 4 checksum bytes.
    data = (path / "rank_0" / "example_id" / "c" / "1").read_bytes()
    assert len(data) == 8 * 8 + 4
    raw = np.frombuffer(data[:-4], "<i8")
    np.testing.assert_array_equal(raw[:3], np.arange(8, 11) * 7)
    assert int.from_bytes(data[-4:], "little") == google_crc32c.value(data[:-4])
    # Every chunk of the committed rows is stored, even one of fill values only (epoch 0).
    for name in ARRAYS:
        assert sorted(p.name for p in (path / "rank_0" / name / "c").iterdir()) == ["0", "1"]


def test_default_chunk_rows_targets_4mib(tmp_path):
    big = layout_blocks([("w", (1000, 1000), "w", None)])
    w = GradientStoreWriter(tmp_path / "a.zarr", modules=big, dtype="float16", background=False)
    assert w.chunk_rows == 2  # 4 MiB / (1e6 * 2 bytes)
    w.close()
    w = GradientStoreWriter(tmp_path / "b.zarr", modules=BLOCKS, dtype="float32")
    assert w.chunk_rows == 8192
    w.close()


def test_non_finite_rows_flagged_and_float16_clamped(tmp_path):
    g = torch.ones(4, DIM, dtype=torch.float64)
    g[1, 3] = float("nan")
    g[2, 5] = float("inf")
    g[3, 0] = 1e6  # finite but beyond float16
    g[3, 1] = -7e4
    for dtype in ("float16", "float32"):
        path = tmp_path / f"{dtype}.zarr"
        with GradientStoreWriter(path, modules=BLOCKS, dtype=dtype, chunk_rows=3) as w:
            w.append(g.to(torch.bfloat16), example_id=range(4), step=0, epoch=0)
        store = GradientStore.open(path)
        np.testing.assert_array_equal(store.finite, [True, False, False, True])
        rows = store.read(slice(None))
        assert torch.isnan(rows[1, 3]) and torch.isnan(rows).sum() == 1
        assert np.isnan(store.losses).all()  # loss not given
        if dtype == "float16":
            assert rows[3, 0] == 65504 and rows[3, 1] == -65504 and rows[2, 5] == 65504
        else:
            f32_max = torch.finfo(torch.float32).max  # Inf is clamped too (and flagged)
            assert rows[3, 0] == torch.tensor(1e6).bfloat16().float() and rows[2, 5] == f32_max


def test_numpy_input_and_shape_errors(tmp_path):
    with GradientStoreWriter(tmp_path / "run.zarr", modules=BLOCKS, dtype="float32") as w:
        x = np.random.default_rng(0).normal(size=(3, DIM))
        w.append(x, example_id=np.arange(3), step=np.zeros(3), epoch=[1, 1, 1])
        with pytest.raises(ValueError, match=r"shape \[B, 23\].*\(3, 22\)"):
            w.append(x[:, :22], example_id=np.arange(3), step=0, epoch=0)
        with pytest.raises(ValueError, match=r"example_id must have shape \[3\]"):
            w.append(x, example_id=[1, 2], step=0, epoch=0)
    np.testing.assert_array_equal(
        GradientStore.open(tmp_path / "run.zarr").read([0, 1, 2]), x.astype(np.float32)
    )


def test_invalid_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        GradientStoreWriter(tmp_path / "a.zarr", modules=BLOCKS, dtype="bfloat16")
    with pytest.raises(ValueError, match="collide"):
        GradientStoreWriter(tmp_path / "b.zarr", modules=BLOCKS, metadata={"dim": 3})
    with pytest.raises(ValueError, match="JSON"):
        GradientStoreWriter(tmp_path / "c.zarr", modules=BLOCKS, metadata={"model": object()})
    bad = [ModuleBlock("a", 0, 4, (2, 2), "a"), ModuleBlock("b", 5, 4, (2, 2), "b")]
    with pytest.raises(ValueError, match="contiguous offsets"):
        GradientStoreWriter(tmp_path / "d.zarr", modules=bad)


def test_existing_store_and_overwrite(tmp_path):
    path = tmp_path / "run.zarr"
    _write(path, [4])
    with pytest.raises(FileExistsError, match=r"run\.zarr.*overwrite=True.*another path"):
        GradientStoreWriter(path, modules=BLOCKS)
    ref = _write(path, [2], seed=5, overwrite=True)
    store = GradientStore.open(path)
    assert len(store) == 2
    np.testing.assert_array_equal(store.example_ids, ref["example_id"])

    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a gradient store"):
        GradientStoreWriter(other, modules=BLOCKS, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    GradientStoreWriter(empty, modules=BLOCKS).close()  # an empty directory is fine
    assert len(GradientStore.open(empty)) == 0


@pytest.mark.parametrize("background", [True, False])
def test_overwrite_moves_the_old_store_aside_and_deletes_it_by_close(tmp_path, background):
    """The old store is renamed away at once and deleted on the writer thread, before
    close returns; leftovers of a process that died before deleting one are deleted too,
    and nothing else next to the store is touched."""
    path = tmp_path / "run.zarr"
    _write(path, [4], seed=1)
    old_chunks = [x.relative_to(path) for x in path.rglob("*") if "/c/" in x.as_posix()]
    assert old_chunks
    leftover = tmp_path / ".run.zarr.replaced-0123456789ab"
    (leftover / "rank_0").mkdir(parents=True)
    (leftover / "rank_0" / "chunk").write_bytes(b"old")
    keep = [tmp_path / ".run.zarr.other", tmp_path / ".runX.zarr.replaced-1"]
    for k in keep:
        k.mkdir()
    writer = GradientStoreWriter(
        path, modules=BLOCKS, chunk_rows=8, overwrite=True, background=background
    )
    # the path holds the new store from the start: none of the old chunks are in it
    assert not any((path / c).exists() for c in old_chunks)
    writer.append(np.ones((3, DIM)), example_id=[10, 11, 12], step=0, epoch=0)
    writer.close()
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        ["run.zarr", *(k.name for k in keep)]
    )
    store = GradientStore.open(path)
    np.testing.assert_array_equal(store.example_ids, [10, 11, 12])
    np.testing.assert_array_equal(store.read([0, 1, 2]), np.ones((3, DIM), dtype=np.float16))


def test_array_creation_failure_on_the_writer_thread_is_raised_with_the_path(tmp_path, monkeypatch):
    def refuse(self, name, shape, dtype):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(GradientStoreWriter, "_create_array", refuse)
    writer = GradientStoreWriter(tmp_path / "run.zarr", modules=BLOCKS, chunk_rows=2)
    with pytest.raises(
        GradientStoreWriteError,
        match=r"Cannot create a gradient store at .*"
        r"run\.zarr.*Permission denied.*writable path",
    ):
        writer.append(np.ones((4, DIM)), example_id=[0, 1, 2, 3], step=0, epoch=0)
        writer.flush()
    writer.abort()
    with pytest.raises(GradientStoreWriteError, match="Cannot create a gradient store"):
        GradientStoreWriter(tmp_path / "b.zarr", modules=BLOCKS, background=False)


@pytest.mark.parametrize("background", [True, False])
def test_flush_truncate_and_reopen(tmp_path, background):
    path = tmp_path / "run.zarr"
    data = torch.randn(40, DIM)
    ids = np.arange(40)
    w = GradientStoreWriter(
        path, modules=BLOCKS, dtype="float32", chunk_rows=8, background=background
    )
    w.append(data[:5], ids[:5], 0, 0)
    assert w.flush() == 5 == w.committed_rows
    assert _json(path / "rank_0" / "zarr.json")["attributes"]["committed_rows"] == 5
    w.append(data[5:19], ids[5:19], 1, 0)  # refills chunk 0 (rows 5..7), chunk 1, buffers 3
    assert w.flush() == 19
    assert _json(path / "rank_0" / "zarr.json")["attributes"]["committed_rows"] == 19
    w.truncate(12)
    assert w.committed_rows == 12
    w.append(data[12:30], ids[12:30] + 1000, 2, 0)  # rewrites rows 12.. with new ids
    w.close()
    store = GradientStore.open(path)
    expected_ids = np.r_[ids[:12], ids[12:30] + 1000]
    np.testing.assert_array_equal(store.example_ids, expected_ids)
    np.testing.assert_array_equal(store.steps, [0] * 5 + [1] * 7 + [2] * 18)
    np.testing.assert_array_equal(store.read(slice(None)), data[:30])

    # Resume from a checkpoint that had 21 rows: later rows vanish, appends continue.
    w = GradientStoreWriter.reopen(path, committed_rows=21, background=background)
    assert not _json(path / "zarr.json")["attributes"]["complete"]
    w.append(data[30:40], ids[30:40], 3, 1)
    w.close()
    store = GradientStore.open(path)
    assert store.complete and len(store) == 31
    np.testing.assert_array_equal(store.example_ids, np.r_[expected_ids[:21], ids[30:40]])
    np.testing.assert_array_equal(store.read(slice(None)), torch.cat([data[:21], data[30:40]]))
    with pytest.raises(ValueError, match="31 committed rows"):
        GradientStoreWriter.reopen(path, committed_rows=32)


def test_crash_exposes_only_committed_rows(tmp_path):
    path = tmp_path / "run.zarr"
    data = torch.randn(30, DIM)
    w = GradientStoreWriter(path, modules=BLOCKS, dtype="float32", chunk_rows=8)
    w.append(data[:10], range(10), 0, 0)
    w.flush()  # 10 rows
    w.append(data[10:29], range(10, 29), 1, 0)  # rows 10..15 and 16..23 fill chunks; 5 buffered
    w.abort()
    assert w.committed_rows == 24
    with pytest.warns(IncompleteStoreWarning, match="incomplete"):
        store = GradientStore.open(path)
    assert not store.complete and len(store) == 24
    np.testing.assert_array_equal(store.example_ids, np.arange(24))
    np.testing.assert_array_equal(store.read(slice(None)), data[:24])
    with pytest.raises(RuntimeError, match="closed"):
        w.append(data[:1], [0], 0, 0)

    # Resume from the checkpoint taken at the flush (10 rows): the crashed rows are dropped.
    w = GradientStoreWriter.reopen(path, committed_rows=10)
    w.append(data[20:30], range(20, 30), 2, 0)
    w.close()
    store = GradientStore.open(path)
    assert store.complete
    np.testing.assert_array_equal(store.example_ids, np.r_[0:10, 20:30])
    np.testing.assert_array_equal(store.read(slice(None)), torch.cat([data[:10], data[20:30]]))
    assert _json(path / "rank_0" / "gradients" / "zarr.json")["shape"] == [20, DIM]


def test_context_manager_aborts_on_exception(tmp_path):
    path = tmp_path / "run.zarr"
    with pytest.raises(KeyError), GradientStoreWriter(path, modules=BLOCKS, chunk_rows=4) as w:
        w.append(torch.zeros(6, DIM), range(6), 0, 0)
        raise KeyError("boom")
    with pytest.warns(IncompleteStoreWarning):
        assert len(GradientStore.open(path)) == 4


@pytest.mark.parametrize("background", [True, False])
def test_write_failure_is_reported(tmp_path, monkeypatch, background):
    path = tmp_path / "run.zarr"
    real = store_mod._write_block
    calls = []

    def failing(arrays, start, rows):
        calls.append(start)
        if start >= 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(arrays, start, rows)

    monkeypatch.setattr(store_mod, "_write_block", failing)
    w = GradientStoreWriter(
        path, modules=BLOCKS, chunk_rows=8, background=background, max_pending_chunks=1
    )
    tail = (
        r"\)\. Free disk space or choose a writable path, then resume; rows up to 8 are on disk\.$"
    )
    with pytest.raises(GradientStoreWriteError, match=r"run\.zarr.*No space left.*" + tail):
        for i in range(20):  # the error surfaces on a later append (or on flush)
            w.append(torch.zeros(4, DIM), range(4 * i, 4 * i + 4), i, 0)
        w.flush()
    with pytest.raises(GradientStoreWriteError, match="No space"):
        w.close()
    assert w.committed_rows == 8
    assert _json(path / "rank_0" / "zarr.json")["attributes"]["committed_rows"] == 8
    w.abort()  # safe after a failure


def test_unwritable_path_fails_at_construction(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(GradientStoreWriteError, match=r"file\.txt.*writable"):
        GradientStoreWriter(blocker / "run.zarr", modules=BLOCKS)
    with pytest.raises(FileExistsError, match="not a gradient store"):
        GradientStoreWriter(blocker, modules=BLOCKS, overwrite=True)


def test_two_ranks_merge_in_rank_order(tmp_path):
    path = tmp_path / "run.zarr"
    kw = {"modules": BLOCKS, "dtype": "float32", "world_size": 2, "chunk_rows": 8}
    w0 = GradientStoreWriter(path, rank=0, metadata={"model": "m"}, **kw)
    w1 = GradientStoreWriter(path, rank=1, **kw)
    g0, g1 = torch.randn(10, DIM), torch.randn(13, DIM)
    w1.append(g1, range(100, 113), 0, 0)
    w0.append(g0, range(10), 0, 0)
    w0.close()
    assert not _json(path / "zarr.json")["attributes"]["complete"]
    with pytest.warns(IncompleteStoreWarning):
        partial = GradientStore.open(path)  # rank 1 has one whole chunk on disk
    np.testing.assert_array_equal(partial.ranks, [0] * 10 + [1] * 8)
    w1.close()
    store = GradientStore.open(path)
    assert store.complete and store.attrs["model"] == "m" and len(store) == 23
    np.testing.assert_array_equal(store.ranks, [0] * 10 + [1] * 13)
    np.testing.assert_array_equal(store.example_ids, np.r_[0:10, 100:113])
    np.testing.assert_array_equal(store.read(slice(None)), torch.cat([g0, g1]))
    np.testing.assert_array_equal(store.read([12, 9, 10]), torch.cat([g1[[2]], g0[[9]], g1[[0]]]))
    with pytest.raises(ValueError, match="does not match"):
        GradientStoreWriter(path, rank=1, overwrite=True, **{**kw, "chunk_rows": 4})


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.zarr"):
        GradientStore.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain is not a gradient store: it has no zarr\.json"):
        GradientStore.open(tmp_path / "plain")
    (tmp_path / "README.md").write_text("notes")
    with pytest.raises(ValueError, match=r"README\.md is a file, not a gradient store"):
        GradientStore.open(tmp_path / "README.md")
    zarr.create_group(store=str(tmp_path / "other.zarr"), attributes={"x": 1})
    with pytest.raises(ValueError, match=r"other\.zarr is not a lightning_bergson gradient store"
                       r" \(its zarr\.json has no format="):  # fmt: skip
        GradientStore.open(tmp_path / "other.zarr")
    scores = {"format": "lightning_bergson.scores"}
    zarr.create_group(store=str(tmp_path / "s.zarr"), attributes=scores)
    with pytest.raises(ValueError, match=r"s\.zarr is not a lightning_bergson gradient store: it "
                       r"holds a score array"):  # fmt: skip
        GradientStore.open(tmp_path / "s.zarr")
    path = tmp_path / "run.zarr"
    _write(path, [2])
    root = _json(path / "zarr.json")
    root["attributes"]["schema_version"] = 99
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(ValueError, match=r"schema_version 99.*upgrade"):
        GradientStore.open(path)


def test_subdir(tmp_path):
    _write(tmp_path / "run.zarr", [2])
    store = GradientStore.open(tmp_path / "run.zarr")
    sub = store.subdir("normalizers")
    assert sub == tmp_path / "run.zarr" / "normalizers" and sub.is_dir()
    assert store.subdir("normalizers") == sub
    with pytest.raises(ValueError):
        store.subdir("rank_0")
    assert len(GradientStore.open(tmp_path / "run.zarr")) == 2  # aux dirs do not disturb reads


def test_store_without_the_advantage_column_opens_and_resumes(tmp_path):
    """Stores written before the ``advantage`` column read it as NaN and accept more rows."""
    import shutil

    path = tmp_path / "old.zarr"
    _write(path, [5, 6], dtype="float32")
    shutil.rmtree(path / "rank_0" / "advantage")
    store = GradientStore.open(path)
    assert store.advantages.shape == (11,) and bool(np.isnan(store.advantages).all())
    assert store.advantages.dtype == np.float32  # the column's dtype, also when filled
    w = GradientStoreWriter.reopen(path, committed_rows=11, background=False)
    w.append(np.ones((2, store.dim)), example_id=[50, 51], step=3, epoch=0, advantage=[0.5, -2])
    w.close()
    store = GradientStore.open(path)
    assert store.num_rows == 13
    np.testing.assert_array_equal(store.advantages[-2:], [0.5, -2.0])
    assert bool(np.isnan(store.advantages[:11]).all())


# ------------------------------------------- writer contract (from surviving mutants)


def _attrs(path: Path, rank: int = 0) -> dict:
    return _json(path / f"rank_{rank}" / "zarr.json")["attributes"]


def _shape(path: Path, array: str = "gradients") -> list[int]:
    return _json(path / "rank_0" / array / "zarr.json")["shape"]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_rows_are_rounded_once_to_the_store_dtype(tmp_path, kind):
    # 1 + 2^-11 + 2^-40 lies just above the midpoint of the float16 neighbours 1 and
    # 1 + 2^-10, so it rounds up; through float32 first it lands on the midpoint and ties
    # to even (down to 1).
    x = np.full((2, DIM), 1 + 2.0**-11 + 2.0**-40)
    # 2^60 + 2^36 + 1 lies just above the midpoint of the float32 neighbours 2^60 and
    # 2^60 + 2^37 (their spacing there is 2^37); through float64 it lands on the midpoint.
    ints = np.full((2, DIM), 2**60 + 2**36 + 1, dtype=np.int64)
    half = np.full((2, DIM), 65504, dtype=np.float16)  # float16 input, float32 store
    cases = [("float16", x, 1 + 2.0**-10), ("float32", ints, 2.0**60 + 2.0**37)]
    cases += [("float32", half, 65504.0)]
    for i, (dtype, rows, want) in enumerate(cases):
        path = tmp_path / f"{i}.zarr"
        rows = torch.from_numpy(rows) if kind == "torch" else rows
        w = GradientStoreWriter(path, modules=BLOCKS, dtype=dtype, background=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow in a cast along the way
            w.append(rows, example_id=[0, 1], step=0, epoch=0)
        w.close()
        got = GradientStore.open(path).gradients[:]
        assert got.dtype == np.dtype(dtype)
        assert (got.astype(np.float64) == want).all(), (dtype, got[0, 0], want)


def test_a_given_finite_test_is_not_recomputed(tmp_path):
    path = tmp_path / "run.zarr"
    x = torch.ones(3, DIM)  # all finite: the caller's test is stored as it was given
    with GradientStoreWriter(path, modules=BLOCKS, chunk_rows=4, background=False) as w:
        w.append(x, example_id=[0, 1, 2], step=0, epoch=0, finite=[True, False, True])
        w.append(x.numpy(), example_id=[3, 4, 5], step=0, epoch=0, finite=torch.tensor(False))
        with pytest.raises(ValueError, match=r"^finite must have shape \[3\] \(one value"):
            w.append(x, example_id=[0, 1, 2], step=0, epoch=0, finite=[True, True])
    store = GradientStore.open(path)
    np.testing.assert_array_equal(store.finite, [True, False, True, False, False, False])
    np.testing.assert_array_equal(store.read(slice(None)), torch.ones(6, DIM))


@pytest.mark.parametrize("column", ["example_id", "step", "epoch", "loss", "advantage"])
def test_a_column_of_the_wrong_length_is_named(tmp_path, column):
    kw = {"example_id": [0, 1, 2], "step": 0, "epoch": 0, column: [1, 2]}
    w = GradientStoreWriter(tmp_path / "run.zarr", modules=BLOCKS, background=False)
    with pytest.raises(ValueError, match=rf"^{column} must have shape \[3\] \(one value"):
        w.append(torch.ones(3, DIM), **kw)
    w.close()


def test_default_chunk_rows_closed_form(tmp_path):
    # 4 MiB of gradients per chunk, at most 8192 rows and at least 1; a smaller expected
    # store gets the next power of two >= its rows, at least 64
    assert store_mod.default_chunk_rows(23, "float32") == 8192
    assert store_mod.default_chunk_rows(1000, "float32") == 4194304 // 4000 == 1048
    assert store_mod.default_chunk_rows(2**21 + 1, "float16") == 1  # one row > 4 MiB
    cases = {0: 64, 1: 64, 64: 64, 65: 128, 100: 128, 3000: 4096, 8191: 8192, 9000: 8192}
    for expected, rows in cases.items():
        assert store_mod.default_chunk_rows(23, "float32", expected) == rows, expected
    for expected, rows in {1000: 1024, 1040: 1048, 2000: 1048}.items():
        assert store_mod.default_chunk_rows(1000, "float32", expected) == rows, expected
    for expected, rows in {None: 8192, 0: 64, 100: 128}.items():
        w = GradientStoreWriter(tmp_path / f"{expected}.zarr", modules=BLOCKS,
                                dtype="float32", expected_rows=expected)  # fmt: skip
        assert w.chunk_rows == rows
        w.close()
    with pytest.raises(ValueError, match=r"^expected_rows must be >= 0; got -1$"):
        GradientStoreWriter(tmp_path / "bad.zarr", modules=BLOCKS, expected_rows=-1)


def test_arrays_are_sized_up_front_and_grow_by_doubling(tmp_path):
    path = tmp_path / "run.zarr"
    kw = {"modules": BLOCKS, "dtype": "float32", "chunk_rows": 4, "background": False}
    w = GradientStoreWriter(path, **kw)
    assert _shape(path) == [0, DIM] and _shape(path, "example_id") == [0]
    shapes = []
    for i in range(5):  # one whole chunk per append, written at once
        w.append(torch.full((4, DIM), float(i)), range(4 * i, 4 * i + 4), i, 0)
        shapes.append(_shape(path, "step")[0])
    assert shapes == [4, 8, 16, 16, 32]  # max(rows, 2 * old rows) when they do not fit
    w.close()
    assert _shape(path) == [20, DIM] and _shape(path, "step") == [20]
    w = GradientStoreWriter(tmp_path / "sized.zarr", expected_rows=8, **kw)
    assert _shape(tmp_path / "sized.zarr") == [8, DIM]
    w.append(torch.ones(8, DIM), range(8), 0, 0)
    assert _shape(tmp_path / "sized.zarr") == [8, DIM]  # no resize while writing
    w.close()


def test_a_whole_chunk_is_written_as_soon_as_it_is_complete(tmp_path):
    path = tmp_path / "run.zarr"
    data = torch.randn(15, DIM)
    w = GradientStoreWriter(path, modules=BLOCKS, dtype="float32", chunk_rows=4,
                            background=False)  # fmt: skip
    committed = []
    for start, stop, flush in [(0, 4, 0), (4, 6, 1), (6, 8, 0), (8, 14, 0), (14, 15, 0)]:
        w.append(data[start:stop], range(start, stop), 0, 0)
        if flush:
            w.flush()
        committed.append((w.committed_rows, _attrs(path)["committed_rows"]))
    # chunk 0 at once; 2 rows flushed; the 2 rows that fill chunk 1 at once; chunk 2 of the
    # next 6 rows at once (2 buffered); one more buffered row writes nothing
    assert committed == [(4, 4), (6, 6), (8, 8), (12, 12), (12, 12)]
    assert w.flush() == 15
    w.close()
    store = GradientStore.open(path)
    np.testing.assert_array_equal(store.read(slice(None)), data)
    np.testing.assert_array_equal(store.example_ids, np.arange(15))


def test_skipped_rows_are_recorded_with_the_next_rows_at_close_and_after_reopen(tmp_path):
    path = tmp_path / "run.zarr"
    w = GradientStoreWriter(path, modules=BLOCKS, chunk_rows=4, background=False)
    w.record_skipped(np.array([[3, 1], [3, 7]]), step=2, epoch=1)
    w.append(torch.ones(4, DIM), range(4), 2, 1)  # one whole chunk: written with the records
    assert _attrs(path)["skipped"] == [[3, 2, 1], [1, 2, 1], [7, 2, 1]]
    w.record_skipped(5, step=4, epoch=0)
    w.record_skipped(torch.tensor([3]), step=2, epoch=1)  # a repeat is kept once
    w.close()
    assert _attrs(path)["skipped"] == [[3, 2, 1], [1, 2, 1], [7, 2, 1], [5, 4, 0]]
    assert _attrs(path)["complete"] is True
    w = GradientStoreWriter.reopen(path, committed_rows=4, background=False)
    assert _attrs(path)["complete"] is False  # the rank too, not only the root
    w.record_skipped([9], step=5, epoch=1)
    w.close()
    assert _attrs(path)["skipped"] == [[3, 2, 1], [1, 2, 1], [7, 2, 1], [5, 4, 0], [9, 5, 1]]


def test_the_writer_thread_is_a_daemon_named_for_the_store(tmp_path):
    path = tmp_path / "run.zarr"
    for reopen in (False, True):
        before = set(threading.enumerate())
        if reopen:
            w = GradientStoreWriter.reopen(path, committed_rows=2)
        else:
            w = GradientStoreWriter(path, modules=BLOCKS)  # background by default
        new = set(threading.enumerate()) - before
        ours = [t for t in new if not t.name.startswith(("asyncio", "zarr"))]  # not zarr's I/O
        seen = [(t.name, t.daemon) for t in ours]
        w.append(torch.ones(2, DIM), [0, 1], 0, 0)
        w.close()  # before asserting: a non-daemon thread left running would hang pytest
        assert seen == [("gradient-store", True)]
        assert not any(t.is_alive() for t in ours)
    assert len(GradientStore.open(path)) == 4


def test_a_reopened_float16_store_clamps_to_float16(tmp_path):
    path = tmp_path / "run.zarr"
    GradientStoreWriter(path, modules=BLOCKS, dtype="float16").close()
    w = GradientStoreWriter.reopen(path, committed_rows=0, background=False)
    w.append(torch.full((2, DIM), 1e6), [0, 1], 0, 0)
    w.close()
    store = GradientStore.open(path)
    assert store.dtype == np.float16 and (store.gradients[:] == 65504).all()
    assert store.finite.all()


def test_writer_argument_errors_name_the_fix(tmp_path):
    p = tmp_path / "run.zarr"
    with pytest.raises(ValueError, match=r"^need 0 <= rank < world_size; got rank=2, world=2$"):
        GradientStoreWriter(p, modules=BLOCKS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        GradientStoreWriter(p, modules=BLOCKS, rank=0, world_size=0)
    for kw in ({"chunk_rows": -1}, {"max_pending_chunks": 0}):
        with pytest.raises(ValueError, match=r"^chunk_rows and max_pending_chunks must be >= 1$"):
            GradientStoreWriter(p, modules=BLOCKS, **kw)
    with pytest.raises(ValueError, match="apply to URLs only"):
        GradientStoreWriter(p, modules=BLOCKS, storage_options={"anon": True})
    w = GradientStoreWriter(p, modules=BLOCKS, chunk_rows=1, dtype="float32", background=False)
    w.append(torch.arange(3.0)[:, None].expand(3, DIM), [0, 1, 2], 0, 0)
    with pytest.raises(ValueError, match=r"^num_rows must be in \[0, 3\]; got 4$"):
        w.truncate(4)
    w.truncate(0)
    assert w.committed_rows == 0 and _attrs(p)["committed_rows"] == 0
    w.append(torch.full((2, DIM), 7.0), [5, 6], 1, 0)
    w.truncate(1)
    assert _attrs(p)["committed_rows"] == 1
    w.close()
    np.testing.assert_array_equal(
        GradientStore.open(p).read(slice(None)), torch.full((1, DIM), 7.0)
    )
    with pytest.raises(ValueError, match="apply to URLs only"):
        GradientStoreWriter.reopen(p, committed_rows=0, storage_options={"anon": True})
    two = tmp_path / "two.zarr"  # rank 1 of 2 never wrote
    GradientStoreWriter(two, modules=BLOCKS, world_size=2, background=False).close()
    with pytest.raises(FileNotFoundError, match=r"^\S+two\.zarr has no group rank_1 to reopen$"):
        GradientStoreWriter.reopen(two, rank=1, committed_rows=0)
    w = GradientStoreWriter.reopen(p, committed_rows=0, background=False)  # 0 rows is a resume
    w.close()
    assert len(GradientStore.open(p)) == 0


def test_existing_paths_are_refused_with_the_whole_reason(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in "gfedcba":
        (junk / name).write_text("x")
    want = (f"{junk} exists and is not a gradient store (unexpected: ['a', 'b', 'c', 'd', "
            "'e']); refusing to use or delete it. Choose another path.")  # fmt: skip
    with pytest.raises(FileExistsError, match=f"^{re.escape(want)}$"):
        GradientStoreWriter(junk, modules=BLOCKS)
    path = tmp_path / "run.zarr"
    kw = {"modules": BLOCKS, "world_size": 2, "background": False}
    GradientStoreWriter(path, rank=1, **kw).close()  # rank 1 may come before rank 0
    GradientStoreWriter(path, rank=0, **kw).close()
    assert GradientStore.open(path).complete
    want = (f"A gradient store already exists at {path}; pass overwrite=True to replace it or "
            "choose another path.")  # fmt: skip
    for rank in (0, 1):  # rank 1 finds its own group
        with pytest.raises(FileExistsError, match=f"^{re.escape(want)}$"):
            GradientStoreWriter(path, rank=rank, **kw)


def test_a_read_only_parent_is_refused_before_overwrite_or_reopen(tmp_path, monkeypatch):
    import lightning_bergson.store.schema as schema

    path = tmp_path / "run.zarr"
    ref = _write(path, [5])
    real = schema.os.access
    for locked in (tmp_path, path):  # the store's parent (overwrite), rank_0's (reopen)
        monkeypatch.setattr(schema.os, "access", lambda p, m, d=locked: Path(p) != d and real(p, m))
        with pytest.raises(
            GradientStoreWriteError, match=rf"{re.escape(str(locked))} is read-only"
        ):
            if locked == tmp_path:
                GradientStoreWriter(path, modules=BLOCKS, overwrite=True)
            else:
                GradientStoreWriter.reopen(path, committed_rows=0)
        monkeypatch.setattr(schema.os, "access", real)
        store = GradientStore.open(path)  # nothing was changed
        assert store.complete and len(store) == 5
        np.testing.assert_array_equal(store.example_ids, ref["example_id"])


def test_a_failed_group_creation_says_what_to_do(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.zarr, "create_group", full)
    path = tmp_path / "run.zarr"
    want = (f"Cannot create a gradient store at {path}: [Errno 28] No space left on device. "
            "Choose a writable path.")  # fmt: skip
    with pytest.raises(GradientStoreWriteError, match=f"^{re.escape(want)}$"):
        GradientStoreWriter(path, modules=BLOCKS)


def test_arrays_state_their_fill_values_and_dimension_names(tmp_path):
    path = tmp_path / "run.zarr"
    _write(path, [3], dtype="float32")
    fills = {"gradients": 0.0, "example_id": 0, "step": 0, "epoch": 0, "loss": 0.0,
             "finite": False, "advantage": "NaN"}  # fmt: skip
    for name, fill in fills.items():
        arr = _json(path / "rank_0" / name / "zarr.json")
        assert arr["fill_value"] == fill, name
        assert arr["dimension_names"] == (["row", "column"] if name == "gradients" else ["row"])


def test_reopening_an_old_store_stores_every_chunk_of_the_new_column(tmp_path):
    import shutil

    from lightning_bergson.store import verify_store

    path = tmp_path / "old.zarr"
    _write(path, [5, 6], dtype="float32")  # 11 rows: chunks 0 and 1 of 8 rows
    shutil.rmtree(path / "rank_0" / "advantage")
    GradientStoreWriter.reopen(path, committed_rows=11, background=False).close()
    assert sorted(p.name for p in (path / "rank_0" / "advantage" / "c").iterdir()) == ["0", "1"]
    assert verify_store(path, progress=False).ok


def test_a_replaced_store_that_cannot_be_deleted_warns_and_the_new_store_is_written(
    tmp_path, monkeypatch
):
    from lightning_bergson.store.location import Location

    path = tmp_path / "run.zarr"
    _write(path, [4], seed=1)
    real_remove = Location.remove

    def refuse_aside(self):
        if ".replaced-" in self.url:
            raise OSError(errno.EACCES, "Permission denied")
        real_remove(self)

    monkeypatch.setattr(Location, "remove", refuse_aside)
    with pytest.warns(
        UserWarning,
        match=r"could not delete the replaced gradient store .*"
        r"\.run\.zarr\.replaced-.*Permission denied",
    ):
        ref = _write(path, [3], seed=2, overwrite=True)
    np.testing.assert_array_equal(GradientStore.open(path).example_ids, ref["example_id"])


def test_a_failing_array_write_among_the_concurrent_ones_is_raised_and_committed_rows_stay(
    tmp_path, monkeypatch
):
    # The rows of a chunk go to all arrays at once; a failure of any one of them (here the
    # loss column of the second chunk) must surface as the writer's error, with the rows
    # committed before it intact and readable.
    from zarr.core.array import AsyncArray

    real = AsyncArray.setitem
    fail = {"on": False}

    async def setitem(self, selection, value, *args, **kwargs):
        if fail["on"] and self.basename == "loss":
            raise OSError(errno.EIO, "Input/output error")
        return await real(self, selection, value, *args, **kwargs)

    monkeypatch.setattr(AsyncArray, "setitem", setitem)
    path = tmp_path / "run.zarr"
    w = GradientStoreWriter(path, modules=BLOCKS, chunk_rows=8, background=False)
    g = torch.randn(8, DIM)
    w.append(g, example_id=range(8), step=0, epoch=0, loss=torch.arange(8.0))
    w.flush()
    fail["on"] = True
    with pytest.raises(GradientStoreWriteError, match=r"run\.zarr.*Input/output error"):
        w.append(torch.ones(8, DIM), example_id=range(8, 16), step=1, epoch=0)
        w.flush()
    assert w.committed_rows == 8
    w.abort()
    monkeypatch.setattr(AsyncArray, "setitem", real)
    with pytest.warns(IncompleteStoreWarning):
        store = GradientStore.open(path)
    assert len(store) == 8
    np.testing.assert_array_equal(store.gradients[:], g.numpy().astype(np.float16))
    np.testing.assert_array_equal(store.losses, np.arange(8.0, dtype=np.float32))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("source", ["float32", "float64"])
def test_tensor_and_numpy_rows_are_stored_byte_for_byte_alike(tmp_path, dtype, source):
    # Torch tensors take a torch cast, numpy arrays numpy's clip and cast: the stored bytes
    # must not depend on which, including NaN, +-inf, float16 overflow (clamped to +-65504),
    # the float16 boundary itself and subnormals.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6, DIM, generator=gen) * 10.0 ** torch.arange(-8, 4, 2)[:, None]).to(
        getattr(torch, source)
    )
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 65504, 65520, -7e4])
    x[1, :4] = torch.tensor([6e-8, 3e-8, -5.9e-8, 1e-45])
    got = {}
    for kind, rows in [("torch", x), ("numpy", x.numpy())]:
        path = tmp_path / f"{kind}.zarr"
        with GradientStoreWriter(path, modules=BLOCKS, dtype=dtype, background=False) as w:
            w.append(rows, example_id=range(6), step=0, epoch=0)
        store = GradientStore.open(path)
        got[kind] = (store.gradients[:], store.finite)
    assert got["torch"][0].tobytes() == got["numpy"][0].tobytes()
    np.testing.assert_array_equal(got["torch"][1], got["numpy"][1])
    np.testing.assert_array_equal(got["torch"][1], [False, True, True, True, True, True])


def test_rows_are_set_one_array_at_a_time_where_arrays_have_no_async_side():
    # Arrays without zarr's async handle (another zarr layout; here numpy arrays) are
    # assigned one by one: the same rows land in the same places.
    arrays = {"gradients": np.zeros((4, 2)), "example_id": np.zeros(4, dtype=np.int64)}
    rows = {"gradients": np.ones((2, 2)), "example_id": np.array([5, 6])}
    store_mod._set_rows(arrays, slice(1, 3), rows)
    np.testing.assert_array_equal(arrays["gradients"], [[0, 0], [1, 1], [1, 1], [0, 0]])
    np.testing.assert_array_equal(arrays["example_id"], [0, 5, 6, 0])


def test_a_given_finite_column_with_numpy_rows(tmp_path):
    path = tmp_path / "run.zarr"
    x = np.ones((3, DIM), dtype=np.float32)
    with GradientStoreWriter(path, modules=BLOCKS, chunk_rows=4, background=False) as w:
        w.append(x, example_id=[0, 1, 2], step=0, epoch=0, finite=[True, False, True])
        with pytest.raises(ValueError) as err:
            w.append(x, example_id=[3, 4, 5], step=0, epoch=0, finite=[True, True])
        assert str(err.value).startswith("finite must have shape [3] (one value")
    np.testing.assert_array_equal(GradientStore.open(path).finite, [True, False, True])
