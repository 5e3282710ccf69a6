"""Zarr v3 gradient store: one append-only group of rows per writer rank.

Layout of a store directory (see DESIGN.md, section 2)::

    run.zarr/zarr.json            root attrs: format, schema_version, modules, dim, dtype, ...
    run.zarr/rank_<r>/            attrs {"rank", "committed_rows", "complete"}
        gradients [N_r, D]        float16 | float32, chunks (chunk_rows, D), uncompressed
        example_id, step [N_r] int64; epoch [N_r] int32; loss [N_r] float32; finite [N_r] bool
    Every chunk carries a crc32c checksum and every committed chunk is stored (schema 2), so
    damaged or missing chunks raise StoreIntegrityError instead of reading as data.

Rows are buffered and written in whole chunks by a background thread; a rank's
``committed_rows`` attribute only advances after its rows are on disk, so a reader after a
crash never sees rows that were not written. Metadata is JSON; nothing is pickled.
:class:`StoreScanner` streams every committed row in chunks with its example id, read
ahead and checksum-verified (the input of every scoring scan).

Example:
    >>> import tempfile, torch
    >>> path = f"{tempfile.mkdtemp()}/run.zarr"
    >>> blocks = layout_blocks([("fc", (4, 3), "fc", None)])
    >>> with GradientStoreWriter(path, modules=blocks) as w:
    ...     w.append(torch.randn(5, 12), example_id=range(5), step=[0] * 5, epoch=[0] * 5)
    >>> GradientStore.open(path).read([4, 0], modules=["fc"]).shape
    torch.Size([2, 12])
"""

from .integrity import Damage, VerifyReport, verify_store
from .interop import to_dask, to_xarray
from .reader import GradientStore, LazyRows
from .scan import RowChunk, StoreScanner
from .schema import (
    FORMAT,
    SCHEMA_VERSION,
    GradientStoreWriteError,
    IncompleteStoreWarning,
    ModuleBlock,
    StoreIntegrityError,
    layout_blocks,
)
from .writer import GradientStoreWriter

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "Damage",
    "GradientStore",
    "GradientStoreWriteError",
    "GradientStoreWriter",
    "IncompleteStoreWarning",
    "LazyRows",
    "ModuleBlock",
    "RowChunk",
    "StoreIntegrityError",
    "StoreScanner",
    "VerifyReport",
    "layout_blocks",
    "to_dask",
    "to_xarray",
    "verify_store",
]
