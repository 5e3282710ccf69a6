"""StreamingScorer: scores of queries against every row of a store, one chunk at a time.

Queries are processed once (block selection, the preconditioner's power, unit norm for
cosine); the store is read by :class:`~lightning_bergson.store.StoreScanner` (read ahead,
checksums verified) and each chunk of rows ``[n, D_sel]`` gives scores ``[Q, n]``. Memory
holds one chunk, whatever the store's size.

Two-sided (cosine) preconditioning needs ``|H^-1/2 g|`` of every row: the first scan
computes it; later scans with the same preconditioner and blocks reuse it and fold
``H^-1/2`` into the query instead (``(H^-1/2 q) . g / |H^-1/2 g|``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..store import GradientStore, ModuleBlock, StoreScanner
from .preconditioners import SecondMomentPreconditioner
from .scoring import chunk_scores, unit_rows

__all__ = ["ScoreChunk", "StreamingScorer"]


class ScoreChunk(NamedTuple):
    """Scores of every query against store rows ``start .. start + n``."""

    start: int
    scores: Tensor  # (Q, n)
    example_ids: np.ndarray  # (n,) int64


class StreamingScorer:
    """Inner-product or cosine scores of processed queries, streamed over a store.

    Args:
        store: The gradient store.
        device: Where scores are computed.
        dtype: Scoring dtype.
        unit_norm: Cosine similarity instead of inner products.
        chunk_rows: Rows per chunk read.

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> with GradientStoreWriter(path, modules=layout_blocks([("fc", (1, 2), "fc", None)]),
        ...                          dtype="float32") as w:
        ...     w.append(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), example_id=[7, 8], step=0,
        ...              epoch=0)
        >>> scorer = StreamingScorer(GradientStore.open(path), chunk_rows=1)
        >>> q, blocks = torch.tensor([[3.0, 1.0]]), scorer.blocks(None)
        >>> [(c.start, c.scores.tolist()) for c in scorer.iter_scores(q, blocks, None)]
        [(0, [[3.0]]), (1, [[2.0]])]
    """

    def __init__(
        self,
        store: GradientStore,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        unit_norm: bool = False,
        chunk_rows: int = 65536,
    ) -> None:
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.unit_norm, self.chunk_rows = unit_norm, chunk_rows
        self._row_norms: dict[tuple, Tensor] = {}  # |H^-1/2 g| per row, see iter_scores

    def blocks(self, modules: Sequence[str] | None) -> list[ModuleBlock]:
        """The store blocks named by ``modules`` (names, parents or globs), in store order."""
        if modules is None:
            return list(self.store.modules)
        cols = set(self.store.columns(modules).tolist())
        return [b for b in self.store.modules if b.offset in cols]

    def process(
        self,
        full: Tensor,
        blocks: Sequence[ModuleBlock],
        pre: SecondMomentPreconditioner | None,
    ) -> Tensor:
        """Queries ``[Q, D]`` -> ``[Q, D_sel]`` ready to be dotted with stored rows.

        Raises:
            ValueError: a query row is not finite (every score against it would be NaN).
        """
        cols = np.concatenate([np.arange(b.offset, b.offset + b.size) for b in blocks])
        q = full[:, torch.from_numpy(cols)].to(torch.float64)  # (Q, D_sel)
        bad = (~torch.isfinite(q).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"query rows {bad[:10]} have non-finite gradients (NaN or inf), so every score "
                "against them would be NaN or -inf. Check the query loss (a NaN or overflowing "
                "loss, labels that select no token) and the model's weights."
            )
        if pre is not None:
            q = pre.apply(q, -0.5 if self.unit_norm else -1.0, blocks)
        if self.unit_norm:
            q = unit_rows(q)
        return q.to(self.device, self.dtype)

    def iter_scores(
        self,
        q: Tensor,
        blocks: Sequence[ModuleBlock],
        pre: SecondMomentPreconditioner | None,
        *,
        cache_norms: bool = False,
        span: tuple[int, int] | None = None,
    ) -> Iterator[ScoreChunk]:
        """Scores of processed queries ``q`` ``[Q, D_sel]`` (:meth:`process`), chunk by chunk.

        Args:
            q: Processed queries over ``blocks``.
            blocks: The blocks of ``q``'s columns.
            pre: The preconditioner ``q`` was processed with (cosine applies ``H^-1/2`` to
                the rows too).
            cache_norms: Keep the rows' ``|H^-1/2 g|`` of a complete scan for later scans
                with this same ``pre`` (a preconditioner that lives as long as the scorer).
            span: Score store rows ``(begin, end)`` only (chunk starts stay store rows).
        """
        two_sided = pre is not None and self.unit_norm
        key = (tuple(b.name for b in blocks), id(pre))
        cached = self._row_norms.get(key) if two_sided else None
        cache_norms = cache_norms and span is None  # only a whole scan fills the cache
        if cached is not None:
            q = pre.apply(q.to(torch.float64), -0.5, blocks).to(self.dtype)  # type: ignore[union-attr]
        norms: list[Tensor] = []
        names = None if len(blocks) == len(self.store.modules) else [b.name for b in blocks]
        scanner = StoreScanner(
            self.store, chunk_rows=self.chunk_rows, modules=names, dtype=self.dtype, span=span
        )
        for start, chunk, ids in scanner:
            rows = chunk.to(self.device, non_blocking=True)  # (n, D_sel)
            if cached is not None:
                scores = (q @ rows.T) / cached[start : start + len(rows)]  # (Q, n)
            elif two_sided:
                x = pre.apply(rows, -0.5, blocks)  # type: ignore[union-attr]  # (n, D_sel)
                norm = torch.linalg.vector_norm(x, dim=1)  # (n,)
                norm = torch.where(norm > 0, norm, torch.ones_like(norm))
                norms.append(norm)
                scores = (q @ x.T) / norm  # (Q, n)
            else:
                scores = chunk_scores(rows, q, unit_norm=self.unit_norm)
            yield ScoreChunk(start, scores, ids)
        if two_sided and cached is None and cache_norms:
            self._row_norms[key] = torch.cat(norms) if norms else torch.zeros(0)
