"""Score arrays: one attribution score per (query, training example[, token]) in Zarr.

Every method writes the same layout, so reports and the LDS evaluation read any of
them (gradient similarity, EK-FAC influence, MAGIC metagradients)::

    scores.zarr/
      zarr.json        attrs: format, schema_version, method, convention, metadata
      scores           [Q, N] float32 (or [Q, N, S] per token)
      example_ids      [N] int64   dataset rows of the training examples
      query_ids        [Q] int64   caller's query numbering (0..Q-1 by default)

``convention`` fixes the sign, which differs between methods:

* ``"influence"``: positive = training on the example *lowers* the query loss
  (helpful); gradient inner products, cosine and EK-FAC influence use it.
* ``"metagradient"``: the score is ``d L_query / d w_i``; negative = upweighting the
  example lowers the query loss (helpful). MAGIC uses it.

:func:`helpfulness` turns either into "higher = more helpful".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr

__all__ = ["CONVENTIONS", "ScoreArray", "helpfulness", "write_scores"]

FORMAT = "lightning_bergson.scores"
SCHEMA_VERSION = 1
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
        return cls(
            scores=np.asarray(group["scores"][...]),
            example_ids=np.asarray(group["example_ids"][...]),
            query_ids=np.asarray(group["query_ids"][...]),
            method=str(attrs["method"]),
            convention=attrs["convention"],  # type: ignore[arg-type]
            metadata=dict(attrs.get("metadata", {})),  # type: ignore[arg-type]
        )

    def helpful(self) -> np.ndarray:
        """Scores with "higher = more helpful to the query" whatever the convention."""
        return helpfulness(self.scores, self.convention)


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
    attrs = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "convention": convention,
        "metadata": metadata or {},
    }
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    group.create_array("scores", data=arr, compressors=None)
    group.create_array("example_ids", data=ids)
    group.create_array("query_ids", data=qids.astype(np.int64))
    return path
