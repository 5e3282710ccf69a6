"""Attributor: ask a gradient store which training examples a query's gradient resembles.

A thin facade over one part per job: :class:`~.query_encoder.QueryEncoder` makes query rows
with the store's own settings, :class:`~.streaming.StreamingScorer` scores them against the
store chunk by chunk (through :class:`~lightning_bergson.store.StoreScanner`),
:class:`~.preconditioners.SecondMomentPreconditioner` loads, fits and caches itself beside
the store, and :class:`~.faiss_index.FaissIndex` does the same for an optional index.

Same call shape as Bergson's ``Attributor``::

    attr = Attributor("runs/bios/grads.zarr", unit_norm=True, preconditioner="fit")
    with attr.trace(model, k=5) as result:
        model(query_ids, labels=query_ids).loss.backward()   # see trace(): a summed loss
    result.indices, result.scores          # [Q, k] example ids and scores

Scores follow the ``"influence"`` convention of :mod:`lightning_bergson.scores`: positive
means a gradient step on the training example lowers the query loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import GradientCollector
from ..losses import TokenLossFn
from ..store import GradientStore, ModuleBlock
from ..store.scan import default_chunk_rows
from .faiss_index import FaissIndex
from .preconditioners import SecondMomentPreconditioner
from .queries import LossFn
from .query_encoder import Queries, QueryEncoder
from .results import RowSink, SearchResult, TraceResult
from .scoring import ExampleReduce, ExampleReducer, TopK
from .streaming import ScoreChunk, StreamingScorer
from .token_scores import (
    document_token_scores,
    score_token_queries,
    token_queries,
    token_rows,
)

__all__ = ["Attributor", "Queries", "ScoreChunk", "SearchResult", "TraceResult"]


class Attributor:
    """Score query gradients against a gradient store, streaming it in chunks.

    Query rows are made with the store's own projection, normalizers and module selection
    (read from its metadata), so both sides match by construction; a model that differs
    from the store's is refused (:class:`~lightning_bergson.attribution.StoreMismatchError`).

    Args:
        store: Path or URL (``s3://bucket/run.zarr``) of a gradient store, or an open
            :class:`GradientStore`.
        device: Where scores are computed.
        dtype: Scoring dtype (``torch.float64`` for exact comparisons).
        unit_norm: Cosine similarity instead of inner products.
        preconditioner: ``None``; ``"fit"`` (load ``<store>/preconditioners/`` or fit it
            from the store's rows and save it there); a path written by
            :meth:`SecondMomentPreconditioner.save`; or a
            :class:`SecondMomentPreconditioner`. Inner products use ``H^-1`` on the query;
            cosine ``H^-1/2`` on both sides.
        damping: ``c`` in the damped inverse ``1 / (lambda + c * mean(lambda))``.
        query_mix: Weight ``w`` of the queries' own second moment,
            ``H = (1 - w) H_train + w H_query`` (0 = training rows only).
        example_reduce: ``"none"`` ranks store rows (an example seen in several epochs has
            several rows, as in Bergson); ``"sum"``, ``"mean"`` or ``"max"`` first reduce
            the scores of each example id's rows to one.
        chunk_rows: Rows read per chunk (default: one store chunk, at least 4 MiB of
            scoring dtype: small enough to stay in the CPU cache while it is scored).
        normalizers: Normalizer file for query rows (default: the store's own,
            ``<store>/normalizers/normalizers.safetensors``).
        faiss: A FAISS factory string (e.g. ``"Flat"``, ``"IVF1024,Flat"``): :meth:`search`
            and :meth:`extremes` use a FAISS index built over the store (once, saved in
            ``<store>/faiss/``) instead of scanning it. Needs ``faiss-cpu``; no module
            subsets or per-example reduction.
        check_model: How a query model is checked against the store's fingerprint:
            ``"strict"`` (class, parameter shapes and config, except entries that cannot
            change a gradient in eval mode such as dropout), ``"shapes"`` (class and
            parameter shapes) or ``"off"``.
        storage_options: Options of the store URL's fsspec filesystem (credentials,
            ``endpoint_url``); default: the usual environment variables.

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> blocks = layout_blocks([("fc", (1, 2), "fc", None)])
        >>> meta = {"projection": {"dim": 0, "seed": 0}}
        >>> with GradientStoreWriter(path, modules=blocks, metadata=meta, dtype="float32") as w:
        ...     w.append(torch.eye(2), example_id=[10, 11], step=0, epoch=0)
        >>> Attributor(path).search(torch.tensor([[0.0, 3.0]]), k=1).indices.tolist()
        [[11]]
    """

    def __init__(
        self,
        store: str | Path | GradientStore,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        unit_norm: bool = False,
        preconditioner: Literal["fit"] | str | Path | SecondMomentPreconditioner | None = None,
        damping: float = 0.1,
        query_mix: float = 0.0,
        example_reduce: ExampleReduce = "none",
        chunk_rows: int | None = None,
        normalizers: str | Path | None = None,
        faiss: str | None = None,
        check_model: Literal["strict", "shapes", "off"] = "strict",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if example_reduce not in ("none", "sum", "mean", "max"):
            raise ValueError(
                f"example_reduce={example_reduce!r} is not one of 'none', 'sum', 'mean', 'max'"
            )
        if not 0.0 <= query_mix <= 1.0:
            raise ValueError(f"query_mix must be in [0, 1], got {query_mix}")
        if isinstance(store, GradientStore):
            self.store = store
        else:
            self.store = GradientStore.open(store, storage_options=storage_options)
        self.encoder = QueryEncoder(self.store, check_model=check_model, normalizers=normalizers)
        self.check_model, self.settings = check_model, self.encoder.settings
        self.scorer = StreamingScorer(
            self.store,
            device=device,
            dtype=dtype,
            unit_norm=unit_norm,
            chunk_rows=chunk_rows or default_chunk_rows(self.store),
        )
        self.query_mix, self.example_reduce = query_mix, example_reduce
        self.preconditioner = SecondMomentPreconditioner.for_store(
            self.store,
            preconditioner,
            damping=damping,
            chunk_rows=self.chunk_rows * 16,  # larger reads: the fit is a Gram matrix per block
            dtype=dtype,
        )
        if faiss and (example_reduce != "none" or (unit_norm and preconditioner and query_mix)):
            raise ValueError(
                "faiss=... cannot reduce rows per example (use example_reduce='none') nor mix "
                "query moments into a two-sided (cosine) preconditioner (use query_mix=0)"
            )
        self.faiss = faiss
        self._faiss_index: FaissIndex | None = None

    # The scorer's settings have one copy (read-only here): what callers read is what scans use.

    @property
    def device(self) -> torch.device:
        """Where scores are computed."""
        return self.scorer.device

    @property
    def dtype(self) -> torch.dtype:
        """Scoring dtype."""
        return self.scorer.dtype

    @property
    def unit_norm(self) -> bool:
        """Cosine similarity instead of inner products."""
        return self.scorer.unit_norm

    @property
    def chunk_rows(self) -> int:
        """Rows read per chunk."""
        return self.scorer.chunk_rows

    # ------------------------------------------------------------------ query rows

    def prepare(self, model: nn.Module) -> nn.Module:
        """The network whose modules the store names (checked against the store)."""
        return self.encoder.prepare(model)

    def collector(
        self, model: nn.Module, closure: Callable[[str, Tensor], None] | None = None
    ) -> GradientCollector:
        """A :class:`GradientCollector` configured exactly like the store's capture."""
        return self.encoder.collector(model, closure=closure)

    def query_gradients(
        self, model: nn.Module, batch: Any, *, loss_fn: LossFn | None = None
    ) -> Tensor:
        """Rows ``[B, D]`` of each query's own loss, as the store would hold them.

        The network runs in eval mode (no dropout); parameters' ``.grad`` are left untouched.

        Args:
            model: The network the store's module names refer to (or its LightningModule).
            batch: Query batch of any type ``loss_fn`` understands.
            loss_fn: ``loss_fn(network, batch) -> [B]``, each query's own loss: the query
                side of the per-example loss contract (for a classifier,
                ``lambda m, b: F.cross_entropy(m(**inputs).logits, b["labels"],
                reduction="none")``). Default: the causal-LM loss over each query's
                supervised tokens (``labels`` != -100), summed or averaged like the store's
                ``loss_reduction``; it refuses batches that are not causal-LM batches.
        """
        return self.encoder.query_gradients(model, batch, loss_fn=loss_fn).to(self.device)

    @contextmanager
    def trace(
        self,
        model: nn.Module,
        k: int | None,
        *,
        modules: Sequence[str] | None = None,
        reverse: bool = False,
    ) -> Iterator[TraceResult]:
        """Capture query rows during the block's backward pass, then :meth:`search`.

        Each backward pass adds one query row per example of its batch. The rows equal the
        store's only if the loss backpropagated is the **sum of the per-example losses** of
        the contract (``loss_fn(model, batch).sum()``: summed token losses each for a causal
        LM, token means with ``loss_reduction="mean"``), not a batch mean such as Hugging
        Face's ``.loss`` of a batch. :meth:`query_gradients` computes the right loss itself.
        """
        result = TraceResult()
        sink = RowSink()
        collector = self.collector(model, closure=sink.add)
        with collector:
            yield result
        if sink.empty:
            raise ValueError("no query gradients were captured: call backward inside trace()")
        result.queries = sink.rows(self.store.modules).to(self.device)
        result._result = self.search(result.queries, k, modules=modules, reverse=reverse)

    # ------------------------------------------------------------------ scoring

    def search(
        self,
        queries: Queries,
        k: int | None = 10,
        *,
        reverse: bool = False,
        modules: Sequence[str] | None = None,
    ) -> SearchResult:
        """Top ``k`` (or, with ``reverse``, bottom ``k``) training examples per query.

        Args:
            queries: ``[Q, D]`` rows over all store blocks, or block name -> ``[Q, d]``.
            k: Results per query (``None`` = all).
            reverse: Return the lowest scores instead of the highest.
            modules: Score only these blocks (names, parents or globs; norms for cosine are
                taken over the selected blocks).
        """
        top, bottom = self._search(queries, k, modules, largest=not reverse, smallest=reverse)
        return top or bottom  # type: ignore[return-value]

    def extremes(
        self, queries: Queries, k: int = 10, *, modules: Sequence[str] | None = None
    ) -> tuple[SearchResult, SearchResult]:
        """Top ``k`` and bottom ``k`` in one pass over the store."""
        top, bottom = self._search(queries, k, modules, largest=True, smallest=True)
        assert top is not None and bottom is not None
        return top, bottom

    def scores(
        self, queries: Queries, *, modules: Sequence[str] | None = None
    ) -> tuple[Tensor, np.ndarray]:
        """All scores ``[Q, N]`` (``[Q, U]`` when reduced per example) and their example ids."""
        if self.example_reduce != "none":
            scores, ids = self._reduced(queries, modules)
            return scores.cpu(), ids.numpy()
        parts = [chunk.scores.cpu() for chunk in self.iter_scores(queries, modules=modules)]
        num_q = self.encoder.rows(queries).shape[0]
        full = torch.cat(parts, dim=1) if parts else torch.zeros(num_q, 0, dtype=self.dtype)
        return full, self.store.example_ids.copy()

    def iter_scores(
        self,
        queries: Queries,
        *,
        modules: Sequence[str] | None = None,
        span: tuple[int, int] | None = None,
    ) -> Iterator[ScoreChunk]:
        """Scores ``[Q, n]`` of every store row (or of rows ``span = (begin, end)``, one
        process's share), one chunk at a time, in store order.

        Each :class:`~.streaming.ScoreChunk` holds ``start`` (its first store row), ``scores``
        and the rows' ``example_ids``; rows are never reduced per example here (whatever
        ``example_reduce``), so a consumer such as a score-array writer can stream a store
        larger than memory.

        Example:
            >>> import tempfile
            >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
            >>> path = f"{tempfile.mkdtemp()}/g.zarr"
            >>> blocks = layout_blocks([("fc", (1, 2), "fc", None)])
            >>> meta = {"projection": {"dim": 0, "seed": 0}}
            >>> with GradientStoreWriter(path, modules=blocks, metadata=meta, dtype="float32") as w:
            ...     w.append(torch.eye(2), example_id=[10, 11], step=0, epoch=0)
            >>> attr = Attributor(path, chunk_rows=1)
            >>> [(c.start, c.scores.tolist()) for c in attr.iter_scores(torch.tensor([[2.0, 3.0]]))]
            [(0, [[2.0]]), (1, [[3.0]])]
        """
        q, blocks, pre = self._prepare(queries, modules)
        cache = pre is not None and pre is self.preconditioner
        yield from self.scorer.iter_scores(q, blocks, pre, cache_norms=cache, span=span)

    # ------------------------------------------------------------------ per token

    def token_scores(
        self,
        queries: Queries | Any,
        model: nn.Module,
        batch: Any,
        *,
        loss_fn: LossFn | None = None,
        token_loss_fn: TokenLossFn | None = None,
        modules: Sequence[str] | None = None,
    ) -> Tensor:
        """Scores ``[Q, B, S]`` of every token of ``batch``'s documents against each query.

        Entry ``[q, i, t]`` is the part of document ``i``'s score against query ``q`` that its
        position ``t``'s token loss carries (the loss of predicting token ``t``; 0 where no
        loss is taken), with the store's projection, normalizer, heads and this Attributor's
        preconditioner, exactly: the scores of a document's tokens add up to its score, the
        inner product (or, with ``unit_norm``, the cosine: each token's contribution divided
        by the document's normalization) of the document's row made now from ``model``. That
        equals its stored row's score where the parameters are those it was captured with.
        Sums are checked (:class:`~.token_scores.TokenScoreMismatchError`). Cost: one
        forward-mode pass over ``batch`` per query (:mod:`.token_scores`), one backward.

        Args:
            queries: Query rows ``[Q, D]`` (:meth:`query_gradients`), or a query batch made
                into rows here with ``loss_fn``.
            model: The network the store's module names refer to (or its LightningModule).
            batch: The documents, a batch that ``token_loss_fn`` understands.
            loss_fn: The queries' loss when ``queries`` is a batch (see :meth:`query_gradients`).
            token_loss_fn: ``(network, batch) -> [B, S]``, each document's loss split over its
                positions, summing to the loss its row is the gradient of. Default: the causal-
                LM token losses, divided by the supervised tokens with ``loss_reduction="mean"``.
            modules: Score only these blocks (as :meth:`scores`).

        Example:
            >>> scores = attr.token_scores(attr.query_gradients(net, queries), net, docs)
            ... # doctest: +SKIP
            >>> scores.sum(-1)  # [Q, B]: the documents' scores  # doctest: +SKIP
        """
        rows = self._query_rows(queries, model, loss_fn)
        q, blocks, pre = self._prepare(rows, modules)
        scores = document_token_scores(
            self.encoder, model, batch, q, blocks, pre, unit_norm=self.unit_norm,
            token_loss_fn=token_loss_fn,
        )  # fmt: skip
        return scores.to(self.dtype)

    def query_token_scores(
        self,
        model: nn.Module,
        batch: Any,
        *,
        example_ids: Sequence[int] | None = None,
        token_loss_fn: TokenLossFn | None = None,
        modules: Sequence[str] | None = None,
    ) -> tuple[Tensor, np.ndarray]:
        """Which tokens of each query a training example supports: scores ``[Q, S, n]``.

        Entry ``[q, t, j]`` is the part of query ``q``'s score against column ``j`` that its
        position ``t``'s token loss carries (0 where the query takes no loss, e.g. its prompt):
        the scores of a query's tokens add up to its score (:meth:`scores`), under inner
        products or cosine (the query's normalization applied to each of its tokens). Cost:
        one backward per supervised query position (:func:`~.token_scores.token_rows`),
        then one scan of the store.

        Args:
            model: The network the store's module names refer to (or its LightningModule).
            batch: The query batch (as for :meth:`query_gradients`).
            example_ids: Score only these training examples' rows (default: all).
            token_loss_fn: Each query's loss split over its positions, ``[B, S]`` (as in
                :meth:`token_scores`).
            modules: Score only these blocks (as :meth:`scores`).

        Returns:
            ``(scores [Q, S, n], example ids [n])``: columns are stored rows, or examples
            (ascending ids) when this Attributor reduces rows per example (``"sum"`` or
            ``"mean"``; ``"max"`` is refused: a maximum does not split over tokens).
        """
        rows = token_rows(self.encoder, model, batch, token_loss_fn)  # (Q, S, D)
        full = rows.sum(1)  # (Q, D): each query's row
        _, blocks, pre = self._prepare(full, modules)
        x = token_queries(rows, full, blocks, pre, unit_norm=self.unit_norm)  # (Q * S, D_sel)
        cache = pre is not None and pre is self.preconditioner
        scores, ids = score_token_queries(
            self.scorer, x, blocks, pre, example_ids=example_ids, reduce=self.example_reduce,
            cache_norms=cache,
        )  # fmt: skip
        return scores.reshape(*rows.shape[:2], -1), ids

    def _query_rows(self, queries: Queries | Any, model: nn.Module, loss_fn: LossFn | None):
        """Rows ``[Q, D]``: ``queries`` themselves, or the rows of a query batch."""
        names = {b.name for b in self.store.modules}
        is_rows = isinstance(queries, Tensor) or (
            isinstance(queries, Mapping) and bool(queries) and set(queries) <= names
        )
        return queries if is_rows else self.query_gradients(model, queries, loss_fn=loss_fn)

    # ------------------------------------------------------------------ internals

    def _search(self, queries, k, modules, *, largest: bool, smallest: bool):
        n = len(self.store)
        k = n if k is None else min(int(k), n)
        if k < 1 and n:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.faiss:
            return self._faiss_search(queries, k, modules, largest=largest, smallest=smallest)
        wanted = [which for which, want in ((True, largest), (False, smallest)) if want]
        if self.example_reduce != "none":
            scores, uniq = self._reduced(queries, modules)
            results = {}
            for which in wanted:
                top = TopK.empty(len(scores), k, largest=which, dtype=self.dtype).merge(scores, 0)
                example = uniq.to(top.rows.device)[top.rows]
                results[which] = SearchResult(top.scores, example, torch.full_like(top.rows, -1))
            return results.get(True), results.get(False)
        num_q = self.encoder.rows(queries).shape[0]
        tops = {w: TopK.empty(num_q, k, largest=w, dtype=self.dtype) for w in wanted}
        for chunk in self.iter_scores(queries, modules=modules):
            tops = {w: top.merge(chunk.scores, chunk.start) for w, top in tops.items()}
        ids = torch.from_numpy(self.store.example_ids)
        results = {w: SearchResult(t.scores, ids[t.rows.cpu()], t.rows) for w, t in tops.items()}
        return results.get(True), results.get(False)

    def _reduced(self, queries: Queries, modules) -> tuple[Tensor, Tensor]:
        """``(scores [Q, U], example ids [U])``: each example's rows reduced to one score."""
        num_q = self.encoder.rows(queries).shape[0]
        reducer = ExampleReducer(self.store.example_ids, num_q, self.example_reduce, self.dtype)
        for chunk in self.iter_scores(queries, modules=modules):
            reducer.add(chunk.scores, chunk.start)
        return reducer.result()

    def _faiss_search(self, queries, k, modules, *, largest: bool, smallest: bool):
        if modules is not None:
            raise ValueError("a FAISS index scores all blocks; pass modules=None or faiss=None")
        q, _, _ = self._prepare(queries, None)
        if self._faiss_index is None:
            self._faiss_index = FaissIndex.for_store(
                self.store,
                factory=str(self.faiss),
                unit_norm=self.unit_norm,
                preconditioner=self.preconditioner,
                chunk_rows=self.chunk_rows,
            )
        ids = torch.from_numpy(self.store.example_ids)
        out = []
        for which, want in ((True, largest), (False, smallest)):
            if not want:
                out.append(None)
                continue
            scores, rows = self._faiss_index.search(q, k, reverse=not which)
            out.append(SearchResult(scores.to(self.dtype), ids[rows.clamp(min=0)], rows))
        return out[0], out[1]

    def _prepare(
        self, queries: Queries, modules: Sequence[str] | None
    ) -> tuple[Tensor, list[ModuleBlock], SecondMomentPreconditioner | None]:
        """Processed queries, their blocks and the (query-mixed) preconditioner."""
        blocks = self.scorer.blocks(modules)
        full = self.encoder.rows(queries)  # (Q, D)
        pre = self.preconditioner
        if pre is not None and self.query_mix != 0.0:
            pre = pre.mixed(full.to(torch.float64).cpu(), self.query_mix)
        return self.scorer.process(full, blocks, pre), blocks, pre

    # Old private entry points, kept while callers move to the public ones.
