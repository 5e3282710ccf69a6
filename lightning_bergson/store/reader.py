"""GradientStore: a lazy reader over every rank's committed rows."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .integrity import ChunkGuard, VerifyReport, rank_guards, verify_store
from .location import Location, StorePath
from .schema import (
    _AUX_DIRS,
    COLUMNS,
    OPTIONAL_COLUMNS,
    IncompleteStoreWarning,
    ModuleBlock,
    _open_root_attrs,
    _read_attrs,
)

__all__ = ["GradientStore", "LazyRows"]


class LazyRows:
    """A lazy [N, D] view over the committed rows of every rank, in rank order.

    Example:
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.zarr"
        >>> blocks = layout_blocks([("fc", (4, 3), "fc", None)])
        >>> with GradientStoreWriter(path, modules=blocks) as w:
        ...     w.append(np.ones((5, 12)), example_id=range(5), step=0, epoch=0)
        >>> rows = GradientStore.open(path).gradients
        >>> rows[[3, 0, 3]].shape, rows[1:3].shape, rows[0].shape
        ((3, 12), (2, 12), (12,))
    """

    def __init__(self, arrays: list[ChunkGuard], counts: list[int], dim: int, dtype: np.dtype):
        self._arrays, self._counts = arrays, counts  # checked reads of each rank's gradients
        self.guards = arrays
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
                out[lo:hi] = arr.read(sel, colsel)
        return out[inverse.reshape(-1)]

    def _read_range(self, start: int, stop: int, colsel: slice | np.ndarray) -> np.ndarray:
        out = np.empty((stop - start, _ncols(colsel, self.shape[1])), dtype=self.dtype)
        for arr, off, cnt in zip(self._arrays, self._offsets, self._counts, strict=False):
            a, b = max(start, off), min(stop, off + cnt)
            if b > a:
                out[a - start : b - start] = arr.read(slice(int(a - off), int(b - off)), colsel)
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
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.zarr"
        >>> blocks = layout_blocks([("fc", (4, 3), "fc", None)])
        >>> with GradientStoreWriter(path, modules=blocks) as w:
        ...     w.append(np.ones((5, 12)), example_id=range(5), step=0, epoch=0)
        >>> store = GradientStore.open(path)
        >>> for start, chunk in store.iter_chunks(modules=["fc*"]):
        ...     print(start, chunk.shape)
        0 torch.Size([5, 12])
    """

    def __init__(self, path: StorePath, storage_options: dict[str, Any] | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self.path = self.location.path  # a Path for local stores, the Location of a remote one
        self.attrs: dict[str, Any] = _open_root_attrs(self.location)
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
        self.advantages = cat["advantage"]  # NaN where the loss had no advantage weight
        self.ranks = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.num_rows = int(sum(counts))
        # Rows deliberately not stored (on_nonfinite="skip"): {rank, example_id, step, epoch}.
        self.skipped = [
            {"rank": r, "example_id": i, "step": st, "epoch": ep}
            for r in range(len(counts))
            for i, st, ep in (_read_attrs(self.location / f"rank_{r}") or {}).get("skipped", [])
        ]

    def _load_ranks(self, world_size: int) -> tuple[list[ChunkGuard], list[int], dict[str, list]]:
        """Gradient arrays, committed row counts and per-row columns of every rank.

        Chunks missing from the committed rows, or failing their checksum, raise
        :class:`StoreIntegrityError` (the columns here, the gradients when read).
        """
        assert world_size == int(self.attrs["world_size"])
        counts = [0] * world_size
        arrays, columns = [], {k: [] for k in COLUMNS}
        for r, n, guards in rank_guards(self.location, self.attrs):
            counts[r] = n
            arrays.append(guards["gradients"])
            for k in COLUMNS:
                if k in guards:
                    column = guards[k].read(slice(0, n))
                else:  # written before the column existed
                    column = np.full(n, OPTIONAL_COLUMNS[k], dtype=COLUMNS[k])
                columns[k].append(column)
        return arrays, counts, columns

    @classmethod
    def open(
        cls, path: StorePath, *, storage_options: dict[str, Any] | None = None
    ) -> GradientStore:
        """Open the store at ``path`` (warns with IncompleteStoreWarning if not complete).

        Args:
            path: A local directory or a URL (``s3://bucket/run.zarr``).
            storage_options: Options of a URL's fsspec filesystem (credentials,
                ``endpoint_url``); without them the usual environment variables apply.
        """
        return cls(path, storage_options)

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

    def verify(self, *, progress: bool = True) -> VerifyReport:
        """Read every chunk of every array once; report damaged row ranges per rank.

        See :func:`~lightning_bergson.store.integrity.verify_store`; ``report.ok`` is True
        for an undamaged store and ``report.damaged_ranges()`` gives ``{rank: [(lo, hi)]}``.
        """
        return verify_store(self.location, progress=progress)

    def subdir(self, name: str) -> Path:
        """Path of an auxiliary directory (e.g. ``"normalizers"``), created on demand.

        Local stores only; :meth:`aux` works for remote ones too.
        """
        out = self.aux(name)
        out.mkdir()
        return out.local

    def aux(self, name: str) -> Location:
        """Location of an auxiliary directory (e.g. ``"preconditioners"``) of the store."""
        if not name or "/" in name or name.startswith(("rank_", ".")) or name == "zarr.json":
            raise ValueError(f"bad store subdirectory name {name!r}; try one of {_AUX_DIRS}")
        return self.location / name
