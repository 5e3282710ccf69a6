"""Score many queries over a whole store into the shared Zarr score format, chunk by chunk.

The layout is :mod:`lightning_bergson.scores`'s (read it back with ``ScoreArray.open``);
columns are written as the store streams by, so memory holds one ``[Q, chunk]`` block.
``query_reduce="mean"``/``"max"`` reduces over queries first (LESS-style data selection:
one score per training example for a whole query set), giving a ``[1, N]`` array.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from torch import Tensor

from ..scores import FORMAT, SCHEMA_VERSION, create_checked_array, mark_complete
from ..store.schema import require_writable
from .attributor import Attributor, Queries

__all__ = ["QueryReduce", "reduce_queries", "write_score_array"]

QueryReduce = Literal["none", "mean", "max"]


def reduce_queries(scores: Tensor, how: QueryReduce) -> Tensor:
    """``[Q, n]`` -> ``[Q, n]`` (``"none"``) or ``[1, n]`` (``"mean"``/``"max"`` over queries).

    Example:
        >>> import torch
        >>> reduce_queries(torch.tensor([[1.0, 4.0], [3.0, 0.0]]), "max").tolist()
        [[3.0, 4.0]]
    """
    if how == "none":
        return scores
    if how == "mean":
        return scores.mean(dim=0, keepdim=True)  # (1, n)
    if how == "max":
        return scores.amax(dim=0, keepdim=True)  # (1, n)
    raise ValueError(f"query_reduce={how!r} is not one of 'none', 'mean', 'max'")


class _ColumnWriter:
    """Buffers score columns in order and writes them in whole chunks of ``cols``."""

    def __init__(self, array: zarr.Array, cols: int) -> None:
        self.array, self.cols, self.start = array, cols, 0
        self.pending: list[np.ndarray] = []

    def add(self, block: np.ndarray) -> None:
        self.pending.append(block)
        if sum(p.shape[1] for p in self.pending) >= self.cols:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            block = np.concatenate(self.pending, axis=1)  # (Q', n)
            self.array[:, self.start : self.start + block.shape[1]] = block
            self.start += block.shape[1]
            self.pending.clear()


def _create(
    path: Path,
    shape: tuple[int, int],
    example_ids: np.ndarray,
    attrs: dict[str, Any],
    chunk_cols: int,
    overwrite: bool,
) -> zarr.Array:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    require_writable(path, "a score array", with_parent=path.exists())
    group = zarr.open_group(str(path), mode="w", attributes={**attrs, "complete": False})
    create_checked_array(group, "example_ids", data=np.asarray(example_ids, dtype=np.int64))
    create_checked_array(group, "query_ids", data=np.arange(shape[0], dtype=np.int64))
    chunks = (shape[0], max(1, min(chunk_cols, shape[1])))
    return create_checked_array(
        group, "scores", shape=shape, dtype="float32", chunks=chunks, fill_value=0.0
    )


def write_score_array(
    attributor: Attributor,
    queries: Queries,
    path: str | Path,
    *,
    query_reduce: QueryReduce = "none",
    modules: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Score ``queries`` against every row (or example) of the attributor's store.

    Args:
        attributor: Decides the similarity (inner product or cosine), the preconditioner
            and whether rows are reduced per example id (``example_reduce``).
        queries: ``[Q, D]`` query rows.
        path: Output directory (``*.zarr``).
        query_reduce: ``"none"`` keeps ``[Q, N]``; ``"mean"``/``"max"`` store ``[1, N]``.
        modules: Score only these blocks.
        metadata: JSON-able entries saved under ``attrs["metadata"]`` (e.g. query texts).
        overwrite: Replace an existing array at ``path``.

    Returns:
        ``path``; read it with ``ScoreArray.open`` (``convention="influence"``).
    """
    path = Path(path)
    num_q = attributor._as_rows(queries).shape[0]
    out_q = num_q if query_reduce == "none" else 1
    method = "gradient_cosine" if attributor.unit_norm else "gradient_inner_product"
    meta = {
        "store": str(attributor.store.path),
        "unit_norm": attributor.unit_norm,
        "preconditioned": attributor.preconditioner is not None,
        "query_mix": attributor.query_mix,
        "example_reduce": attributor.example_reduce,
        "query_reduce": query_reduce,
        "modules": list(modules) if modules else None,
        **(metadata or {}),
    }
    attrs = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "method": method,
        "convention": "influence",
        "metadata": meta,
    }
    if attributor.example_reduce != "none":
        scores, ids = attributor.scores(queries, modules=modules)
        array = _create(path, (out_q, len(ids)), ids, attrs, len(ids), overwrite)
        array[:, :] = reduce_queries(scores, query_reduce).float().numpy()
        mark_complete(zarr.open_group(str(path), mode="r+"))
        return path
    ids = attributor.store.example_ids
    scan = attributor.chunk_rows
    cols = scan * max(1, 2**22 // (4 * out_q * scan))  # about 4 MiB per score chunk
    array = _create(path, (out_q, len(ids)), ids, attrs, cols, overwrite)
    writer = _ColumnWriter(array, cols)

    def consume(scores: Tensor, start: int) -> None:
        writer.add(reduce_queries(scores, query_reduce).float().cpu().numpy())  # (Q', n)

    attributor._scan(queries, modules, consume)
    writer.flush()
    mark_complete(zarr.open_group(str(path), mode="r+"))
    return path
