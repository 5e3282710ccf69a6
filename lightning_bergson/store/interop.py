"""A store's rows as a dask array or an xarray Dataset, for analyses at scale.

:func:`to_dask` gives the committed rows of every rank, in store order, as a lazy
``[N, D]`` dask array whose blocks are read through the store's checked reads: checksums
verified, a missing chunk inside the committed rows is an error, rows a writer has not
committed are not there. :func:`to_xarray` adds the per-row columns (example id, step,
epoch, rank, loss) as coordinates and the block name of every column. Both work on local
and remote stores (``GradientStore.open(url, storage_options=...)``); they need the
``xarray`` extra (``pip install lightning-bergson[xarray]``).

A rank group is also a plain Zarr v3 group whose arrays name their dimensions, so
``xarray.open_zarr(f"{store}/rank_0")`` and ``dask.array.from_zarr`` open it directly; those
see Zarr's view (the allocated rows, a missing chunk as zeros), not the committed rows:
prefer these functions.

Example:
    >>> import tempfile, torch
    >>> from lightning_bergson.store import GradientStore, GradientStoreWriter, layout_blocks
    >>> path = f"{tempfile.mkdtemp()}/g.zarr"
    >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 2), "fc", None)]),
    ...                          chunk_rows=2) as w:
    ...     w.append(torch.arange(6.0).reshape(3, 2), example_id=[7, 8, 9], step=0, epoch=0)
    >>> ds = to_xarray(GradientStore.open(path))
    >>> ds.gradients.sel(row=1).values.tolist(), ds.example_id.values.tolist()
    ([2.0, 3.0], [7, 8, 9])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .reader import GradientStore

__all__ = ["to_dask", "to_xarray"]


class _CheckedRows:
    """What ``dask.array.from_array`` takes: ``[N, D_sel]`` read with the store's checks."""

    def __init__(self, store: GradientStore, cols: np.ndarray | None) -> None:
        self.store, self.cols = store, cols
        width = store.dim if cols is None else len(cols)
        self.shape, self.dtype, self.ndim = (len(store), width), store.dtype, 2

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        picked = np.arange(self.shape[1])[cols]
        if self.cols is not None:
            picked = self.cols[picked]
        return self.store.gradients.take(rows, picked)


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:
        raise ImportError(
            f"{name} is not installed; `pip install lightning-bergson[xarray]` adds xarray and dask"
        ) from err


def to_dask(store: GradientStore, modules: Sequence[str] | None = None) -> Any:
    """The committed rows ``[N, D_sel]`` as a lazy dask array (one block per store chunk).

    Args:
        store: An open store (local or remote).
        modules: Keep only these blocks' columns (names, parents or globs).
    """
    dask_array = _import("dask.array").array
    cols = None if modules is None else store.columns(modules)
    rows = _CheckedRows(store, cols)
    chunk = max(1, int(store.attrs["chunk_rows"]))
    return dask_array.from_array(rows, chunks=(chunk, rows.shape[1]), asarray=True, lock=False)


def to_xarray(store: GradientStore, modules: Sequence[str] | None = None) -> Any:
    """A Dataset: ``gradients`` (row, column), per-row coordinates, each column's block.

    Args:
        store: An open store (local or remote).
        modules: Keep only these blocks' columns (names, parents or globs).
    """
    xr = _import("xarray")
    cols = np.arange(store.dim) if modules is None else store.columns(modules)
    block = np.empty(store.dim, dtype=object)
    for b in store.modules:
        block[b.offset : b.offset + b.size] = b.name
    coords = {
        "example_id": ("row", store.example_ids),
        "step": ("row", store.steps),
        "epoch": ("row", store.epochs),
        "rank": ("row", store.ranks),
        "loss": ("row", store.losses),
        "block": ("column", block[cols].astype(str)),
    }
    grads = xr.DataArray(to_dask(store, modules), dims=("row", "column"))
    attrs = {"store": str(store.location), "complete": store.complete}
    return xr.Dataset({"gradients": grads}, coords=coords, attrs=attrs)
