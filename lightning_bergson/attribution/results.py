"""What the Attributor returns: search results, trace results, and query-row collection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..store import ModuleBlock

__all__ = ["RowSink", "SearchResult", "TraceResult"]


@dataclass
class SearchResult:
    """Top-k training examples per query.

    Attributes:
        scores: ``[Q, k]`` scores, best first (largest, or smallest with ``reverse``).
        indices: ``[Q, k]`` example ids (dataset rows) of the matches.
        rows: ``[Q, k]`` store rows of the matches (``-1`` when rows are reduced per example).

    Example:
        >>> r = SearchResult(torch.tensor([[0.9]]), torch.tensor([[42]]), torch.tensor([[3]]))
        >>> r.indices.tolist(), r.rows.tolist()
        ([[42]], [[3]])
    """

    scores: Tensor
    indices: Tensor
    rows: Tensor


class TraceResult:
    """Filled in when :meth:`Attributor.trace` exits: ``indices``, ``scores``, ``rows``,
    and the query rows themselves (``queries`` ``[Q, D]``).

    Example:
        >>> result = TraceResult()
        >>> result.indices
        Traceback (most recent call last):
        ...
        ValueError: no result yet: read it after the `with attr.trace(...)` block
    """

    def __init__(self) -> None:
        self._result: SearchResult | None = None
        self.queries: Tensor | None = None

    def _get(self) -> SearchResult:
        if self._result is None:
            raise ValueError("no result yet: read it after the `with attr.trace(...)` block")
        return self._result

    @property
    def indices(self) -> Tensor:
        """``[Q, k]`` example ids."""
        return self._get().indices

    @property
    def scores(self) -> Tensor:
        """``[Q, k]`` scores."""
        return self._get().scores

    @property
    def rows(self) -> Tensor:
        """``[Q, k]`` store rows (``-1`` when reduced per example)."""
        return self._get().rows


class RowSink:
    """Collects ``(block, rows)`` from a collector's closure; one entry per backward pass.

    Example:
        >>> sink = RowSink()
        >>> sink.add("fc", torch.ones(2, 3)); sink.add("fc", torch.zeros(1, 3))
        >>> blocks = [ModuleBlock("fc", 0, 3, (1, 3), "fc"), ModuleBlock("o", 3, 2, (1, 2), "o")]
        >>> sink.rows(blocks).tolist()   # a block no backward reached is zero
        [[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(self) -> None:
        self.parts: dict[str, list[Tensor]] = {}

    @property
    def empty(self) -> bool:
        """No rows were collected (no backward pass reached a tracked module)."""
        return not self.parts

    def add(self, block: str, rows: Tensor) -> None:
        """The collector's closure: rows ``[B, d]`` of ``block`` from one backward pass."""
        self.parts.setdefault(block, []).append(rows.detach().cpu())

    def rows(self, blocks: Sequence[ModuleBlock]) -> Tensor:
        """Query rows ``[Q, D]`` in the order of ``blocks`` (the store's)."""
        counts = {len(v) for v in self.parts.values()}
        if len(counts) != 1:
            raise ValueError(
                "some tracked modules saw a different number of backward passes than others; "
                "run one forward and one backward per query batch inside trace()"
            )
        num = sum(t.shape[0] for t in next(iter(self.parts.values())))
        out = []
        for b in blocks:
            part = self.parts.get(b.name)
            out.append(torch.cat(part) if part else torch.zeros(num, b.size))
        return torch.cat(out, dim=1)  # (Q, D)
