r"""Scan a store: stream every committed row in order, in chunks, with its example id.

:class:`StoreScanner` is the public way to read a whole store for scoring: it yields
:class:`RowChunk`\ s (start row, rows ``[n, D_sel]``, example ids ``[n]``) read ahead on a
background thread (:func:`prefetch`), with every chunk's crc32c verified, so a damaged or
deleted chunk raises :class:`~lightning_bergson.store.StoreIntegrityError` instead of
reading as data.

How it reads fast: gradient stores are written uncompressed (DESIGN.md: gradients do not
compress), so a chunk file of ``rank_<r>/gradients`` is the chunk's rows as raw
little-endian bytes followed by their crc32c (schema 2). For a full-row scan the reader
``readinto``\ s those bytes straight into a ring of reused buffers and casts them into a
second ring in the scoring dtype: no per-chunk allocation (fresh pages cost more than the
copy) and no intermediate arrays. On object storage (``s3://``, ...) the same chunks are
fetched as whole objects, all the chunks of one yielded block at once (concurrent GETs), and
checked the same way: a missing object is damage, never the fill value. Whenever the layout
is anything else (another codec, sharding, a column subset), it falls back to
:meth:`GradientStore.iter_chunks`; all paths yield the same values.

Buffers are reused: a yielded tensor stays valid until ``ring - 2`` further chunks have
been read, which covers :func:`prefetch` with ``depth = ring - 2`` (one chunk being read,
``depth`` queued, one being scored).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import google_crc32c
import numpy as np
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .integrity import ChunkGuard, integrity_error
from .reader import GradientStore
from .schema import StoreIntegrityError

__all__ = ["RowChunk", "StoreScanner", "default_chunk_rows", "iter_rows", "prefetch"]

Chunk = tuple[int, torch.Tensor]
T = TypeVar("T")


class _RawArray:
    """One rank's gradient array read as raw chunk files, checksums verified if present."""

    def __init__(self, guard: ChunkGuard, root: Path, checksum: bool) -> None:
        self.guard, self.root, self.checksum = guard, root, checksum
        self.arr = guard.array
        self.per_chunk = int(self.arr.chunks[0])
        self._cached: tuple[int, np.ndarray] | None = None  # last whole chunk read

    def chunk_path(self, k: int) -> Path:
        return self.root / self.arr.metadata.encode_chunk_key((k, 0))

    def _damage(self, k: int, kind: str, detail: str = "") -> StoreIntegrityError:
        return integrity_error(self.guard.path, [self.guard.damage(k, kind, detail)])

    def _verify(self, k: int, data: np.ndarray, tail: bytes) -> None:
        """Refuse chunk ``k`` whose bytes ``data`` do not match the crc32c ``tail``."""
        frozen = data.reshape(-1).view(np.uint8)
        frozen.flags.writeable = False  # a read-only view: what the crc32c extension takes
        if google_crc32c.value(frozen) != int.from_bytes(tail, "little"):
            raise self._damage(k, "checksum")

    def _whole(self, k: int, dest: np.ndarray) -> None:
        """Chunk ``k`` (all its rows, padding included) into ``dest``, verified."""
        path = self.chunk_path(k)
        view = memoryview(dest.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as f:
                got = f.readinto(view)
                tail = f.read(5) if self.checksum else f.read(1)
        except FileNotFoundError:
            if self.guard.checked:
                raise self._damage(k, "missing") from None
            dest[...] = self.arr.metadata.fill_value  # an old store: never written
            return
        if not self.checksum:
            if got != len(view) or tail:
                raise self._damage(k, "unreadable", "its file has the wrong size")
            return
        if got != len(view) or len(tail) != 4:
            raise self._damage(k, "checksum", "its file has the wrong size")
        self._verify(k, dest, tail)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``[start, stop)`` of this rank into ``out`` ``[stop - start, D]``."""
        c = self.per_chunk
        self._fetch(range(start // c, (stop - 1) // c + 1))
        for k in range(start // c, (stop - 1) // c + 1):
            lo, hi = max(start, k * c), min(stop, (k + 1) * c)
            dest = out[lo - start : hi - start]
            if hi - lo == c:  # the whole chunk: straight into the output
                self._whole(k, dest)
                continue
            if self._cached is None or self._cached[0] != k:  # a chunk split between reads
                buf = np.empty((c, out.shape[1]), dtype=out.dtype)
                self._whole(k, buf)
                self._cached = (k, buf)
            dest[...] = self._cached[1][lo - k * c : hi - k * c]

    def _fetch(self, chunks: range) -> None:
        """Get ready to read ``chunks`` (local files are opened one by one: nothing to do)."""


class _ObjectArray(_RawArray):
    """One rank's gradient array on object storage: chunks fetched as whole objects.

    :meth:`read` gets every chunk it needs in one batch of concurrent requests; each is
    checked for its size and crc32c exactly as a local chunk file is.
    """

    def __init__(self, guard: ChunkGuard, checksum: bool) -> None:
        super().__init__(guard, Path(), checksum)
        self._fetched: dict[int, bytes | None] = {}

    def _key(self, k: int) -> str:
        key = self.arr.metadata.encode_chunk_key((k, 0))
        return f"{self.arr.path}/{key}" if self.arr.path else key

    def _fetch(self, chunks: range) -> None:
        store, proto = self.arr.store, default_buffer_prototype()

        async def get_all() -> list:
            return await asyncio.gather(*(store.get(self._key(k), proto) for k in chunks))

        got = sync(get_all())
        pairs = zip(chunks, got, strict=True)
        self._fetched = {k: None if b is None else b.to_bytes() for k, b in pairs}

    def _whole(self, k: int, dest: np.ndarray) -> None:
        data = self._fetched.pop(k, None) if k in self._fetched else self._get(k)
        if data is None:
            if self.guard.checked:
                raise self._damage(k, "missing")
            dest[...] = self.arr.metadata.fill_value  # an old store: never written
            return
        size, extra = dest.nbytes, 4 if self.checksum else 0
        if len(data) != size + extra:
            kind = "checksum" if self.checksum else "unreadable"
            raise self._damage(k, kind, "its object has the wrong size")
        body = np.frombuffer(data, dtype=dest.dtype, count=dest.size).reshape(dest.shape)
        if self.checksum:
            self._verify(k, body, data[size:])
        dest[...] = body

    def _get(self, k: int) -> bytes | None:
        self._fetch(range(k, k + 1))
        return self._fetched.pop(k)


def _raw_layout(store: GradientStore) -> list[tuple[_RawArray, int]] | None:
    """``(raw array, rows)`` per rank with rows, if every array is raw bytes (+ crc32c)."""
    if sys.byteorder != "little":
        return None
    out = []
    for guard in store.gradients.guards:
        arr = guard.array
        codecs = [type(c).__name__ for c in getattr(arr.metadata, "codecs", ())]
        endian = getattr(arr.metadata.codecs[0], "endian", None) if codecs else None
        root = getattr(arr.store, "root", None)
        raw = (
            codecs in (["BytesCodec"], ["BytesCodec", "Crc32cCodec"])
            and str(getattr(endian, "value", endian)) in ("little", "None")
            and tuple(arr.chunks) == (arr.chunks[0], store.dim)
            and arr.dtype == store.dtype
        )
        if not raw:
            return None
        checksum = codecs[-1] == "Crc32cCodec"
        if root is None:  # object storage (an FsspecStore): whole objects by key
            out.append((_ObjectArray(guard, checksum), guard.rows))
        else:
            out.append((_RawArray(guard, Path(str(root)) / arr.path, checksum), guard.rows))
    return out


def _raw_chunks(
    store: GradientStore,
    layout: list[tuple[_RawArray, int]],
    chunk_rows: int,
    dtype: torch.dtype,
    ring: int,
    span: tuple[int, int],
) -> Iterator[Chunk]:
    raw = [np.empty((chunk_rows, store.dim), dtype=store.dtype) for _ in range(ring)]
    same = torch.from_numpy(raw[0]).dtype == dtype
    if same:
        outs = [torch.from_numpy(b) for b in raw]
    else:
        outs = [torch.empty(chunk_rows, store.dim, dtype=dtype) for _ in range(ring)]
    offsets = np.concatenate([[0], np.cumsum([rows for _, rows in layout])])
    for i, start in enumerate(range(span[0], span[1], chunk_rows)):
        stop = min(start + chunk_rows, span[1])
        buf = raw[i % ring][: stop - start]  # (n, D) in the store's dtype
        for (raw_array, rows), off in zip(layout, offsets.tolist(), strict=False):
            a, b = max(start, off), min(stop, off + rows)
            if b > a:
                raw_array.read(a - off, b - off, buf[a - start : b - start])
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
    span: tuple[int, int] | None = None,
) -> Iterator[Chunk]:
    """``(start_row, rows [n, D_sel])`` over the whole store (or rows ``span``), in order.

    Args:
        store: The gradient store.
        chunk_rows: Rows per yielded chunk.
        modules: Column blocks to keep (falls back to ``iter_chunks``).
        dtype: Dtype of the yielded rows.
        ring: Reused buffers; yielded tensors are overwritten ``ring - 1`` chunks later.
        span: Rows ``(begin, end)`` to read instead of all (a rank's share of a store).

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
    begin, end = _checked_span(span, len(store))
    layout = _raw_layout(store) if modules is None else None
    if layout is None:
        cols = None if modules is None else store.columns(modules)
        for start in range(begin, end, chunk_rows):
            data = store.gradients.take(slice(start, min(start + chunk_rows, end)), cols)
            yield start, torch.from_numpy(data).to(dtype)
        return
    yield from _raw_chunks(store, layout, chunk_rows, dtype, ring, (begin, end))


def _checked_span(span: tuple[int, int] | None, rows: int) -> tuple[int, int]:
    """``span`` as ``(begin, end)`` within the committed rows; all rows when ``None``."""
    if span is None:
        return 0, rows
    begin, end = int(span[0]), int(span[1])
    if not 0 <= begin <= end <= rows:
        raise ValueError(
            f"row span {span} is not within the store's {rows} committed rows; give "
            f"0 <= begin <= end <= {rows}"
        )
    return begin, end


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` on a background thread, keeping up to ``depth`` ready ahead.

    Reading the next chunk from disk overlaps with scoring the current one; exceptions of
    the reader are raised in the consumer.

    Example:
        >>> list(prefetch(range(5)))
        [0, 1, 2, 3, 4]
    """
    box: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
        except BaseException as err:  # handed to the consumer
            box.put(_Failure(err))
        box.put(done)

    thread = threading.Thread(target=work, daemon=True, name="lightning_bergson-prefetch")
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.05)


@dataclass
class _Failure:
    error: BaseException


def default_chunk_rows(store: GradientStore) -> int:
    """One store chunk, and at least 4 MiB of float32 rows (small enough to stay in the CPU
    cache while it is scored)."""
    return max(int(store.attrs["chunk_rows"]), 2**22 // (4 * store.dim))


class RowChunk(NamedTuple):
    """Consecutive store rows ``start .. start + n``."""

    start: int
    rows: torch.Tensor  # (n, D_sel), a reused buffer: valid until the next chunk is taken
    example_ids: np.ndarray  # (n,) int64, the dataset row of each


class StoreScanner:
    """Stream every committed row of a store in order, read ahead, checksums verified.

    Args:
        store: The gradient store.
        chunk_rows: Rows per chunk (default :func:`default_chunk_rows`).
        modules: Keep only these blocks' columns (names, parents or globs).
        dtype: Dtype of the yielded rows.
        prefetch: Chunks read ahead on a background thread (0 reads in the caller's thread).
        span: Stream rows ``(begin, end)`` only (one process's share of a store).

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 2), "fc", None)]),
        ...                          chunk_rows=2) as w:
        ...     w.append(torch.arange(10.0).reshape(5, 2), example_id=range(10, 15), step=0,
        ...              epoch=0)
        >>> for c in StoreScanner(GradientStore.open(path), chunk_rows=3):
        ...     print(c.start, c.rows[:, 0].tolist(), c.example_ids.tolist())
        0 [0.0, 2.0, 4.0] [10, 11, 12]
        3 [6.0, 8.0] [13, 14]
    """

    def __init__(
        self,
        store: GradientStore,
        *,
        chunk_rows: int | None = None,
        modules: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 2,
        span: tuple[int, int] | None = None,
    ) -> None:
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0; got {prefetch}")
        self.store = store
        self.chunk_rows = chunk_rows or default_chunk_rows(store)
        self.modules = None if modules is None else list(modules)
        if self.modules is not None:
            store.columns(self.modules)  # an unknown block is refused here, not mid-scan
        self.dtype, self.prefetch = dtype, prefetch
        self.span = _checked_span(span, len(store))

    def __len__(self) -> int:
        """Number of chunks."""
        return -(-(self.span[1] - self.span[0]) // self.chunk_rows)

    def __iter__(self) -> Iterator[RowChunk]:
        ring = self.prefetch + 2  # one being read, `prefetch` queued, one being consumed
        chunks = iter_rows(
            self.store, self.chunk_rows, modules=self.modules, dtype=self.dtype, ring=ring,
            span=self.span,
        )  # fmt: skip
        ids = self.store.example_ids
        stream = prefetch(chunks, depth=self.prefetch) if self.prefetch else chunks
        for start, rows in stream:
            yield RowChunk(start, rows, ids[start : start + len(rows)])
