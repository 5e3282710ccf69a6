"""Damage detection for gradient stores: missing chunks, checksum mismatches, short chunks.

Every array of a store written with schema >= ``CHECKSUM_SCHEMA`` uses Zarr v3's
``crc32c`` codec (a checksum appended to each chunk, verified whenever the chunk is
decoded) and stores every chunk of its committed rows. So, within a rank's committed
rows:

* a chunk that is not in the store is damage (a missing file), never the fill value;
* a chunk whose bytes were changed or cut fails its checksum.

:class:`ChunkGuard` wraps one array of one rank and turns either into a
:class:`StoreIntegrityError` that names the store, the array, the chunk, its rows and the
fix. :func:`verify_store` reads every chunk once and reports all damage.

Example:
    >>> import tempfile
    >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
    >>> path = f"{tempfile.mkdtemp()}/run.zarr"
    >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 3), "fc", None)]),
    ...                          chunk_rows=2) as w:
    ...     w.append(np.ones((5, 3)), example_id=range(5), step=0, epoch=0)
    >>> verify_store(path, progress=False).ok
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from .location import Location, StorePath
from .schema import (
    CHECKSUM_SCHEMA,
    COLUMNS,
    OPTIONAL_COLUMNS,
    StoreIntegrityError,
    _open_root_attrs,
    _read_attrs,
)

__all__ = ["ChunkGuard", "Damage", "VerifyReport", "stored_chunks", "verify_store"]

ARRAYS = ("gradients", *COLUMNS)


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged chunk: ``rows`` are the rank's rows it holds, ``store_rows`` the same
    rows in the store's row order (what ``GradientStore.read`` indexes)."""

    rank: int
    array: str
    chunk: int
    rows: tuple[int, int]
    store_rows: tuple[int, int]
    kind: str  # "missing" | "checksum" (changed or cut bytes) | "unreadable"
    detail: str = ""

    def describe(self) -> str:
        """One line: where the damage is and what it is."""
        lo, hi = self.rows
        glo, ghi = self.store_rows
        what = {
            "missing": "is missing",
            "checksum": "fails its checksum (bytes changed or cut)",
            "unreadable": "cannot be decoded",
        }[self.kind]
        extra = f" ({self.detail})" if self.detail else ""
        return (
            f"rank_{self.rank}/{self.array} chunk {self.chunk} (rows {lo}-{hi - 1} of rank "
            f"{self.rank}, store rows {glo}-{ghi - 1}) {what}{extra}"
        )


def _fix(path: Path, damage: Sequence[Damage]) -> str:
    first: dict[int, int] = {}
    for d in damage:
        first[d.rank] = min(first.get(d.rank, d.rows[0]), d.rows[0])
    keep = "; ".join(f"rank {r} keeps its first {n} rows" for r, n in sorted(first.items()))
    return (
        "Re-create the store (rerun the capture or `index` with overwrite), or drop the "
        f"damaged rows and every later row of their rank with `python -m lightning_bergson "
        f"verify {path} --truncate` ({keep}; a resumed capture can append them again). "
        f"`python -m lightning_bergson verify {path}` lists all damage."
    )


def integrity_error(path: Path, damage: Sequence[Damage]) -> StoreIntegrityError:
    """The error for ``damage`` found while reading the store at ``path``."""
    lines = "\n  ".join(d.describe() for d in damage[:10])
    more = f"\n  ... and {len(damage) - 10} more" if len(damage) > 10 else ""
    return StoreIntegrityError(
        f"gradient store {path} is damaged:\n  {lines}{more}\n{_fix(path, damage)}"
    )


def stored_chunks(arr: zarr.Array) -> set[int]:
    """Indices (along rows) of the chunks of ``arr`` that exist in its store."""
    prefix = f"{arr.path}/c/" if arr.path else "c/"

    async def keys() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix)]

    # A chunk being written is a temporary "<k>.<uuid>.partial" file until it is renamed
    # into place (Zarr's local store writes atomically): it is not a stored chunk yet. On
    # object storage a chunk is one PUT of the whole object: it is listed once it is whole.
    heads = (key[len(prefix) :].split("/", 1)[0] for key in sync(keys()))
    return {int(head) for head in heads if head.isdigit()}


class ChunkGuard:
    """Checked reads of the committed rows ``[0, rows)`` of one array of one rank.

    Args:
        path: The store (for messages).
        rank: The array's rank.
        name: The array's name (``gradients``, ``example_id``, ...).
        array: The Zarr array.
        rows: The rank's committed rows.
        offset: Store row of the rank's first row.
        checked: Whether the store guarantees every chunk (schema >= ``CHECKSUM_SCHEMA``);
            older stores may leave all-fill chunks out, so a missing chunk reads as fill.
    """

    def __init__(
        self,
        path: Path,
        rank: int,
        name: str,
        array: zarr.Array,
        rows: int,
        offset: int,
        checked: bool,
    ) -> None:
        self.path, self.rank, self.name, self.array = path, rank, name, array
        self.rows, self.offset, self.checked = rows, offset, checked
        self.chunk_rows = int(array.chunks[0])
        want = range(math.ceil(rows / self.chunk_rows))
        self.missing = sorted(set(want) - stored_chunks(array)) if checked else []

    def damage(self, chunk: int, kind: str, detail: str = "") -> Damage:
        """A :class:`Damage` record for ``chunk`` of this array."""
        lo = chunk * self.chunk_rows
        hi = min(lo + self.chunk_rows, self.rows)
        rows = (lo, hi)
        glob = (lo + self.offset, hi + self.offset)
        return Damage(self.rank, self.name, chunk, rows, glob, kind, detail)

    def read(self, rows: slice | np.ndarray, cols: Any = None) -> np.ndarray:
        """``array[rows]`` (``[rows, cols]`` for 2-D arrays) with damage turned into errors."""
        sel = (rows,) if cols is None else (rows, cols)
        if isinstance(rows, slice):
            lo, hi = rows.start or 0, rows.stop if rows.stop is not None else self.rows
            touched = range(lo // self.chunk_rows, (hi - 1) // self.chunk_rows + 1)
        else:
            touched = np.unique(np.asarray(rows) // self.chunk_rows).tolist()
        if not len(touched):
            return self.array.get_orthogonal_selection(sel)
        try:
            out = self.array.get_orthogonal_selection(sel)
        except ValueError as err:  # a checksum mismatch, or a short chunk of an old store
            found = self.scan(touched)
            if not found:
                raise
            raise integrity_error(self.path, found) from err
        # Zarr reads an absent chunk as the fill value: check after reading, so a chunk
        # deleted after the store was opened (or during the read) is refused too.
        gone = sorted(k for k in touched if k in self.missing or not self._present(k))
        if gone:
            raise integrity_error(self.path, [self.damage(k, "missing") for k in gone])
        return out

    def _present(self, chunk: int) -> bool:
        """Whether ``chunk`` exists now: a stat for local stores, a request for the object
        (HEAD) on object storage."""
        if not self.checked:
            return True
        key = self.array.metadata.encode_chunk_key((chunk,) + (0,) * (self.array.ndim - 1))
        root = getattr(self.array.store, "root", None)
        if root is None:
            store = self.array.store
            path = f"{self.array.path}/{key}" if self.array.path else key
            if (fs := getattr(store, "fs", None)) is not None:  # ask the server, not a listing
                fs.invalidate_cache(f"{store.path}/{path}")  # cached when the store was opened
            return bool(sync(store.exists(path)))
        return (Path(str(root)) / self.array.path / key).is_file()

    def scan(self, chunks: Sequence[int] | range | None = None) -> list[Damage]:
        """Decode each chunk of ``chunks`` (default: all committed) once; return the damage."""
        chunks = range(math.ceil(self.rows / self.chunk_rows)) if chunks is None else chunks
        found = []
        for k in chunks:
            if k in self.missing:
                found.append(self.damage(k, "missing"))
                continue
            lo = k * self.chunk_rows
            try:
                self.array[lo : min(lo + self.chunk_rows, self.array.shape[0])]
            except ValueError as err:
                kind = "checksum" if "checksum" in str(err) else "unreadable"
                found.append(self.damage(k, kind, "" if kind == "checksum" else str(err)))
        return found


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify_store` found; ``ok`` when nothing is damaged."""

    path: Path | Location
    rows: dict[int, int]
    chunks: int
    checked: bool
    damage: list[Damage]
    location: Location | None = None  # where the store is (default: ``path``)

    @property
    def ok(self) -> bool:
        """True when no chunk is damaged."""
        return not self.damage

    def damaged_ranges(self) -> dict[int, list[tuple[int, int]]]:
        """Per rank, merged ``[lo, hi)`` row ranges held by damaged chunks (any array)."""
        out: dict[int, list[tuple[int, int]]] = {}
        for d in sorted(self.damage, key=lambda d: (d.rank, d.rows)):
            spans = out.setdefault(d.rank, [])
            if spans and d.rows[0] <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], d.rows[1]))
            else:
                spans.append(d.rows)
        return out

    def summary(self) -> str:
        """A human-readable report (what ``verify`` prints)."""
        total = sum(self.rows.values())
        head = (
            f"{self.path}: {total} committed rows in {len(self.rows)} ranks, "
            f"{self.chunks} chunks read"
        )
        if not self.checked:
            head += (
                "\nnote: this store was written before checksums (schema 1): changed bytes and "
                "missing chunks cannot be detected, only chunks that fail to decode"
            )
        if self.ok:
            return head + "\nno damage found"
        lines = [head, f"DAMAGED: {len(self.damage)} chunks"]
        lines += [f"  {d.describe()}" for d in self.damage]
        for rank, spans in self.damaged_ranges().items():
            text = ", ".join(f"{lo}-{hi - 1}" for lo, hi in spans)
            lines.append(f"rank {rank}: damaged rows {text}")
        lines.append(_fix(self.path, self.damage))
        return "\n".join(lines)


def rank_guards(
    location: StorePath, attrs: dict[str, Any]
) -> list[tuple[int, int, dict[str, ChunkGuard]]]:
    """``(rank, committed rows, {array: guard})`` of every rank with rows, in rank order."""
    checked = int(attrs.get("schema_version", 1)) >= CHECKSUM_SCHEMA
    location = Location.of(location)
    path = location.path
    out, offset = [], 0
    for r in range(int(attrs["world_size"])):
        n = int((_read_attrs(location / f"rank_{r}") or {}).get("committed_rows", 0))
        if n == 0:
            continue
        group = zarr.open_group((location / f"rank_{r}").zarr_store(read_only=True), mode="r")
        guards = {}
        for name in ARRAYS:
            if name not in group:
                if name in OPTIONAL_COLUMNS:  # a store from before the column existed
                    continue
                raise integrity_error(path, [Damage(r, name, 0, (0, n), (offset, offset + n),
                                                    "missing", "the whole array")])  # fmt: skip
            arr = group[name]
            if arr.shape[0] < n:  # type: ignore[union-attr]
                raise StoreIntegrityError(
                    f"gradient store {path}: rank_{r}/{name} holds {arr.shape[0]} rows but the "  # type: ignore[union-attr]
                    f"rank claims {n} committed rows; its metadata was changed. "
                    + _fix(path, [Damage(r, name, 0, (0, n), (offset, offset + n), "missing")])
                )
            guards[name] = ChunkGuard(path, r, name, arr, n, offset, checked)  # type: ignore[arg-type]
        out.append((r, n, guards))
        offset += n
    return out


def verify_store(
    path: StorePath, *, progress: bool = True, storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Read every committed chunk of every array of the store once; report the damage.

    Args:
        path: The gradient store: a local directory or a URL.
        progress: Show a progress bar over chunks.
        storage_options: Options of a URL's fsspec filesystem.
    """
    location = Location.of(path, storage_options)
    attrs = _open_root_attrs(location)
    checked = int(attrs.get("schema_version", 1)) >= CHECKSUM_SCHEMA
    ranks = rank_guards(location, attrs)
    work = [
        (g, k) for _, _, guards in ranks for g in guards.values()
        for k in range(math.ceil(g.rows / g.chunk_rows))
    ]  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(work), desc="verify", unit="chunk")
    damage: list[Damage] = []
    for guard, k in work:
        damage += guard.scan([k])
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    rows = {r: n for r, n, _ in ranks}
    return VerifyReport(location.path, rows, len(work), checked, damage, location)


def truncate_damaged(report: VerifyReport) -> dict[int, int]:
    """Drop each damaged rank's rows from its first damaged chunk on; return the new counts.

    The store stays a valid, complete store of the rows before the damage; a capture
    resumed from a checkpoint with at most those rows appends the rest again.
    """
    from .writer import GradientStoreWriter

    keep = {r: spans[0][0] for r, spans in report.damaged_ranges().items()}
    for rank, rows in keep.items():
        writer = GradientStoreWriter.reopen(
            report.location or report.path, rank=rank, committed_rows=rows, background=False
        )
        writer.close(complete=True)
    return keep
