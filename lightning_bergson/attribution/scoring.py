"""Streaming scores over row chunks: inner product or cosine, running top-k, per-example reduce.

Pure torch: a chunk is a ``[n, D]`` tensor of stored rows, queries are ``[Q, D]``. Memory
is bounded by one chunk plus ``[Q, k]`` running results (or ``[Q, U]`` when rows are reduced
per example id), whatever the number of rows.

Example:
    >>> rows = torch.randn(10, 4)
    >>> q = torch.randn(2, 4)
    >>> top = TopK.empty(2, 3, largest=True)
    >>> for start in range(0, 10, 4):
    ...     top = top.merge(chunk_scores(rows[start:start + 4], q), start)
    >>> torch.equal(top.rows, (q @ rows.T).topk(3).indices)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..store.scan import prefetch  # its home is the store's scanner; kept importable here

__all__ = [
    "ExampleReduce",
    "ExampleReducer",
    "TopK",
    "chunk_scores",
    "prefetch",
    "unit_rows",
]

ExampleReduce = Literal["none", "sum", "mean", "max"]


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` ``[n, D]`` scaled to unit norm; all-zero rows stay zero."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # (n, 1)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def chunk_scores(
    rows: Tensor,
    queries: Tensor,
    *,
    unit_norm: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Scores ``[Q, n]`` of ``queries`` ``[Q, D]`` (already processed) against ``rows`` ``[n, D]``.

    Args:
        rows: Stored rows, any float dtype (cast to the queries' dtype).
        queries: Processed queries (preconditioned, unit norm for cosine).
        unit_norm: Divide each row's score by the row's norm (after ``transform``): cosine.
        transform: Applied to the rows first (e.g. ``H^-1/2`` per block).
    """
    x = rows.to(queries.dtype)
    if transform is not None:
        x = transform(x)
    scores = queries @ x.T  # (Q, n)
    if unit_norm:
        norm = torch.linalg.vector_norm(x, dim=1)  # (n,)
        scores = scores / torch.where(norm > 0, norm, torch.ones_like(norm))
    return scores


@dataclass
class TopK:
    """Running top-k (largest or smallest) scores and their row numbers per query.

    Example:
        >>> t = TopK.empty(1, 2, largest=False).merge(torch.tensor([[3.0, 1.0, 2.0]]), 10)
        >>> t.scores.tolist(), t.rows.tolist()
        ([[1.0, 2.0]], [[11, 12]])
    """

    scores: Tensor  # (Q, <=k)
    rows: Tensor  # (Q, <=k) int64
    k: int
    largest: bool

    @classmethod
    def empty(
        cls, num_queries: int, k: int, *, largest: bool, dtype: torch.dtype = torch.float32
    ) -> TopK:
        """No candidates yet."""
        return cls(
            torch.empty(num_queries, 0, dtype=dtype),
            torch.empty(num_queries, 0, dtype=torch.int64),
            k,
            largest,
        )

    def merge(self, scores: Tensor, start: int | Tensor) -> TopK:
        """Merge the scores ``[Q, n]`` of rows ``start .. start + n`` (or row numbers ``[n]``).

        Non-finite scores (rows flagged ``finite=False``) rank last.
        """
        n = scores.shape[1]
        device = scores.device
        if isinstance(start, Tensor):
            rows = start.to(device, torch.int64).expand(scores.shape[0], n)
        else:
            rows = torch.arange(start, start + n, dtype=torch.int64, device=device)
            rows = rows.expand(scores.shape[0], n)
        fill = float("-inf") if self.largest else float("inf")
        scores = torch.where(torch.isnan(scores), torch.full_like(scores, fill), scores)
        cand = torch.cat([self.scores.to(scores), scores], dim=1)  # (Q, k + n)
        cand_rows = torch.cat([self.rows.to(device), rows], dim=1)  # (Q, k + n)
        k = min(self.k, cand.shape[1])
        vals, pos = cand.topk(k, dim=1, largest=self.largest, sorted=True)  # (Q, k)
        return TopK(vals, cand_rows.gather(1, pos), self.k, self.largest)


class ExampleReducer:
    """Reduce row scores ``[Q, n]`` to one score per example id (``sum``, ``mean`` or ``max``).

    A store holds one row per example and epoch; reducing gives one score per dataset row.

    Args:
        example_ids: ``[N]`` example id of every store row.
        num_queries: ``Q``.
        how: ``"sum"``, ``"mean"`` or ``"max"`` over the rows of an example.
        dtype: Accumulator dtype.

    Example:
        >>> r = ExampleReducer(np.array([7, 3, 7]), 1, "mean")
        >>> r.add(torch.tensor([[1.0, 5.0, 3.0]]), 0)
        >>> scores, ids = r.result()
        >>> scores.tolist(), ids.tolist()
        ([[5.0, 2.0]], [3, 7])
    """

    def __init__(
        self,
        example_ids: np.ndarray,
        num_queries: int,
        how: ExampleReduce,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if how not in ("sum", "mean", "max"):
            raise ValueError(f"example_reduce={how!r} is not one of 'sum', 'mean', 'max'")
        unique, inverse = np.unique(np.asarray(example_ids), return_inverse=True)
        self.ids = torch.from_numpy(unique.astype(np.int64))
        self.inverse = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        self.how = how
        fill = float("-inf") if how == "max" else 0.0
        self.acc = torch.full((num_queries, len(unique)), fill, dtype=dtype)  # (Q, U)
        self.counts = torch.bincount(self.inverse, minlength=len(unique)).to(dtype)  # (U,)

    def add(self, scores: Tensor, start: int) -> None:
        """Add the scores ``[Q, n]`` of rows ``start .. start + n``."""
        idx = self.inverse[start : start + scores.shape[1]].to(scores.device)
        acc = self.acc.to(scores.device)
        if self.how == "max":
            index = idx.expand_as(scores)
            self.acc = acc.scatter_reduce(1, index, scores.to(acc.dtype), reduce="amax")
        else:
            self.acc = acc.index_add(1, idx, scores.to(acc.dtype))

    def result(self) -> tuple[Tensor, Tensor]:
        """``(scores [Q, U], example_ids [U])``, ids sorted ascending."""
        if self.how == "mean":
            return self.acc / self.counts.to(self.acc).clamp(min=1), self.ids
        return self.acc, self.ids
