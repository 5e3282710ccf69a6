"""Attributor: ask a gradient store which training examples a query's gradient resembles.

Same call shape as Bergson's ``Attributor``::

    attr = Attributor("runs/bios/grads.zarr", unit_norm=True, preconditioner="fit")
    with attr.trace(model, k=5) as result:
        model(query_ids, labels=query_ids).loss.backward()   # see trace(): a summed loss
    result.indices, result.scores          # [Q, k] example ids and scores

Scores follow the ``"influence"`` convention of :mod:`lightning_bergson.scores`: positive
means a gradient step on the training example lowers the query loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..capture import GradientCollector
from ..store import GradientStore, ModuleBlock
from .compat import (
    CHECK_MODEL_MODES,
    StoreMismatchError,
    capture_settings,
    check_blocks,
    check_model,
    resolve_network,
    store_normalizers,
)
from .faiss_index import FaissIndex
from .preconditioners import FILE_NAME, Preconditioner
from .queries import LossFn, causal_lm_query_losses, to_device
from .reading import iter_rows
from .results import RowSink, SearchResult, TraceResult
from .scoring import ExampleReduce, ExampleReducer, TopK, chunk_scores, prefetch, unit_rows

__all__ = ["Attributor", "SearchResult", "TraceResult"]

Queries = Tensor | Mapping[str, Tensor]


class Attributor:
    """Score query gradients against a gradient store, streaming it in chunks.

    Query rows are made with the store's own projection, normalizers and module selection
    (read from its metadata), so both sides match by construction; a model that differs
    from the store's is refused (:class:`~lightning_bergson.attribution.StoreMismatchError`).

    Args:
        store: Path of a gradient store (or an open :class:`GradientStore`).
        device: Where scores are computed.
        dtype: Scoring dtype (``torch.float64`` for exact comparisons).
        unit_norm: Cosine similarity instead of inner products.
        preconditioner: ``None``; ``"fit"`` (load ``<store>/preconditioners/`` or fit it
            from the store's rows and save it there); a path written by
            :meth:`Preconditioner.save`; or a :class:`Preconditioner`. Inner products use
            ``H^-1`` on the query; cosine ``H^-1/2`` on both sides.
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
        preconditioner: Literal["fit"] | str | Path | Preconditioner | None = None,
        damping: float = 0.1,
        query_mix: float = 0.0,
        example_reduce: ExampleReduce = "none",
        chunk_rows: int | None = None,
        normalizers: str | Path | None = None,
        faiss: str | None = None,
        check_model: Literal["strict", "shapes", "off"] = "strict",
    ) -> None:
        if example_reduce not in ("none", "sum", "mean", "max"):
            raise ValueError(
                f"example_reduce={example_reduce!r} is not one of 'none', 'sum', 'mean', 'max'"
            )
        if not 0.0 <= query_mix <= 1.0:
            raise ValueError(f"query_mix must be in [0, 1], got {query_mix}")
        if check_model not in CHECK_MODEL_MODES:
            raise ValueError(f"check_model={check_model!r} is not one of {CHECK_MODEL_MODES}")
        self.check_model = check_model
        self.store = store if isinstance(store, GradientStore) else GradientStore.open(store)
        self.settings = capture_settings(self.store.attrs)
        self.device, self.dtype = torch.device(device), dtype
        self.unit_norm, self.query_mix, self.example_reduce = unit_norm, query_mix, example_reduce
        default_rows = max(int(self.store.attrs["chunk_rows"]), 2**22 // (4 * self.store.dim))
        self.chunk_rows = chunk_rows or default_rows
        self._normalizer_path = normalizers
        self.preconditioner = self._load_preconditioner(preconditioner, damping)
        if faiss and (example_reduce != "none" or (unit_norm and preconditioner and query_mix)):
            raise ValueError(
                "faiss=... cannot reduce rows per example (use example_reduce='none') nor mix "
                "query moments into a two-sided (cosine) preconditioner (use query_mix=0)"
            )
        self.faiss = faiss
        self._faiss_index: FaissIndex | None = None
        self._row_norms: dict[tuple, Tensor] = {}  # |H^-1/2 g| per row, see _scan

    # ------------------------------------------------------------------ query rows

    def prepare(self, model: nn.Module) -> nn.Module:
        """The network whose modules the store names (checked against the store)."""
        network = resolve_network(model, self.settings.root)
        check_model(self.store.attrs, network, store=self.store.path, mode=self.check_model)
        return network

    def collector(self, model: nn.Module, closure=None) -> GradientCollector:
        """A :class:`GradientCollector` configured exactly like the store's capture."""
        network = self.prepare(model)
        collector = GradientCollector(
            network,
            **self.settings.collector_kwargs(sorted({b.parent for b in self.store.modules})),
            closure=closure,
        )
        check_blocks(self.store.modules, collector.blocks)
        norms = store_normalizers(self.store.path, self.settings, self._normalizer_path)
        collector.set_normalizers(norms)
        return collector

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
        sink = RowSink()
        collector = self.collector(model, closure=sink.add)
        network = collector.model
        device = next(network.parameters()).device
        fn = loss_fn or causal_lm_query_losses(self.settings.loss_reduction)
        was_training = network.training
        weights = [m.weight for m in collector.modules.values()]
        frozen = [w for w in weights if not w.requires_grad]
        network.eval()
        try:
            for w in frozen:  # gradients must flow through every tracked module
                w.requires_grad_(True)
            with collector, torch.enable_grad():
                losses = fn(network, to_device(batch, device))  # (B,)
                torch.autograd.grad(losses.sum(), weights, allow_unused=True)
        finally:
            network.train(was_training)
            for w in frozen:
                w.requires_grad_(False)
        return sink.rows(self.store.modules).to(self.device)

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
        parts: list[Tensor] = []
        reducer = self._scan(queries, modules, lambda s, start: parts.append(s.cpu()))
        if reducer is not None:
            scores, ids = reducer.result()
            return scores.cpu(), ids.numpy()
        num_q = self._as_rows(queries).shape[0]
        full = torch.cat(parts, dim=1) if parts else torch.zeros(num_q, 0, dtype=self.dtype)
        return full, self.store.example_ids.copy()

    def process_queries(
        self, queries: Queries, modules: Sequence[str] | None = None
    ) -> tuple[Tensor, list[ModuleBlock]]:
        """Queries ``[Q, D_sel]`` ready to be dotted with stored rows, and their blocks."""
        q, blocks, _ = self._prepare(queries, modules)
        return q, blocks

    # ------------------------------------------------------------------ internals

    def _search(self, queries, k, modules, *, largest: bool, smallest: bool):
        n = len(self.store)
        k = n if k is None else min(int(k), n)
        if k < 1 and n:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.faiss:
            return self._faiss_search(queries, k, modules, largest=largest, smallest=smallest)
        num_q = self._as_rows(queries).shape[0]
        tops = {
            which: TopK.empty(num_q, k, largest=which, dtype=self.dtype)
            for which, want in ((True, largest), (False, smallest))
            if want
        }

        def consume(scores: Tensor, start: int) -> None:
            for which in tops:
                tops[which] = tops[which].merge(scores, start)

        reducer = self._scan(queries, modules, consume)
        ids = torch.from_numpy(self.store.example_ids)
        results: dict[bool, SearchResult] = {}
        for which, top in tops.items():
            if reducer is not None:
                scores, uniq = reducer.result()
                top = TopK.empty(num_q, k, largest=which, dtype=self.dtype).merge(scores, 0)
                example = uniq.to(top.rows.device)[top.rows]
                results[which] = SearchResult(top.scores, example, torch.full_like(top.rows, -1))
            else:
                results[which] = SearchResult(top.scores, ids[top.rows.cpu()], top.rows)
        return results.get(True), results.get(False)

    def _faiss_search(self, queries, k, modules, *, largest: bool, smallest: bool):
        if modules is not None:
            raise ValueError("a FAISS index scores all blocks; pass modules=None or faiss=None")
        q, _, _ = self._prepare(queries, None)
        index = self._faiss_index_for()
        ids = torch.from_numpy(self.store.example_ids)
        out = []
        for which, want in ((True, largest), (False, smallest)):
            if not want:
                out.append(None)
                continue
            scores, rows = index.search(q, k, reverse=not which)
            out.append(SearchResult(scores.to(self.dtype), ids[rows.clamp(min=0)], rows))
        return out[0], out[1]

    def _faiss_index_for(self) -> FaissIndex:
        if self._faiss_index is None:
            pre = self.preconditioner
            info = {
                "factory": self.faiss,
                "unit_norm": self.unit_norm,
                "preconditioned": pre is not None and self.unit_norm,
                "damping": pre.damping if pre is not None and self.unit_norm else None,
                "store_rows": len(self.store),
                "dim": self.store.dim,
            }
            path = FaissIndex.path_for(self.store, info)
            index = FaissIndex.load(path) if path.is_file() else None
            if index is None or not index.matches(info):
                index = FaissIndex.build(
                    self.store,
                    factory=str(self.faiss),
                    unit_norm=self.unit_norm,
                    preconditioner=pre if self.unit_norm else None,
                    chunk_rows=self.chunk_rows,
                )
                index.save(path)
            self._faiss_index = index
        return self._faiss_index

    def _prepare(
        self, queries: Queries, modules: Sequence[str] | None
    ) -> tuple[Tensor, list[ModuleBlock], Preconditioner | None]:
        """Processed queries, their blocks and the (query-mixed) preconditioner."""
        blocks = self._blocks(modules)
        full = self._as_rows(queries)  # (Q, D)
        cols = np.concatenate([np.arange(b.offset, b.offset + b.size) for b in blocks])
        q = full[:, torch.from_numpy(cols)].to(torch.float64)  # (Q, D_sel)
        bad = (~torch.isfinite(q).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"query rows {bad[:10]} have non-finite gradients (NaN or inf), so every score "
                "against them would be NaN or -inf. Check the query loss (a NaN or overflowing "
                "loss, labels that select no token) and the model's weights."
            )
        pre = self._preconditioner_for(full)
        if pre is not None:
            q = pre.apply(q, -0.5 if self.unit_norm else -1.0, blocks)
        if self.unit_norm:
            q = unit_rows(q)
        return q.to(self.device, self.dtype), blocks, pre

    def _scan(self, queries: Queries, modules, consume) -> ExampleReducer | None:
        """Stream the store once; ``consume(scores [Q, n], start)`` per chunk, or reduce.

        Two-sided (cosine) preconditioning needs ``|H^-1/2 g|`` of every row: the first scan
        computes it; later scans with the same preconditioner and blocks reuse it and fold
        ``H^-1/2`` into the query instead (``(H^-1/2 q) . g / |H^-1/2 g|``).
        """
        q, blocks, pre = self._prepare(queries, modules)
        reducer = None
        if self.example_reduce != "none":
            reducer = ExampleReducer(self.store.example_ids, len(q), self.example_reduce)
        two_sided = pre is not None and self.unit_norm
        key = (tuple(b.name for b in blocks), id(pre))
        cached = self._row_norms.get(key) if two_sided else None
        if cached is not None:
            q = pre.apply(q.to(torch.float64), -0.5, blocks).to(self.dtype)  # type: ignore[union-attr]
        norms: list[Tensor] = []
        names = None if modules is None else [b.name for b in blocks]
        chunks = iter_rows(self.store, self.chunk_rows, modules=names, dtype=self.dtype, ring=4)
        for start, chunk in prefetch(chunks, depth=2):  # ring = depth + 2 reused buffers
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
            if reducer is not None:
                reducer.add(scores, start)
            else:
                consume(scores, start)
        if two_sided and cached is None and pre is self.preconditioner:
            self._row_norms[key] = torch.cat(norms) if norms else torch.zeros(0)
        return reducer

    def _blocks(self, modules: Sequence[str] | None) -> list[ModuleBlock]:
        if modules is None:
            return list(self.store.modules)
        cols = set(self.store.columns(modules).tolist())
        return [b for b in self.store.modules if b.offset in cols]

    def _as_rows(self, queries: Queries) -> Tensor:
        if isinstance(queries, Mapping):
            parts = []
            for b in self.store.modules:
                if b.name not in queries:
                    raise KeyError(f"queries lack block {b.name!r}; pass every store block")
                parts.append(queries[b.name].reshape(queries[b.name].shape[0], -1))
            queries = torch.cat(parts, dim=1)  # (Q, D)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.shape[-1] != self.store.dim:
            raise StoreMismatchError(
                f"queries have {queries.shape[-1]} columns but the store's rows have "
                f"{self.store.dim}; make query rows with this Attributor (trace or "
                "query_gradients) so they use the store's projection and modules"
            )
        return queries.detach()

    def _preconditioner_for(self, full: Tensor) -> Preconditioner | None:
        if self.preconditioner is None or self.query_mix == 0.0:
            return self.preconditioner
        return self.preconditioner.mixed(full.to(torch.float64).cpu(), self.query_mix)

    def _load_preconditioner(self, spec, damping: float) -> Preconditioner | None:
        if spec is None or isinstance(spec, Preconditioner):
            return spec
        info = _store_signature(self.store)
        if spec != "fit":
            pre = Preconditioner.load(spec, damping=damping)
            if not pre.matches(self.store.modules, info):
                raise StoreMismatchError(
                    f"the preconditioner {spec} was fitted on other rows (blocks or row count "
                    f"{pre.info.get('store_rows')} != {len(self.store)}); refit it with "
                    "preconditioner='fit'"
                )
            return pre
        path = self.store.path / "preconditioners" / FILE_NAME
        if path.is_file():
            pre = Preconditioner.load(path, damping=damping)
            if pre.matches(self.store.modules, info):
                return pre
        rows = self.chunk_rows * 16  # larger blocks: the fit is a Gram matrix per block
        chunks = (c for _, c in self.store.iter_chunks(rows, dtype=self.dtype))
        pre = Preconditioner.fit(chunks, self.store.modules, damping=damping, info=info)
        pre.save(self.store.subdir("preconditioners") / FILE_NAME)
        return pre


def _store_signature(store: GradientStore) -> dict[str, Any]:
    """Row count and a hash of the first and last rows: a saved preconditioner is reused
    only for the rows it was fitted on (a store rewritten in place changes them)."""
    ends = [0, len(store) - 1] if len(store) else []
    digest = hashlib.sha256(store.read(ends).numpy().tobytes()).hexdigest()[:16]
    return {"store_rows": len(store), "rows_sha256": digest}
