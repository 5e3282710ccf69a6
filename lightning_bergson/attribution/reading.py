"""Fast sequential reads of whole store rows into reused buffers (the scan's input).

Gradient stores are written uncompressed (DESIGN.md: gradients do not compress), so a
chunk file of ``rank_<r>/gradients`` is the chunk's rows as raw little-endian bytes. For
a full-row scan the reader ``readinto``\\ s those bytes straight into a ring of reused
buffers and casts them into a second ring in the scoring dtype: no per-chunk allocation
(fresh pages cost more than the copy) and no intermediate arrays. Whenever the layout is
anything else (another codec, sharding, non-local storage, a column subset), it falls back
to :meth:`GradientStore.iter_chunks`; both yield the same values.

Buffers are reused: a yielded tensor stays valid until ``ring - 2`` further chunks have
been read, which covers :func:`~lightning_bergson.attribution.scoring.prefetch` with
``depth = ring - 2`` (one chunk being read, ``depth`` queued, one being scored).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from ..store import GradientStore

__all__ = ["iter_rows"]

Chunk = tuple[int, torch.Tensor]


def _raw_layout(store: GradientStore) -> list[tuple[zarr.Array, Path, int]] | None:
    """``(array, directory, rows)`` per rank with rows, if every array is raw bytes."""
    if sys.byteorder != "little":
        return None
    counts = np.bincount(store.ranks, minlength=int(store.attrs["world_size"]))
    out = []
    for rank, rows in enumerate(counts.tolist()):
        if rows == 0:
            continue
        arr = zarr.open_array(str(store.path / f"rank_{rank}" / "gradients"), mode="r")
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        root = getattr(arr.store, "root", None)
        raw = (
            len(codecs) == 1
            and type(codecs[0]).__name__ == "BytesCodec"
            and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None")
            and tuple(arr.chunks) == (arr.chunks[0], store.dim)
            and root is not None
            and arr.dtype == store.dtype
        )
        if not raw:
            return None
        out.append((arr, Path(str(root)) / arr.path, rows))
    return out


def _read_rows(arr: zarr.Array, root: Path, start: int, stop: int, out: np.ndarray) -> None:
    """Rows ``[start, stop)`` of one rank's array into ``out`` ``[stop - start, D]``."""
    per_chunk = int(arr.chunks[0])
    row_bytes = out.shape[1] * out.itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    for k in range(start // per_chunk, (stop - 1) // per_chunk + 1):
        lo, hi = max(start, k * per_chunk), min(stop, (k + 1) * per_chunk)
        dest = view[(lo - start) * row_bytes : (hi - start) * row_bytes]
        path = root / arr.metadata.encode_chunk_key((k, 0))
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek((lo - k * per_chunk) * row_bytes)
                if f.readinto(dest) != len(dest):
                    raise OSError(f"{path} is shorter than its chunk")
        except FileNotFoundError:  # never written: every value is the fill value
            out[lo - start : hi - start] = arr.metadata.fill_value


def _raw_chunks(
    store: GradientStore,
    layout: list[tuple[zarr.Array, Path, int]],
    chunk_rows: int,
    dtype: torch.dtype,
    ring: int,
) -> Iterator[Chunk]:
    raw = [np.empty((chunk_rows, store.dim), dtype=store.dtype) for _ in range(ring)]
    same = torch.from_numpy(raw[0]).dtype == dtype
    if same:
        outs = [torch.from_numpy(b) for b in raw]
    else:
        outs = [torch.empty(chunk_rows, store.dim, dtype=dtype) for _ in range(ring)]
    offsets = np.concatenate([[0], np.cumsum([rows for _, _, rows in layout])])
    for i, start in enumerate(range(0, len(store), chunk_rows)):
        stop = min(start + chunk_rows, len(store))
        buf = raw[i % ring][: stop - start]  # (n, D) in the store's dtype
        for (arr, root, rows), off in zip(layout, offsets.tolist(), strict=False):
            a, b = max(start, off), min(stop, off + rows)
            if b > a:
                _read_rows(arr, root, a - off, b - off, buf[a - start : b - start])
        out = outs[i % ring][: stop - start]
        if not same:
            out.copy_(torch.from_numpy(buf))  # (n, D) cast into a reused buffer
        yield start, out


def iter_rows(
    store: GradientStore,
    chunk_rows: int,
    *,
    modules: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    ring: int = 4,
) -> Iterator[Chunk]:
    """``(start_row, rows [n, D_sel])`` over the whole store, in order.

    Args:
        store: The gradient store.
        chunk_rows: Rows per yielded chunk.
        modules: Column blocks to keep (falls back to ``iter_chunks``).
        dtype: Dtype of the yielded rows.
        ring: Reused buffers; yielded tensors are overwritten ``ring - 1`` chunks later.

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 3), "fc", None)]),
        ...                          chunk_rows=2) as w:
        ...     w.append(torch.arange(15.0).reshape(5, 3), example_id=range(5), step=0, epoch=0)
        >>> [(s, c[:, 0].tolist()) for s, c in iter_rows(GradientStore.open(path), 3)]
        [(0, [0.0, 3.0, 6.0]), (3, [9.0, 12.0])]
    """
    layout = _raw_layout(store) if modules is None else None
    if layout is None:
        yield from store.iter_chunks(chunk_rows, modules=modules, dtype=dtype)
        return
    yield from _raw_chunks(store, layout, chunk_rows, dtype, ring)
