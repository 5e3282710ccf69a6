"""Score arrays: one attribution score per (query, training example[, token]) in Zarr.

Every method writes the same layout, so reports and the LDS evaluation read any of
them (gradient similarity, EK-FAC influence, MAGIC metagradients)::

    scores.zarr/
      zarr.json        attrs: format, schema_version, method, convention, metadata,
                       complete (False until the last column is written)
      scores           [Q, N] float32 (or [Q, N, S] per token)
      example_ids      [N] int64   dataset rows of the training examples
      query_ids        [Q] int64   caller's query numbering (0..Q-1 by default)

``convention`` fixes the sign, which differs between methods:

* ``"influence"``: positive = training on the example *lowers* the query loss
  (helpful); gradient inner products, cosine and EK-FAC influence use it.
* ``"metagradient"``: the score is ``d L_query / d w_i``; negative = upweighting the
  example lowers the query loss (helpful). MAGIC uses it.

:func:`helpfulness` turns either into "higher = more helpful".

Arrays of schema 2 carry a crc32c checksum in every chunk and store every chunk, so
:meth:`ScoreArray.open` refuses a damaged or missing chunk, and an array whose writer
stopped before the end (``complete`` False), instead of reading zeros as scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from .store.schema import StoreIntegrityError, require_writable

__all__ = ["CONVENTIONS", "ScoreArray", "helpfulness", "write_scores"]

FORMAT = "lightning_bergson.scores"
SCHEMA_VERSION = 2  # 2: crc32c in every chunk, every chunk stored, `complete`
CONVENTIONS = ("influence", "metagradient")
Convention = Literal["influence", "metagradient"]


@dataclass
class ScoreArray:
    """Scores read back from disk (small enough to hold in memory)."""

    scores: np.ndarray  # (Q, N) or (Q, N, S)
    example_ids: np.ndarray  # (N,)
    query_ids: np.ndarray  # (Q,)
    method: str
    convention: Convention
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ScoreArray:
        """Read a score array written by :func:`write_scores`."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"no score array at {path}")
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lightning_bergson score array")
        if attrs.get("complete") is False:
            raise ValueError(
                f"The score array at {path} is incomplete: the command writing it stopped "
                "before its last column (interrupted, or it failed). Write it again (e.g. "
                "rerun `score ... --overwrite true`)."
            )
        checked = int(attrs.get("schema_version", 1)) >= 2
        data = {name: _read_checked(group, name, path, checked) for name in _ARRAYS}
        return cls(
            scores=data["scores"],
            example_ids=data["example_ids"],
            query_ids=data["query_ids"],
            method=str(attrs["method"]),
            convention=attrs["convention"],  # type: ignore[arg-type]
            metadata=dict(attrs.get("metadata", {})),  # type: ignore[arg-type]
        )

    def helpful(self) -> np.ndarray:
        """Scores with "higher = more helpful to the query" whatever the convention."""
        return helpfulness(self.scores, self.convention)


_ARRAYS = ("scores", "example_ids", "query_ids")


def _read_checked(group: zarr.Group, name: str, path: Path, checked: bool) -> np.ndarray:
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


def create_checked_array(group: zarr.Group, name: str, **kwargs: Any) -> zarr.Array:
    """An array of a score array: crc32c in every chunk, every chunk stored."""
    return group.create_array(
        name, compressors=(Crc32cCodec(),), config={"write_empty_chunks": True}, **kwargs
    )


def mark_complete(group: zarr.Group) -> None:
    """Flag a score array finished (readers refuse it until then)."""
    group.attrs.update({"complete": True})


def helpfulness(scores: np.ndarray | torch.Tensor, convention: str) -> np.ndarray:
    """Flip metagradients so that higher always means "lowers the query loss more"."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    arr = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return -arr if convention == "metagradient" else arr


def write_scores(
    path: str | Path,
    scores: np.ndarray | torch.Tensor,
    example_ids: np.ndarray | torch.Tensor | list[int],
    *,
    method: str,
    convention: Convention,
    query_ids: np.ndarray | torch.Tensor | list[int] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``scores`` ``[Q, N(, S)]`` with their example and query ids.

    Example:
        >>> import tempfile
        >>> p = write_scores(f"{tempfile.mkdtemp()}/s.zarr", np.eye(2), [7, 9],
        ...                  method="demo", convention="influence")
        >>> ScoreArray.open(p).example_ids.tolist()
        [7, 9]
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    arr = scores.detach().cpu().float().numpy() if isinstance(scores, torch.Tensor) else scores
    arr = np.asarray(arr, dtype=np.float32)
    ids = np.asarray(example_ids, dtype=np.int64).reshape(-1)
    if arr.ndim not in (2, 3) or arr.shape[1] != len(ids):
        raise ValueError(
            f"scores must be [Q, N] or [Q, N, S] with N = len(example_ids) = {len(ids)}; "
            f"got {arr.shape}"
        )
    qids = np.arange(arr.shape[0]) if query_ids is None else np.asarray(query_ids)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    require_writable(path, "a score array", with_parent=path.exists())
    attrs = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "convention": convention,
        "metadata": metadata or {},
        "complete": False,
    }
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    create_checked_array(group, "scores", data=arr)
    create_checked_array(group, "example_ids", data=ids)
    create_checked_array(group, "query_ids", data=qids.astype(np.int64))
    mark_complete(group)
    return path
