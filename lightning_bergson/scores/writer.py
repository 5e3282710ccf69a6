"""Write a score array: the one creation path every method goes through.

:class:`ScoreArrayWriter` creates the array (header, ids, checksummed chunks), takes score
columns in order in blocks of any width, writes them in whole chunks, and flags the array
``complete`` only after its last column; an array whose writer stopped early is refused by
:meth:`~lightning_bergson.scores.ScoreArray.open`. :func:`write_scores` writes scores held
in memory through it.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from ..store.location import Location, StorePath
from ..store.schema import require_writable
from .format import Convention, ScoreHeader, ScoreSettings

__all__ = ["ScoreArrayWriter", "write_scores"]

ChunkBytes = 2**22  # about 4 MiB of float32 scores per chunk
IdLike = np.ndarray | torch.Tensor | list[int]


def _as_ids(values: IdLike, what: str, count: int | None = None) -> np.ndarray:
    ids = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.int64)
    ids = ids.reshape(-1)
    if count is not None and len(ids) != count:
        raise ValueError(f"{what} has {len(ids)} entries; expected {count} (one per column)")
    return ids


def _checked_array(group: zarr.Group, name: str, **kwargs: Any) -> zarr.Array:
    """An array of a score array: crc32c in every chunk, every chunk stored."""
    return group.create_array(
        name, compressors=(Crc32cCodec(),), config={"write_empty_chunks": True}, **kwargs
    )


class ScoreArrayWriter:
    """Streams score columns ``[Q, n(, S)]`` into a new score array, in whole chunks.

    Args:
        path: Output directory (``*.zarr``).
        header: Method, convention, settings and metadata (``complete`` is managed here).
        num_queries: ``Q``, rows of the score array.
        example_ids: ``[N]`` example id of every column.
        query_ids: ``[Q]`` query numbering (default ``0..Q-1``).
        tokens: ``S`` for per-token scores ``[Q, N, S]``; ``None`` for ``[Q, N]``.
        epochs: ``[N]`` epoch of every column, when columns are stored rows.
        steps: ``[N]`` optimizer step of every column, when columns are stored rows.
        chunk_cols: Columns per chunk (default: about 4 MiB of scores).
        overwrite: Replace an existing array at ``path``.
        storage_options: Options of a URL's fsspec filesystem (``path`` may be a URL such as
            ``s3://bucket/scores.zarr``).

    Example:
        >>> import tempfile
        >>> from lightning_bergson.scores import ScoreArray
        >>> path = f"{tempfile.mkdtemp()}/s.zarr"
        >>> with ScoreArrayWriter(path, ScoreHeader("demo", "influence"), num_queries=1,
        ...                       example_ids=[4, 5, 6], chunk_cols=2) as w:
        ...     w.add(np.array([[1.0]])); w.add(np.array([[2.0, 3.0]]))
        >>> ScoreArray.open(path).scores.tolist()
        [[1.0, 2.0, 3.0]]
    """

    def __init__(
        self,
        path: StorePath,
        header: ScoreHeader,
        *,
        num_queries: int,
        example_ids: IdLike,
        query_ids: IdLike | None = None,
        tokens: int | None = None,
        epochs: IdLike | None = None,
        steps: IdLike | None = None,
        chunk_cols: int | None = None,
        overwrite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        ids = _as_ids(example_ids, "example_ids")
        qids = np.arange(num_queries) if query_ids is None else query_ids
        qids = _as_ids(qids, "query_ids", num_queries)
        rows = {
            k: _as_ids(v, k, len(ids))
            for k, v in (("epochs", epochs), ("steps", steps))
            if v is not None
        }
        if rows and header.settings.columns != "rows":
            raise ValueError(
                "epochs/steps describe stored rows but the header says columns="
                f"{header.settings.columns!r}; pass ScoreSettings(columns='rows', ...)"
            )
        self.location = Location.of(path, storage_options)
        self.path = self.location.path  # a Path, or the Location of a URL
        exists = self.location.exists()
        if exists and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True or choose another path")
        require_writable(self.location, "a score array", with_parent=exists)
        if exists and self.location.remote:
            self.location.remove()  # mode="w" below clears a local directory itself
        attrs = {**header.to_json(), "complete": False}
        self.group = zarr.open_group(self.location.zarr_store(), mode="w", attributes=attrs)
        _checked_array(self.group, "example_ids", data=ids)
        _checked_array(self.group, "query_ids", data=qids)
        for name, values in rows.items():
            _checked_array(self.group, name, data=values)
        per_col = num_queries * (tokens or 1)
        self.cols = chunk_cols or max(1, ChunkBytes // (4 * max(1, per_col)))
        self.cols = max(1, min(self.cols, len(ids)))
        tail = () if tokens is None else (tokens,)
        self.array = _checked_array(
            self.group, "scores", shape=(num_queries, len(ids), *tail), dtype="float32",
            chunks=(num_queries, self.cols, *tail), fill_value=0.0,
        )  # fmt: skip
        self.num_cols, self.start = len(ids), 0
        self.pending: list[np.ndarray] = []

    def add(self, block: np.ndarray | torch.Tensor) -> None:
        """Append the next columns ``[Q, n(, S)]`` (written once a whole chunk is buffered)."""
        if isinstance(block, torch.Tensor):
            block = block.detach().cpu().float().numpy()
        block = np.asarray(block, dtype=np.float32)
        want = (self.array.shape[0], *self.array.shape[2:])
        if block.ndim != self.array.ndim or (block.shape[0], *block.shape[2:]) != want:
            raise ValueError(
                f"a score block must be [Q, n{', S' if len(want) > 1 else ''}] with Q, S = "
                f"{want}; got {block.shape}"
            )
        buffered = sum(p.shape[1] for p in self.pending) + block.shape[1]
        if self.start + buffered > self.num_cols:
            raise ValueError(
                f"{self.start + buffered} score columns given for {self.num_cols} example ids"
            )
        self.pending.append(block)
        if buffered >= self.cols:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        """Write the buffered columns: whole chunks only, unless this is the end."""
        if not self.pending:
            return
        block = np.concatenate(self.pending, axis=1)  # (Q, n(, S))
        n = block.shape[1] if final else block.shape[1] // self.cols * self.cols
        if n:
            self.array[:, self.start : self.start + n] = block[:, :n]
            self.start += n
        self.pending = [block[:, n:]] if n < block.shape[1] else []

    def close(self) -> Path | Location:
        """Write what is buffered and flag the array complete; refuses a short array."""
        self._flush(final=True)
        if self.start != self.num_cols:
            raise ValueError(
                f"{self.path}: {self.start} of {self.num_cols} score columns were written; "
                "the array stays incomplete (readers refuse it). Give every column."
            )
        self.group.attrs.update({"complete": True})
        return self.path

    def __enter__(self) -> ScoreArrayWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:  # after an error the array stays incomplete, and is refused
            self.close()


def write_scores(
    path: str | Path,
    scores: np.ndarray | torch.Tensor,
    example_ids: IdLike,
    *,
    method: str,
    convention: Convention,
    query_ids: IdLike | None = None,
    metadata: dict[str, Any] | None = None,
    settings: ScoreSettings | None = None,
    epochs: IdLike | None = None,
    steps: IdLike | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Path | Location:
    """Write ``scores`` ``[Q, N(, S)]`` with their example and query ids.

    Args:
        path: Output directory (``*.zarr``).
        scores: ``[Q, N]`` or per-token ``[Q, N, S]`` scores.
        example_ids: ``[N]`` example id of every column.
        method: What computed the scores (``"ekfac"``, ``"magic"``, ...).
        convention: ``"influence"`` or ``"metagradient"`` (see :mod:`.format`).
        query_ids: ``[Q]`` query numbering (default ``0..Q-1``).
        metadata: JSON values saved with the array (query texts, ``relevant`` ids, ...).
        settings: How the scores were made (store, preconditioner, rows or examples);
            default: read from the ``store``, ``preconditioner``, ``example_reduce`` and
            ``query_reduce`` entries of ``metadata`` where present.
        epochs: ``[N]`` epoch of every column, when the columns are stored rows.
        steps: ``[N]`` optimizer step of every column, when the columns are stored rows.
        overwrite: Replace an existing array at ``path``.
        storage_options: Options of a URL's fsspec filesystem.

    Example:
        >>> import tempfile
        >>> from lightning_bergson.scores import ScoreArray
        >>> p = write_scores(f"{tempfile.mkdtemp()}/s.zarr", np.eye(2), [7, 9],
        ...                  method="demo", convention="influence")
        >>> ScoreArray.open(p).example_ids.tolist()
        [7, 9]
    """
    arr = scores.detach().cpu().float().numpy() if isinstance(scores, torch.Tensor) else scores
    arr = np.asarray(arr, dtype=np.float32)
    ids = _as_ids(example_ids, "example_ids")
    if arr.ndim not in (2, 3) or arr.shape[1] != len(ids):
        raise ValueError(
            f"scores must be [Q, N] or [Q, N, S] with N = len(example_ids) = {len(ids)}; "
            f"got {arr.shape}"
        )
    meta = metadata or {}
    header = ScoreHeader(method, convention, settings or ScoreSettings.from_metadata(meta), meta)
    with ScoreArrayWriter(
        path, header, num_queries=arr.shape[0], example_ids=ids, query_ids=query_ids,
        tokens=arr.shape[2] if arr.ndim == 3 else None, epochs=epochs, steps=steps,
        overwrite=overwrite, storage_options=storage_options,
    ) as writer:  # fmt: skip
        writer.add(arr)
    return writer.path
