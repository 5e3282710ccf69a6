"""Read a score array: one attribution score per (query, training row or example[, token]).

Every method writes the same layout (:mod:`lightning_bergson.scores.writer`), so reports
and the LDS evaluation read any of them (gradient similarity, EK-FAC influence, MAGIC
metagradients)::

    scores.zarr/
      zarr.json        attrs: the header (:class:`~lightning_bergson.scores.ScoreHeader`)
      scores           [Q, N] float32 (or [Q, N, S] per token)
      example_ids      [N] int64   dataset rows of the training examples
      query_ids        [Q] int64   caller's query numbering (0..Q-1 by default)
      epochs, steps    [N] int64   optional: epoch and optimizer step of each column when
                                   columns are stored rows (one per example and epoch)

Arrays of schema 2 carry a crc32c checksum in every chunk and store every chunk, so
:meth:`ScoreArray.open` refuses a damaged or missing chunk, and an array whose writer
stopped before the end (``complete`` False), instead of reading zeros as scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..store.location import Location, StorePath
from ..store.schema import StoreIntegrityError
from .format import Convention, ScoreHeader, ScoreSettings, helpfulness

__all__ = ["ROW_ARRAYS", "ScoreArray"]

ARRAYS = ("scores", "example_ids", "query_ids")
ROW_ARRAYS = ("epochs", "steps")  # optional, [N]


@dataclass
class ScoreArray:
    """Scores read back from disk (small enough to hold in memory).

    Example:
        >>> import tempfile
        >>> from lightning_bergson.scores import write_scores
        >>> p = write_scores(f"{tempfile.mkdtemp()}/s.zarr", np.eye(2), [7, 9],
        ...                  method="demo", convention="influence")
        >>> arr = ScoreArray.open(p)
        >>> arr.example_ids.tolist(), arr.settings.columns
        ([7, 9], 'examples')
    """

    scores: np.ndarray  # (Q, N) or (Q, N, S)
    example_ids: np.ndarray  # (N,)
    query_ids: np.ndarray  # (Q,)
    method: str
    convention: Convention
    metadata: dict[str, Any]
    settings: ScoreSettings | None = None
    epochs: np.ndarray | None = None  # (N,) epoch of each column, when columns are rows
    steps: np.ndarray | None = None  # (N,) optimizer step of each column

    @classmethod
    def open(cls, path: StorePath, *, storage_options: dict[str, Any] | None = None) -> ScoreArray:
        """Read a score array written by :func:`~lightning_bergson.scores.write_scores`.

        Args:
            path: A local directory or a URL (``s3://bucket/scores.zarr``).
            storage_options: Options of a URL's fsspec filesystem.
        """
        where = Location.of(path, storage_options)
        path = where.path
        if not (where / "zarr.json").is_file():
            raise FileNotFoundError(f"no score array at {path}")
        group = zarr.open_group(where.zarr_store(read_only=True), mode="r")
        header = ScoreHeader.from_json(dict(group.attrs), where=path)
        if not header.complete:
            raise ValueError(
                f"The score array at {path} is incomplete: the command writing it stopped "
                "before its last column (interrupted, or it failed). Write it again (e.g. "
                "rerun `score ... --overwrite true`)."
            )
        checked = int(group.attrs.get("schema_version", 1)) >= 2  # type: ignore[arg-type]
        data = {name: _read_checked(group, name, path, checked) for name in ARRAYS}
        rows = {n: _read_checked(group, n, path, checked) for n in ROW_ARRAYS if n in group}
        return cls(
            scores=data["scores"],
            example_ids=data["example_ids"],
            query_ids=data["query_ids"],
            method=header.method,
            convention=header.convention,
            metadata=header.metadata,
            settings=header.settings,
            epochs=rows.get("epochs"),
            steps=rows.get("steps"),
        )

    @property
    def header(self) -> ScoreHeader:
        """The array's header (method, convention, settings, metadata)."""
        settings = self.settings or ScoreSettings.from_metadata(self.metadata)
        return ScoreHeader(self.method, self.convention, settings, self.metadata, complete=True)

    def helpful(self) -> np.ndarray:
        """Scores with "higher = more helpful to the query" whatever the convention."""
        return helpfulness(self.scores, self.convention)


def _read_checked(group: zarr.Group, name: str, path: Any, checked: bool) -> np.ndarray:
    """Read one array; on schema 2 a missing or damaged chunk is an error, never zeros."""
    array = group[name]
    assert isinstance(array, zarr.Array)
    fix = "Write the score array again (rerun the command that made it)."
    if checked and array.nchunks_initialized != array.nchunks:
        raise StoreIntegrityError(
            f"{path}/{name}: {array.nchunks - array.nchunks_initialized} of its "
            f"{array.nchunks} chunks are missing. {fix}"
        )
    try:
        return np.asarray(array[...])
    except Exception as err:  # crc32c mismatch, a cut chunk: whatever zarr raises
        raise StoreIntegrityError(f"{path}/{name} has a damaged chunk ({err}). {fix}") from err
