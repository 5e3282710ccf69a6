"""GradientStoreWriter: append rows of one rank in whole chunks from a background thread."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from .location import Location, StorePath
from .schema import (
    COLUMNS,
    DTYPES,
    OPTIONAL_COLUMNS,
    GradientStoreWriteError,
    ModuleBlock,
    Rows,
    _check_modules,
    _foreign_entries,
    _open_root_attrs,
    _read_attrs,
    _root_attrs,
    require_writable,
)

__all__ = ["GradientStoreWriter", "default_chunk_rows"]

_Task = Callable[[], None]


def _prepare_gradients(
    x: Any, dim: int, dtype: np.dtype, finite: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cast ``x`` [B, D] to ``dtype`` (clamped to its finite range); also return finite [B].

    ``finite`` (the caller's per-row test of ``x``, if it made one) is not recomputed.
    """
    big = float(np.finfo(dtype).max)
    if isinstance(x, torch.Tensor):
        x = x.detach()
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    else:
        x = np.asarray(x)
        x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"gradients must have shape [B, {dim}] (the store's row width D={dim},"
            f" the sum of module block sizes); got {tuple(x.shape)}"
        )
    if isinstance(x, torch.Tensor) and (
        x.device.type != "cpu" or x.dtype == torch.float32 or dtype == np.float32
    ):
        # torch's test, clamp and cast: on an accelerator only the stored bytes cross to the
        # host; on the CPU torch's casts are vectorized (numpy's float16 cast is ~6x slower)
        # and round alike. CPU float64 -> float16 stays in numpy, which rounds once (torch
        # goes via float32).
        if finite is None:
            finite = torch.isfinite(x).all(dim=1)
        x = x.clamp(-big, big).to(getattr(torch, dtype.name)).cpu().numpy()  # a new array
        return x, _column(finite, len(x), "bool", "finite")
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    if finite is not None:
        finite = _column(finite, len(x), "bool", "finite")
    if finite is None:
        finite = np.isfinite(x).all(axis=1)
    return np.clip(x, -big, big).astype(dtype), finite  # NaN stays NaN


def default_chunk_rows(dim: int, dtype: str, expected_rows: int | None = None) -> int:
    """Rows per chunk: about 4 MiB of gradients, fewer for a store expected to be smaller."""
    rows = max(1, min(8192, (4 << 20) // (dim * np.dtype(dtype).itemsize)))
    if expected_rows is not None and expected_rows < rows:
        rows = min(rows, max(64, 1 << max(0, expected_rows - 1).bit_length()))
    return rows


def _column(x: Any, n: int, dtype: str, name: str) -> np.ndarray:
    """Copy a per-row value to a [n] array; a scalar is broadcast to every row."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.array(x, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(
            f"{name} must have shape [{n}] (one value per gradient row); got {arr.shape}"
        )
    return arr


def _write_block(arrays: dict[str, zarr.Array], start: int, rows: Rows) -> None:
    """Write ``rows`` at row ``start`` of every array, growing the arrays to fit.

    Arrays grow geometrically (O(log N) metadata rewrites); rows past ``committed_rows`` are
    not data, and :meth:`GradientStoreWriter.close` trims the arrays to the exact row count.
    """
    stop = start + len(rows["gradients"])
    for arr in arrays.values():
        if arr.shape[0] < stop:
            arr.resize((max(stop, 2 * arr.shape[0]), *arr.shape[1:]))
    _set_rows(arrays, slice(start, stop), rows)


def _set_rows(arrays: dict[str, zarr.Array], rows_at: slice, rows: Rows) -> None:
    """``arrays[name][rows_at] = rows[name]`` for every array, all in flight at once.

    Zarr's synchronous API runs each assignment on its event loop and waits: one round trip
    (~1 ms here) per array, for the six one-value-per-row columns as for the gradients.
    Writing them concurrently costs about one. A failure is raised once every write has
    ended (the other arrays may hold the block by then); the caller does not advance the
    committed row count, so a failed block's rows are never exposed.
    """
    try:
        from zarr.core.sync import sync

        handles = [arr._async_array for arr in arrays.values()]
    except (ImportError, AttributeError):  # another zarr layout: one at a time
        for name, arr in arrays.items():
            arr[rows_at] = rows[name]
        return

    async def write_all() -> None:
        done = await asyncio.gather(
            *(h.setitem(rows_at, rows[name]) for h, name in zip(handles, arrays, strict=True)),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    sync(write_all())


def _resize_rows(arrays: dict[str, zarr.Array], num_rows: int) -> None:
    for arr in arrays.values():
        if arr.shape[0] != num_rows:
            arr.resize((num_rows, *arr.shape[1:]))


def _delete_replaced(old: Location) -> None:
    """Delete a store moved aside by ``overwrite``; failing to is not a reason to stop writing."""
    try:
        old.remove()
    except OSError as err:
        warnings.warn(
            f"could not delete the replaced gradient store {old.url} ({err}); it holds no "
            "data of the new store: delete it by hand",
            stacklevel=2,
        )


def _rank_complete(location: Location, rank: int) -> bool:
    attrs = _read_attrs(location / f"rank_{rank}")
    return bool(attrs and attrs.get("complete"))


class GradientStoreWriter:
    """Append per-example gradient rows of one rank to a Zarr v3 store.

    Args:
        path: Store directory (conventionally ``*.zarr``): a local path or a URL
            (``s3://bucket/run.zarr``, see :class:`~lightning_bergson.store.Location`).
        modules: Column blocks of a row, as made by :func:`layout_blocks`.
        dtype: ``"float16"`` (finite values clamped to +-65504) or ``"float32"``.
        rank: This writer's rank; each rank writes its own ``rank_<r>`` group.
        world_size: Number of writer ranks; the store is complete once all have closed.
        chunk_rows: Rows per chunk; default makes a gradients chunk about 4 MiB, or less when
            ``expected_rows`` says the store will be smaller.
        expected_rows: Rows this rank expects to write, if known. The arrays are sized for
            them up front (no resize while writing) and a store smaller than one default
            chunk gets one chunk of about its size (a power of two, at least 64 rows), so
            the last write is not padded to 4 MiB. A wrong guess costs one resize.
        metadata: JSON-able entries (``model``, ``projection``, ...) merged into the root attrs.
        overwrite: Replace an existing gradient store at ``path`` (never unrelated files).
        background: Write chunks on a background thread; False writes synchronously.
        max_pending_chunks: Bound on chunks queued for the background thread.
        storage_options: Options of a URL's fsspec filesystem (credentials, endpoint).

    Rank 0 must create the root before other ranks create their groups if ``overwrite``
    removes an old store (the caller places a barrier between them).

    Example:
        >>> from lightning_bergson.store import layout_blocks
        >>> blocks = layout_blocks([("fc", (2, 2), "fc", None)])
        >>> import tempfile
        >>> path = f"{tempfile.mkdtemp()}/w.zarr"
        >>> w = GradientStoreWriter(path, modules=blocks, chunk_rows=2)
        >>> w.append(np.ones((3, 4)), example_id=[0, 1, 2], step=0, epoch=0)
        >>> w.flush(), w.close()
        (3, None)
    """

    def __init__(
        self,
        path: StorePath,
        *,
        modules: list[ModuleBlock],
        dtype: str = "float16",
        rank: int = 0,
        world_size: int = 1,
        chunk_rows: int | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        background: bool = True,
        max_pending_chunks: int = 4,
        expected_rows: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        dim = _check_modules(modules)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
        if expected_rows is not None and expected_rows < 0:
            raise ValueError(f"expected_rows must be >= 0; got {expected_rows}")
        chunk_rows = chunk_rows or default_chunk_rows(dim, dtype, expected_rows)
        path = Location.of(path, storage_options)
        self._setup(path, modules, dtype, rank, world_size, chunk_rows, max_pending_chunks)
        self._initial_rows = expected_rows or 0
        attrs = _root_attrs(modules, dim, dtype, chunk_rows, world_size, metadata)
        discard = self._prepare_path(overwrite)
        try:
            if rank == 0:
                zarr.create_group(store=self.location.zarr_store(), attributes=attrs)
            self._group = zarr.create_group(
                store=(self.location / f"rank_{self.rank}").zarr_store(),
                attributes={"rank": self.rank, "committed_rows": 0, "complete": False},
            )
        except OSError as err:
            raise self._creation_error(err) from err
        self._start(background)
        # Off the caller's path (a fit's first steps run meanwhile): deleting a replaced
        # store and creating the arrays are the writer thread's first tasks, so they are
        # done before any rows are written and, at the latest, by flush() and close().
        for old in discard:
            self._submit_task(functools.partial(_delete_replaced, old))
        if self._thread is None:
            self._create_arrays()  # raises the creation error itself
        else:
            self._submit_task(self._create_arrays)

    def _setup(
        self,
        path: Location,
        modules: list[ModuleBlock],
        dtype: str,
        rank: int,
        world_size: int,
        chunk_rows: int,
        max_pending_chunks: int,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world={world_size}")
        if chunk_rows < 1 or max_pending_chunks < 1:
            raise ValueError("chunk_rows and max_pending_chunks must be >= 1")
        self.location, self.modules, self.rank = path, list(modules), rank
        self.path = path.path  # a Path for local stores, the Location of a remote one
        self.dim, self.dtype = _check_modules(modules), np.dtype(dtype)
        self.world_size, self.chunk_rows = world_size, chunk_rows
        self._max_pending = max_pending_chunks
        self._buffer: list[Rows] = []
        self._buffered = self._queued = self._committed = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._arrays: dict[str, zarr.Array] = {}
        # (example_id, step, epoch) of rows left out, in order, each once
        self._skipped: dict[tuple[int, int, int], None] = {}

    def _creation_error(self, err: OSError) -> GradientStoreWriteError:
        return GradientStoreWriteError(
            f"Cannot create a gradient store at {self.path}: {err}. Choose a writable path."
        )

    def _prepare_path(self, overwrite: bool) -> list[Location]:
        """Refuse to clobber data; with ``overwrite`` remove an old store (or our old group).

        A local old store is renamed out of the way and returned, with leftovers of earlier
        renames, for the writer thread to delete.
        """
        p, group = self.location, self.location / f"rank_{self.rank}"
        if p.exists() and (foreign := _foreign_entries(p)):
            raise FileExistsError(
                f"{p} exists and is not a gradient store (unexpected: {foreign[:5]}); "
                "refusing to use or delete it. Choose another path."
            )
        root = p / "zarr.json"
        exists = group.exists() or (self.rank == 0 and root.exists())
        if exists and not overwrite:
            raise FileExistsError(
                f"A gradient store already exists at {p}; "
                "pass overwrite=True to replace it or choose another path."
            )
        target = p if self.rank == 0 else group
        require_writable(target, with_parent=exists)
        discard = p.set_aside_leftovers() if self.rank == 0 and overwrite else []
        if exists:
            aside = target.set_aside() if self.rank == 0 else None
            if aside is None:
                target.remove()
            else:
                discard.append(aside)
        if self.rank > 0 and root.exists():
            attrs = _open_root_attrs(p)
            mine = (self.dim, self.dtype.name, self.chunk_rows, self.world_size)
            if (attrs["dim"], attrs["dtype"], attrs["chunk_rows"], attrs["world_size"]) != mine:
                raise ValueError(
                    f"rank {self.rank} layout (dim, dtype, chunk_rows, world_size)"
                    f"={mine} does not match the store at {p}"
                )
        return discard

    def _create_arrays(self) -> None:
        specs = {"gradients": self.dtype.name, **COLUMNS}
        arrays = {}
        try:
            for name, dt in specs.items():
                tail = (self.dim,) if name == "gradients" else ()
                arrays[name] = self._create_array(name, (self._initial_rows, *tail), dt)
        except OSError as err:
            raise self._creation_error(err) from err
        self._arrays = arrays

    def _create_array(self, name: str, shape: tuple[int, ...], dtype: str) -> zarr.Array:
        chunks = (self.chunk_rows, *shape[1:])
        fill = OPTIONAL_COLUMNS.get(name)
        # A crc32c checksum in every chunk, and every chunk stored even when it holds only
        # the fill value (epoch 0, finite False): a missing chunk is then always damage.
        return self._group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            compressors=(Crc32cCodec(),),
            fill_value=fill,
            config={"write_empty_chunks": True},
            dimension_names=("row", "column")[: len(shape)],  # what xarray.open_zarr reads
        )

    def _start(self, background: bool) -> None:
        if background:
            self._queue: queue.Queue[_Task | None] = queue.Queue(self._max_pending)
            self._thread = threading.Thread(target=self._worker, name="gradient-store", daemon=True)
            self._thread.start()

    @classmethod
    def reopen(
        cls,
        path: StorePath,
        *,
        rank: int = 0,
        committed_rows: int,
        background: bool = True,
        max_pending_chunks: int = 4,
        storage_options: dict[str, Any] | None = None,
    ) -> GradientStoreWriter:
        """Append to an existing store after a resume, dropping rank rows ``>= committed_rows``.

        The rank (and, from rank 0, the root) is marked incomplete again until :meth:`close`.
        """
        path = Location.of(path, storage_options)
        attrs = _open_root_attrs(path)
        modules = [ModuleBlock.from_json(m) for m in attrs["modules"]]
        self = cls.__new__(cls)
        ws, chunk_rows = attrs["world_size"], attrs["chunk_rows"]
        self._setup(path, modules, attrs["dtype"], rank, ws, chunk_rows, max_pending_chunks)
        # the rank group and the root (rank 0 rewrites its zarr.json), before anything changes
        require_writable(self.location / f"rank_{rank}", with_parent=True)
        self._open_rank_group(committed_rows)
        if rank == 0:
            self._root_group().attrs.update({"complete": False})
        self._start(background)
        self.truncate(committed_rows)
        return self

    def _open_rank_group(self, committed_rows: int) -> None:
        """Open this rank's existing group for appending and mark it incomplete."""
        where = self.location / f"rank_{self.rank}"
        if _read_attrs(where) is None:
            raise FileNotFoundError(f"{self.path} has no group rank_{self.rank} to reopen")
        self._group = zarr.open_group(where.zarr_store(), mode="r+")
        on_disk = int(self._group.attrs["committed_rows"])  # type: ignore[arg-type]
        self._arrays = {}
        for k in ("gradients", *COLUMNS):
            if k not in self._group and k in OPTIONAL_COLUMNS:  # a store from before the column
                self._arrays[k] = self._create_array(k, (on_disk,), COLUMNS[k])
                if on_disk:  # store its chunks: a chunk of committed rows is never left out
                    self._arrays[k][:on_disk] = np.full(on_disk, OPTIONAL_COLUMNS[k], COLUMNS[k])
            else:  # the array config is not stored: chunks of fill values must be written
                self._arrays[k] = self._group[k].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
        if not 0 <= committed_rows <= on_disk:
            raise ValueError(
                f"cannot resume rank {self.rank} of {self.path} at {committed_rows} rows: it has"
                f" {on_disk} committed rows (is the store older than the checkpoint?)"
            )
        self._committed = self._queued = on_disk
        old = self._group.attrs.get("skipped", [])  # type: ignore[union-attr]
        self._skipped = dict.fromkeys(tuple(int(x) for x in e) for e in old)
        self._group.attrs.update({"complete": False})

    @property
    def committed_rows(self) -> int:
        """Rows of this rank that are durably on disk."""
        return self._committed

    def append(
        self,
        gradients: Any,
        example_id: Any,
        step: Any,
        epoch: Any,
        loss: Any = None,
        advantage: Any = None,
        finite: Any = None,
    ) -> None:
        """Buffer rows ``gradients`` [B, D] with per-row ids, steps, epochs, losses, advantages.

        ``finite`` [B] may pass a per-row finiteness test already made on ``gradients``.
        """
        self._check_open()
        grads, finite = _prepare_gradients(gradients, self.dim, self.dtype, finite)
        n = len(grads)
        rows = {
            "gradients": grads,
            "finite": finite,
            "example_id": _column(example_id, n, "int64", "example_id"),
            "step": _column(step, n, "int64", "step"),
            "epoch": _column(epoch, n, "int32", "epoch"),
            "loss": _column(np.nan if loss is None else loss, n, "float32", "loss"),
            "advantage": _column(
                np.nan if advantage is None else advantage, n, "float32", "advantage"
            ),
        }
        self._buffer.append(rows)
        self._buffered += n
        if self._buffered >= self.chunk_rows - self._queued % self.chunk_rows:
            self._submit_whole_chunks()

    def _submit_whole_chunks(self) -> None:
        """Submit buffered rows up to the last chunk boundary, one chunk per write."""
        rows = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]}
        pos, n = 0, self._buffered
        while n - pos >= (need := self.chunk_rows - self._queued % self.chunk_rows):
            self._submit({k: v[pos : pos + need] for k, v in rows.items()})
            pos += need
        self._buffer = [{k: v[pos:] for k, v in rows.items()}] if pos < n else []
        self._buffered = n - pos

    def _submit(self, rows: Rows) -> None:
        start, self._queued = self._queued, self._queued + len(rows["gradients"])
        skipped = [list(s) for s in self._skipped]  # as of these rows, for the writer thread
        self._submit_task(functools.partial(self._write, start, rows, skipped))

    def record_skipped(self, example_id: Any, step: int, epoch: int) -> None:
        """Note rows deliberately not stored (e.g. non-finite ones) in this rank's attrs.

        They are written with the next committed rows and at :meth:`close`, as
        ``skipped`` ``[[example_id, step, epoch], ...]``; a repeat (a resumed run
        skipping the same row again) is kept once.
        """
        for i in np.asarray(example_id, dtype=np.int64).reshape(-1).tolist():
            self._skipped[(int(i), int(step), int(epoch))] = None

    def _submit_task(self, task: _Task) -> None:
        """Run ``task`` on the writer thread (in order), or now without one."""
        if self._thread is None:
            try:
                task()
            except Exception as err:
                self._error = err
        else:
            self._queue.put(task)
        self._raise_if_failed()

    def _write(self, start: int, rows: Rows, skipped: list[list[int]] | None = None) -> None:
        _write_block(self._arrays, start, rows)
        self._committed = start + len(rows["gradients"])
        attrs: dict[str, Any] = {"committed_rows": self._committed}
        if skipped:
            attrs["skipped"] = skipped
        self._group.attrs.update(attrs)

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drain so producers never block
                    item()
            except Exception as err:
                self._error = err
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise GradientStoreWriteError(
                f"Writing gradients to {self.path} (rank {self.rank}) failed: {self._error!r}. "
                "Free disk space or choose a writable path, then resume; rows up to "
                f"{self._committed} are on disk."
            ) from self._error

    def _check_open(self) -> None:
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError(f"the writer for {self.path} is closed")

    def flush(self) -> int:
        """Write all buffered rows, including a partial chunk; return :attr:`committed_rows`."""
        self._check_open()
        if self._buffered:
            self._submit({k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]})
            self._buffer, self._buffered = [], 0
        if self._thread is not None:
            self._queue.join()
        self._raise_if_failed()
        return self._committed

    def truncate(self, num_rows: int) -> None:
        """Drop this rank's rows ``>= num_rows`` (after flushing), e.g. to resume a checkpoint."""
        self.flush()
        if not 0 <= num_rows <= self._committed:
            raise ValueError(f"num_rows must be in [0, {self._committed}]; got {num_rows}")
        _resize_rows(self._arrays, num_rows)
        self._committed = self._queued = num_rows
        self._group.attrs.update({"committed_rows": num_rows})

    def close(self, complete: bool = True) -> None:
        """Flush, stop the thread and (if ``complete``) mark this rank complete."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._stop()
        _resize_rows(self._arrays, self._committed)
        if self._skipped:
            self._group.attrs.update({"skipped": [list(e) for e in self._skipped]})
        if complete:
            self._group.attrs.update({"complete": True})
            # Each rank marks itself before checking the others, so the last one sees all.
            done = all(_rank_complete(self.location, r) for r in range(self.world_size))
            if done and (self.location / "zarr.json").exists():
                self._root_group().attrs.update({"complete": True})

    def _root_group(self) -> zarr.Group:
        return zarr.open_group(self.location.zarr_store(), mode="r+")

    def abort(self) -> None:
        """Stop without marking complete; buffered rows that were not submitted are dropped."""
        self._buffer, self._buffered = [], 0
        self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> GradientStoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
