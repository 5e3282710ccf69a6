"""Store schema: format constants, module blocks and root attributes (JSON only)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .location import Location, StorePath

FORMAT = "lightning_bergson.gradient_store"
SCHEMA_VERSION = 2
CHECKSUM_SCHEMA = 2
"""Stores from this schema on carry a crc32c checksum in every chunk and store every chunk
of the committed rows (no chunk is left out as "all fill value"), so a missing chunk is
damage. Schema 1 stores open; their damage can only be detected when a read fails."""
DTYPES = ("float16", "float32")
# Per-row columns stored next to `gradients`, with their on-disk dtype.
COLUMNS = {
    "example_id": "int64",
    "step": "int64",
    "epoch": "int32",
    "loss": "float32",
    "finite": "bool",
    "advantage": "float32",  # the weight A_i of a reward-weighted loss; NaN when none
}
OPTIONAL_COLUMNS = {"advantage": np.nan}
"""Columns a store written before they existed lacks; read as this fill value."""
FIXED_KEYS = ("schema_version", "package_version", "format", "modules", "dim", "dtype")
FIXED_KEYS += ("chunk_rows", "world_size", "complete")
_AUX_DIRS = ("normalizers", "preconditioners")
_KINDS = {  # other formats of the package, named in errors when given as a gradient store
    "lightning_bergson.scores": "a score array (open it with lightning_bergson.scores)",
    "lightning_bergson.ekfac_factors": "EK-FAC factors (load them with the EK-FAC module)",
    "lightning_bergson.preconditioner": "a preconditioner (it lives inside a store)",
}

Rows = dict[str, np.ndarray]  # column name -> [n, ...] array, always including "gradients"


class GradientStoreWriteError(RuntimeError):
    """Writing rows to the store failed (disk full, permission denied, ...)."""


class StoreIntegrityError(RuntimeError):
    """A chunk of a gradient store is missing or damaged (checksum mismatch, truncated)."""


class IncompleteStoreWarning(UserWarning):
    """The store was opened before every rank closed it; only committed rows are exposed."""


def require_writable(
    path: StorePath, what: str = "a gradient store", *, with_parent: bool = False
) -> None:
    """Raise before anything is changed when ``path`` cannot be written as a whole.

    A new path needs its nearest existing parent writable; an existing one needs every
    directory under it writable (and, with ``with_parent``, its parent, which a
    replacement removes it from and whose ``zarr.json`` a resume rewrites): Zarr replaces
    files by renaming into their directory, and removing or truncating deletes entries.
    Checking first keeps a half-replaced or half-deleted store from ever happening on a
    read-only copy or mount. Object storage has no such check (permissions are the
    bucket's policy, known only to a request): there the first write that is refused
    fails with :class:`GradientStoreWriteError`, and committed rows stay as they were.
    """
    loc = Location.of(path)
    if loc.remote:
        return
    path = loc.local
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise GradientStoreWriteError(
                f"Cannot write {what} at {path}: {parent} is a file, not a directory. "
                "Choose a writable path."
            )
        blocked = [] if os.access(parent, os.W_OK | os.X_OK) else [parent]
    else:
        dirs = [path.parent] if with_parent or not path.is_dir() else []
        dirs += [Path(d) for d, _, _ in os.walk(path)] if path.is_dir() else []
        blocked = [d for d in dirs if not os.access(d, os.W_OK | os.X_OK)]
    if blocked:
        more = f" and {len(blocked) - 1} more" if len(blocked) > 1 else ""
        raise GradientStoreWriteError(
            f"Cannot write {what} at {path}: {blocked[0]}{more} is read-only (nothing was "
            "changed). Make it writable (chmod -R u+w), or copy it to a writable location "
            "and use that path."
        )


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


def _read_attrs(node: StorePath) -> dict[str, Any] | None:
    """Attributes of the Zarr node at ``node`` read straight from its zarr.json, or None."""
    try:
        meta = (Location.of(node) / "zarr.json").read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return json.loads(meta).get("attributes", {})


@functools.cache
def _package_version() -> str:
    try:
        return importlib.metadata.version("lightning-bergson")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _foreign_entries(path: StorePath) -> list[str]:
    """Entries of ``path`` showing it is not a (partly written) gradient store; [] if it is."""
    loc = Location.of(path)
    attrs = _read_attrs(loc)
    if attrs is not None:
        return [] if attrs.get("format") == FORMAT else ["zarr.json (not a gradient store)"]
    if not loc.is_dir():
        return [loc.name]
    return [name for name in loc.children() if not name.startswith("rank_")]


def _open_root_attrs(path: StorePath) -> dict[str, Any]:
    """Root attributes of the store at ``path``, with errors that say what is wrong."""
    loc = Location.of(path)
    attrs = _read_attrs(loc)
    if attrs is None:
        if not loc.exists():
            where = "the object prefix holds nothing" if loc.remote else "the path does not exist"
            raise FileNotFoundError(f"No gradient store at {loc}: {where}.")
        if not loc.is_dir():
            raise ValueError(
                f"{loc} is a file, not a gradient store (a store is a directory holding "
                "zarr.json and rank_<r>/ groups, as GradientCaptureCallback or `index` write it)."
            )
        raise ValueError(
            f"{loc} is not a gradient store: it has no zarr.json (a store is a directory "
            "holding zarr.json and rank_<r>/ groups). Pass the *.zarr directory itself."
        )
    if attrs.get("format") != FORMAT:
        kind = _KINDS.get(str(attrs.get("format")))
        raise ValueError(
            f"{loc} is not a lightning_bergson gradient store"
            + (f": it holds {kind}" if kind else f" (its zarr.json has no format={FORMAT!r})")
            + "."
        )
    if int(attrs.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(
            f"{loc} uses store schema_version {attrs['schema_version']}, newer than"
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
