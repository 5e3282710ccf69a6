"""Tests for the Zarr v3 gradient store (lightning_bergson.store)."""

from __future__ import annotations

import errno
import json
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
    with pytest.raises(GradientStoreWriteError, match=r"run\.zarr.*No space left.*Free disk space"):
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
