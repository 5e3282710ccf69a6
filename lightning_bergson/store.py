"""Zarr v3 gradient store: one append-only group of rows per writer rank.

Layout of a store directory (see DESIGN.md, section 2)::

    run.zarr/zarr.json            root attrs: format, schema_version, modules, dim, dtype, ...
    run.zarr/rank_<r>/            attrs {"rank", "committed_rows", "complete"}
        gradients [N_r, D]        float16 | float32, chunks (chunk_rows, D), uncompressed
        example_id, step [N_r] int64; epoch [N_r] int32; loss [N_r] float32; finite [N_r] bool

Rows are buffered and written in whole chunks by a background thread; a rank's
``committed_rows`` attribute only advances after its rows are on disk, so a reader after a
crash never sees rows that were not written. Metadata is JSON; nothing is pickled.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run.zarr"
    >>> blocks = layout_blocks([("fc", (4, 3), "fc", None)])
    >>> with GradientStoreWriter(path, modules=blocks) as w:
    ...     w.append(torch.randn(5, 12), example_id=range(5), step=[0] * 5, epoch=[0] * 5)
    >>> GradientStore.open(path).read([4, 0], modules=["fc"]).shape
    torch.Size([2, 12])
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import json
import math
import queue
import shutil
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

__all__ = [
    "GradientStore",
    "GradientStoreWriteError",
    "GradientStoreWriter",
    "IncompleteStoreWarning",
    "LazyRows",
    "ModuleBlock",
    "layout_blocks",
]

FORMAT = "lightning_bergson.gradient_store"
SCHEMA_VERSION = 1
DTYPES = ("float16", "float32")
# Per-row columns stored next to `gradients`, with their on-disk dtype.
COLUMNS = {
    "example_id": "int64",
    "step": "int64",
    "epoch": "int32",
    "loss": "float32",
    "finite": "bool",
}
FIXED_KEYS = ("schema_version", "package_version", "format", "modules", "dim", "dtype")
FIXED_KEYS += ("chunk_rows", "world_size", "complete")
_AUX_DIRS = ("normalizers", "preconditioners")

Rows = dict[str, np.ndarray]  # column name -> [n, ...] array, always including "gradients"


class GradientStoreWriteError(RuntimeError):
    """Writing rows to the store failed (disk full, permission denied, ...)."""


class IncompleteStoreWarning(UserWarning):
    """The store was opened before every rank closed it; only committed rows are exposed."""


@dataclasses.dataclass(frozen=True)
class ModuleBlock:
    """A contiguous block of columns in a gradient row, owned by one module (or one head).

    Example:
        >>> ModuleBlock("attn.head_1", offset=16, size=16, shape=(4, 4), parent="attn", head=1)
        ModuleBlock(name='attn.head_1', offset=16, size=16, shape=(4, 4), parent='attn', head=1)
    """

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]
    parent: str
    head: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the block as a JSON-able dict (the store's ``modules`` entries)."""
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModuleBlock:
        """Inverse of :meth:`to_json`."""
        return cls(**{**d, "shape": tuple(d["shape"])})


def layout_blocks(blocks: list[tuple[str, tuple[int, ...], str, int | None]]) -> list[ModuleBlock]:
    """Assign contiguous column offsets to ``(name, shape, parent, head)`` in the given order."""
    out, offset = [], 0
    for name, shape, parent, head in blocks:
        size = math.prod(shape)
        out.append(ModuleBlock(name, offset, size, tuple(shape), parent, head))
        offset += size
    return out


def _check_modules(modules: Sequence[ModuleBlock]) -> int:
    """Validate that blocks tile ``[0, D)`` in order with unique names; return ``D``."""
    if not modules:
        raise ValueError("modules must list at least one ModuleBlock (see layout_blocks)")
    offset, names = 0, set()
    for b in modules:
        if b.offset != offset or b.size != math.prod(b.shape) or b.name in names:
            raise ValueError(
                f"bad module block {b}: blocks need unique names, size == prod(shape)"
                f" and contiguous offsets (expected offset {offset}); use layout_blocks"
            )
        offset, names = offset + b.size, names | {b.name}
    return offset


def _read_attrs(node: Path) -> dict[str, Any] | None:
    """Attributes of the Zarr node at ``node`` read straight from its zarr.json, or None."""
    meta = node / "zarr.json"
    if not meta.is_file():
        return None
    with meta.open() as f:
        return json.load(f).get("attributes", {})


def _package_version() -> str:
    try:
        return importlib.metadata.version("lightning-bergson")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _foreign_entries(path: Path) -> list[str]:
    """Entries of ``path`` showing it is not a (partly written) gradient store; [] if it is."""
    if not path.is_dir():
        return [path.name]
    attrs = _read_attrs(path)
    if attrs is not None:
        return [] if attrs.get("format") == FORMAT else ["zarr.json (not a gradient store)"]
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("rank_"))


def _open_root_attrs(path: Path) -> dict[str, Any]:
    """Root attributes of the store at ``path``, with errors that say what is wrong."""
    if not path.exists():
        raise FileNotFoundError(f"No gradient store at {path}: the path does not exist.")
    attrs = _read_attrs(path) if path.is_dir() else None
    if attrs is None or attrs.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a lightning_bergson gradient store "
            f"(its zarr.json has no attribute format={FORMAT!r})."
        )
    if int(attrs.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(
            f"{path} uses store schema_version {attrs['schema_version']}, newer than"
            f" {SCHEMA_VERSION} supported here; upgrade lightning-bergson."
        )
    return attrs


def _root_attrs(
    modules: Sequence[ModuleBlock],
    dim: int,
    dtype: str,
    chunk_rows: int,
    world_size: int,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """Root attributes: the fixed keys plus the caller's JSON metadata merged at top level."""
    extra = dict(metadata or {})
    if clash := sorted(set(extra) & set(FIXED_KEYS)):
        raise ValueError(f"metadata keys {clash} collide with reserved store keys {FIXED_KEYS}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serializable: {err}") from err
    fixed = {
        "schema_version": SCHEMA_VERSION,
        "package_version": _package_version(),
        "format": FORMAT,
        "modules": [b.to_json() for b in modules],
        "dim": dim,
        "dtype": dtype,
        "chunk_rows": chunk_rows,
        "world_size": world_size,
        "complete": False,
    }
    return {**fixed, **extra}


def _prepare_gradients(x: Any, dim: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Cast ``x`` [B, D] to ``dtype`` (clamped to its finite range); also return finite [B]."""
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
    if isinstance(x, torch.Tensor):
        finite = torch.isfinite(x).all(dim=1).cpu().numpy()
        rows = x.clamp(-big, big).to(getattr(torch, dtype.name)).cpu().numpy()  # new tensor
        return rows, finite
    return np.clip(x, -big, big).astype(dtype), np.isfinite(x).all(axis=1)  # NaN stays NaN


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
    for name, arr in arrays.items():
        if arr.shape[0] < stop:
            arr.resize((max(stop, 2 * arr.shape[0]), *arr.shape[1:]))
        arr[start:stop] = rows[name]


def _resize_rows(arrays: dict[str, zarr.Array], num_rows: int) -> None:
    for arr in arrays.values():
        if arr.shape[0] != num_rows:
            arr.resize((num_rows, *arr.shape[1:]))


def _rank_complete(path: Path, rank: int) -> bool:
    attrs = _read_attrs(path / f"rank_{rank}")
    return bool(attrs and attrs.get("complete"))


class GradientStoreWriter:
    """Append per-example gradient rows of one rank to a Zarr v3 store.

    Args:
        path: Store directory (conventionally ``*.zarr``).
        modules: Column blocks of a row, as made by :func:`layout_blocks`.
        dtype: ``"float16"`` (finite values clamped to +-65504) or ``"float32"``.
        rank: This writer's rank; each rank writes its own ``rank_<r>`` group.
        world_size: Number of writer ranks; the store is complete once all have closed.
        chunk_rows: Rows per chunk; default makes a gradients chunk about 4 MiB.
        metadata: JSON-able entries (``model``, ``projection``, ...) merged into the root attrs.
        overwrite: Replace an existing gradient store at ``path`` (never unrelated files).
        background: Write chunks on a background thread; False writes synchronously.
        max_pending_chunks: Bound on chunks queued for the background thread.

    Rank 0 must create the root before other ranks create their groups if ``overwrite``
    removes an old store (the caller places a barrier between them).

    Example:
        >>> blocks = layout_blocks([("fc", (2, 2), "fc", None)])
        >>> w = GradientStoreWriter("/tmp/w.zarr", modules=blocks, overwrite=True, chunk_rows=2)
        >>> w.append(np.ones((3, 4)), example_id=[0, 1, 2], step=0, epoch=0)
        >>> w.flush(), w.close()
        (3, None)
    """

    def __init__(
        self,
        path: str | Path,
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
    ) -> None:
        dim = _check_modules(modules)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
        itemsize = np.dtype(dtype).itemsize
        chunk_rows = chunk_rows or max(1, min(8192, (4 << 20) // (dim * itemsize)))
        self._setup(path, modules, dtype, rank, world_size, chunk_rows, max_pending_chunks)
        attrs = _root_attrs(modules, dim, dtype, chunk_rows, world_size, metadata)
        self._prepare_path(overwrite)
        try:
            if rank == 0:
                zarr.create_group(store=str(self.path), attributes=attrs)
            self._create_rank_group()
        except OSError as err:
            raise GradientStoreWriteError(
                f"Cannot create a gradient store at {self.path}: {err}. Choose a writable path."
            ) from err
        self._start(background)

    def _setup(
        self,
        path: str | Path,
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
        self.path, self.modules, self.rank = Path(path), list(modules), rank
        self.dim, self.dtype = _check_modules(modules), np.dtype(dtype)
        self.world_size, self.chunk_rows = world_size, chunk_rows
        self._max_pending = max_pending_chunks
        self._buffer: list[Rows] = []
        self._buffered = self._queued = self._committed = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def _prepare_path(self, overwrite: bool) -> None:
        """Refuse to clobber data; with ``overwrite`` remove an old store (or our old group)."""
        p, group = self.path, self.path / f"rank_{self.rank}"
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
        if exists:
            shutil.rmtree(p if self.rank == 0 else group)
        if self.rank > 0 and root.exists():
            attrs = _open_root_attrs(p)
            mine = (self.dim, self.dtype.name, self.chunk_rows, self.world_size)
            if (attrs["dim"], attrs["dtype"], attrs["chunk_rows"], attrs["world_size"]) != mine:
                raise ValueError(
                    f"rank {self.rank} layout (dim, dtype, chunk_rows, world_size)"
                    f"={mine} does not match the store at {p}"
                )

    def _create_rank_group(self) -> None:
        attrs = {"rank": self.rank, "committed_rows": 0, "complete": False}
        self._group = zarr.create_group(
            store=str(self.path / f"rank_{self.rank}"), attributes=attrs
        )
        specs = {"gradients": self.dtype.name, **COLUMNS}
        self._arrays = {}
        for name, dt in specs.items():
            tail = (self.dim,) if name == "gradients" else ()
            self._arrays[name] = self._group.create_array(
                name, shape=(0, *tail), chunks=(self.chunk_rows, *tail), dtype=dt, compressors=None
            )

    def _start(self, background: bool) -> None:
        if background:
            self._queue: queue.Queue[tuple[int, Rows] | None] = queue.Queue(self._max_pending)
            self._thread = threading.Thread(target=self._worker, name="gradient-store", daemon=True)
            self._thread.start()

    @classmethod
    def reopen(
        cls,
        path: str | Path,
        *,
        rank: int = 0,
        committed_rows: int,
        background: bool = True,
        max_pending_chunks: int = 4,
    ) -> GradientStoreWriter:
        """Append to an existing store after a resume, dropping rank rows ``>= committed_rows``.

        The rank and the root are marked incomplete again until :meth:`close`.
        """
        attrs = _open_root_attrs(Path(path))
        modules = [ModuleBlock.from_json(m) for m in attrs["modules"]]
        self = cls.__new__(cls)
        ws, chunk_rows = attrs["world_size"], attrs["chunk_rows"]
        self._setup(path, modules, attrs["dtype"], rank, ws, chunk_rows, max_pending_chunks)
        self._open_rank_group(committed_rows)
        zarr.open_group(str(self.path), mode="r+").attrs.update({"complete": False})
        self._start(background)
        self.truncate(committed_rows)
        return self

    def _open_rank_group(self, committed_rows: int) -> None:
        """Open this rank's existing group for appending and mark it incomplete."""
        where = self.path / f"rank_{self.rank}"
        if not where.is_dir():
            raise FileNotFoundError(f"{self.path} has no group rank_{self.rank} to reopen")
        self._group = zarr.open_group(str(where), mode="r+")
        self._arrays = {k: self._group[k] for k in ("gradients", *COLUMNS)}  # type: ignore[misc]
        on_disk = int(self._group.attrs["committed_rows"])  # type: ignore[arg-type]
        if not 0 <= committed_rows <= on_disk:
            raise ValueError(
                f"cannot resume rank {self.rank} of {self.path} at {committed_rows} rows: it has"
                f" {on_disk} committed rows (is the store older than the checkpoint?)"
            )
        self._committed = self._queued = on_disk
        self._group.attrs.update({"complete": False})

    @property
    def committed_rows(self) -> int:
        """Rows of this rank that are durably on disk."""
        return self._committed

    def append(
        self, gradients: Any, example_id: Any, step: Any, epoch: Any, loss: Any = None
    ) -> None:
        """Buffer rows ``gradients`` [B, D] with per-row ids, steps, epochs and losses ([B])."""
        self._check_open()
        grads, finite = _prepare_gradients(gradients, self.dim, self.dtype)
        n = len(grads)
        rows = {
            "gradients": grads,
            "finite": finite,
            "example_id": _column(example_id, n, "int64", "example_id"),
            "step": _column(step, n, "int64", "step"),
            "epoch": _column(epoch, n, "int32", "epoch"),
            "loss": _column(np.nan if loss is None else loss, n, "float32", "loss"),
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
        if self._thread is None:
            try:
                self._write(start, rows)
            except Exception as err:
                self._error = err
        else:
            self._queue.put((start, rows))
        self._raise_if_failed()

    def _write(self, start: int, rows: Rows) -> None:
        _write_block(self._arrays, start, rows)
        self._committed = start + len(rows["gradients"])
        self._group.attrs.update({"committed_rows": self._committed})

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drain so producers never block
                    self._write(*item)
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
        if complete:
            self._group.attrs.update({"complete": True})
            # Each rank marks itself before checking the others, so the last one sees all.
            done = all(_rank_complete(self.path, r) for r in range(self.world_size))
            if done and (self.path / "zarr.json").exists():
                zarr.open_group(str(self.path), mode="r+").attrs.update({"complete": True})

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


class LazyRows:
    """A lazy [N, D] view over the committed rows of every rank, in rank order.

    Example:
        >>> rows = GradientStore.open("/tmp/run.zarr").gradients
        >>> rows[[3, 0, 3]].shape, rows[1:3].shape, rows[0].shape
        ((3, 12), (2, 12), (12,))
    """

    def __init__(self, arrays: list[zarr.Array], counts: list[int], dim: int, dtype: np.dtype):
        self._arrays, self._counts = arrays, counts
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.shape, self.dtype = (int(self._offsets[-1]), dim), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        return self.take(rows)

    def take(self, rows: Any, cols: np.ndarray | None = None) -> np.ndarray:
        """Rows (int, slice, or int array, any order) restricted to columns ``cols``."""
        n = len(self)
        if isinstance(rows, int | np.integer):
            if not -n <= rows < n:
                raise IndexError(f"row {rows} out of range for {n} rows")
            return self.take(np.array([rows % n]), cols)[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read_range(start, max(start, stop), _col_selection(cols))
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row indices out of range for {n} rows")
        uniq, inverse = np.unique(idx % max(n, 1), return_inverse=True)
        colsel = _col_selection(cols)
        out = np.empty((len(uniq), _ncols(colsel, self.shape[1])), dtype=self.dtype)
        for arr, off, cnt in zip(self._arrays, self._offsets, self._counts, strict=False):
            lo, hi = np.searchsorted(uniq, [off, off + cnt])
            if hi > lo:
                local = uniq[lo:hi] - off
                contiguous = local[-1] - local[0] + 1 == len(local)
                sel = slice(int(local[0]), int(local[-1]) + 1) if contiguous else local
                out[lo:hi] = arr.get_orthogonal_selection((sel, colsel))
        return out[inverse.reshape(-1)]

    def _read_range(self, start: int, stop: int, colsel: slice | np.ndarray) -> np.ndarray:
        out = np.empty((stop - start, _ncols(colsel, self.shape[1])), dtype=self.dtype)
        for arr, off, cnt in zip(self._arrays, self._offsets, self._counts, strict=False):
            a, b = max(start, off), min(stop, off + cnt)
            if b > a:
                out[a - start : b - start] = arr.get_orthogonal_selection(
                    (slice(int(a - off), int(b - off)), colsel)
                )
        return out


def _col_selection(cols: np.ndarray | None) -> slice | np.ndarray:
    """A slice when ``cols`` is one contiguous run (fast path), else the index array."""
    if cols is None:
        return slice(None)
    if len(cols) and cols[-1] - cols[0] + 1 == len(cols) and np.all(np.diff(cols) == 1):
        return slice(int(cols[0]), int(cols[-1]) + 1)
    return cols


def _ncols(colsel: slice | np.ndarray, dim: int) -> int:
    return len(range(dim)[colsel]) if isinstance(colsel, slice) else len(colsel)


class GradientStore:
    """Read a gradient store: lazy rows over all ranks, per-row ids, module selection.

    Example:
        >>> store = GradientStore.open("/tmp/run.zarr")
        >>> for start, chunk in store.iter_chunks(modules=["fc*"]):
        ...     print(start, chunk.shape)
        0 torch.Size([5, 12])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.attrs: dict[str, Any] = _open_root_attrs(self.path)
        self.modules = [ModuleBlock.from_json(m) for m in self.attrs["modules"]]
        self.dim, self.dtype = int(self.attrs["dim"]), np.dtype(self.attrs["dtype"])
        self.complete = bool(self.attrs["complete"])
        arrays, counts, columns = self._load_ranks(int(self.attrs["world_size"]))
        if not self.complete:
            warnings.warn(
                f"gradient store {self.path} is incomplete (a writer did not close); "
                f"only the {sum(counts)} committed rows are exposed.",
                IncompleteStoreWarning,
                stacklevel=3,
            )
        self.gradients = LazyRows(arrays, [c for c in counts if c], self.dim, self.dtype)
        cat = {k: np.concatenate(v) if v else np.zeros(0, COLUMNS[k]) for k, v in columns.items()}
        self.example_ids, self.steps, self.epochs = cat["example_id"], cat["step"], cat["epoch"]
        self.losses, self.finite = cat["loss"], cat["finite"]
        self.ranks = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.num_rows = int(sum(counts))

    def _load_ranks(self, world_size: int) -> tuple[list[zarr.Array], list[int], dict[str, list]]:
        """Gradient arrays, committed row counts and per-row columns of every rank."""
        arrays, counts, columns = [], [], {k: [] for k in COLUMNS}
        for r in range(world_size):
            n = int((_read_attrs(self.path / f"rank_{r}") or {}).get("committed_rows", 0))
            counts.append(n)
            if n == 0:
                continue
            group = zarr.open_group(str(self.path / f"rank_{r}"), mode="r")
            arrays.append(group["gradients"])
            if arrays[-1].shape[0] < n:
                raise ValueError(f"{self.path}/rank_{r} claims {n} rows but holds fewer")
            for k in COLUMNS:
                columns[k].append(group[k][:n])  # type: ignore[index]
        return arrays, counts, columns

    @classmethod
    def open(cls, path: str | Path) -> GradientStore:
        """Open the store at ``path`` (warns with IncompleteStoreWarning if not complete)."""
        return cls(path)

    def __len__(self) -> int:
        return self.num_rows

    def columns(self, modules: Sequence[str] | None = None) -> np.ndarray:
        """Column indices (in store order) of blocks named, parented or globbed by ``modules``."""
        if modules is None:
            return np.arange(self.dim)
        if isinstance(modules, str):
            modules = [modules]
        chosen: set[str] = set()
        for pat in modules:
            hit = {
                b.name
                for b in self.modules
                if pat in (b.name, b.parent)
                or fnmatch.fnmatchcase(b.name, pat)
                or fnmatch.fnmatchcase(b.parent, pat)
            }
            if not hit:
                names = sorted({b.parent for b in self.modules})
                raise KeyError(
                    f"no module block matches {pat!r}; available modules include "
                    f"{names[:10]}{' ...' if len(names) > 10 else ''}"
                )
            chosen |= hit
        blocks = [b for b in self.modules if b.name in chosen]
        return np.concatenate([np.arange(b.offset, b.offset + b.size) for b in blocks])

    def read(
        self, rows: Any, modules: Sequence[str] | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows (int, slice, or int array; any order, duplicates ok) as a [n, D_sel] tensor."""
        cols = None if modules is None else self.columns(modules)
        data = self.gradients.take(rows, cols)
        return torch.from_numpy(data.reshape(-1, data.shape[-1])).to(dtype)

    def iter_chunks(
        self,
        chunk_rows: int | None = None,
        modules: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start_row, tensor [n, D_sel])`` over all rows in order."""
        step = chunk_rows or int(self.attrs["chunk_rows"])
        if step < 1:
            raise ValueError(f"chunk_rows must be >= 1; got {step}")
        cols = None if modules is None else self.columns(modules)
        for start in range(0, self.num_rows, step):
            data = self.gradients.take(slice(start, start + step), cols)
            yield start, torch.from_numpy(data).to(dtype)

    def subdir(self, name: str) -> Path:
        """Path of an auxiliary directory (e.g. ``"normalizers"``), created on demand."""
        if not name or "/" in name or name.startswith(("rank_", ".")) or name == "zarr.json":
            raise ValueError(f"bad store subdirectory name {name!r}; try one of {_AUX_DIRS}")
        out = self.path / name
        out.mkdir(exist_ok=True)
        return out
