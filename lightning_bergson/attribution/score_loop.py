"""Score a store across processes and machines with Lightning: ``Trainer.predict`` over
the score array's column chunks.

The columns of the score array (one per stored row) are cut into whole score chunks; rank
``r`` of ``W`` (global rank, any number of nodes) scores chunks ``r, r + W, ...``, each by
streaming its own rows of the store (local or remote, read ahead, checksums verified), and
writes those whole chunks of the array, so no two ranks write the same chunk object. Rank
0 creates the array first and flags it ``complete`` only after every rank has written its
chunks (a barrier); a rank that fails leaves it incomplete, and readers refuse it. The
running top-k of each rank is gathered and merged, so every rank returns the global top-k.

Every process runs the same call (Lightning's launchers start them: ``devices``,
``num_nodes``, ``strategy="ddp"``); the scores equal a single-process run exactly, since
each chunk is scored the same way whichever rank scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import zarr
from torch import Tensor
from torch.utils.data import DataLoader

from ..scores import ScoreArrayWriter
from ..store.location import Location, StorePath
from .attributor import Attributor, Queries
from .results import SearchResult
from .score_writer import QueryReduce, reduce_queries, score_header

__all__ = ["LightningScores", "score_with_lightning"]


@dataclass
class LightningScores:
    """What :func:`score_with_lightning` gives back on every rank.

    Attributes:
        path: The score array (a local path, or the Location of a URL).
        top: The ``k`` highest scores per (reduced) query over all ranks, or ``None``.
    """

    path: Path | Location
    top: SearchResult | None


class _ScoreChunks(L.LightningModule):
    """Predicts nothing: each step scores one column chunk and writes it."""

    def __init__(self, attributor: Attributor, queries: Tensor, plan: _Plan) -> None:
        super().__init__()
        self.attributor, self.queries, self.plan = attributor, queries, plan
        self.array: Any = None
        self.writer: ScoreArrayWriter | None = None
        self.tops: list[tuple[Tensor, Tensor]] = []

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        spans = self.plan.spans()
        if len(spans) < world:  # every rank computes this, so every rank stops here
            raise ValueError(
                f"the score array has {len(spans)} column chunks for {world} processes; "
                f"give chunk_cols <= {max(1, len(self.attributor.store) // world)} or fewer "
                "devices/nodes"
            )
        return DataLoader(spans[rank::world], batch_size=None)  # this rank's whole chunks

    def on_predict_start(self) -> None:
        if self.trainer.global_rank == 0:
            self.writer = self.plan.create()
            self.array = self.writer.array
        self.trainer.strategy.barrier("score_with_lightning.create")
        if self.trainer.global_rank != 0:
            group = zarr.open_group(self.plan.out.zarr_store(), mode="r+")
            self.array = group["scores"]

    def predict_step(self, span: tuple[int, int], batch_idx: int) -> None:
        begin, end = (int(v) for v in span)
        parts = self.attributor.iter_scores(self.queries, modules=self.plan.modules, span=span)
        scores = [reduce_queries(c.scores, self.plan.query_reduce).float().cpu() for c in parts]
        block = torch.cat(scores, dim=1)  # (Q', end - begin)
        self.array[:, begin:end] = block.numpy()  # whole chunks only: see _Plan.spans
        if self.plan.k:
            k = min(self.plan.k, end - begin)
            vals, pos = block.topk(k, dim=1, sorted=True)  # (Q', k)
            self.tops.append((vals, pos + begin))

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("score_with_lightning.written")
        if self.writer is not None:  # rank 0, once every rank's chunks are written
            self.writer.group.attrs.update({"complete": True})
        self.trainer.strategy.barrier("score_with_lightning.complete")


@dataclass
class _Plan:
    """The score array to write and how its columns are cut into chunks."""

    attributor: Attributor
    out: Location
    header: Any
    num_queries: int
    chunk_cols: int
    query_reduce: QueryReduce
    modules: Sequence[str] | None
    k: int
    overwrite: bool

    def spans(self) -> list[tuple[int, int]]:
        """Column ranges of whole score chunks, in order."""
        n = len(self.attributor.store)
        return [(a, min(a + self.chunk_cols, n)) for a in range(0, n, self.chunk_cols)]

    def create(self) -> ScoreArrayWriter:
        """The new, incomplete array (rank 0)."""
        store = self.attributor.store
        return ScoreArrayWriter(
            self.out, self.header, num_queries=self.num_queries, example_ids=store.example_ids,
            epochs=store.epochs, steps=store.steps, chunk_cols=self.chunk_cols,
            overwrite=self.overwrite,
        )  # fmt: skip


def score_with_lightning(
    attributor: Attributor,
    queries: Queries,
    path: StorePath,
    *,
    k: int | None = None,
    query_reduce: QueryReduce = "none",
    modules: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    chunk_cols: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    trainer: L.Trainer | None = None,
) -> LightningScores:
    """Score ``queries`` against every stored row into a score array, split across ranks.

    Args:
        attributor: Similarity, preconditioner and store (``example_reduce="none"``: a row
            reduction needs every row in one process; use ``write_score_array`` for it).
        queries: ``[Q, D]`` query rows (the same on every rank).
        path: Output score array (a local directory or a URL).
        k: Also return the ``k`` highest scores per query, merged across ranks.
        query_reduce: ``"none"`` keeps ``[Q, N]``; ``"mean"``/``"max"`` store ``[1, N]``.
        modules: Score only these blocks.
        metadata: JSON entries saved with the array.
        chunk_cols: Columns per score chunk, the unit of work of a rank (default: about
            4 MiB of scores, a multiple of the attributor's scan chunk, and small enough
            that every rank gets a chunk).
        overwrite: Replace an existing array at ``path``.
        storage_options: Options of the fsspec filesystem when ``path`` is a URL.
        trainer: Runs the loop (``devices``, ``num_nodes``, ``strategy="ddp"``); default a
            one-process CPU trainer. ``use_distributed_sampler`` must be off: the loop
            hands each rank its own chunks.

    Returns:
        The array's path and the merged top-k (on every rank).
    """
    if attributor.example_reduce != "none":
        raise ValueError(
            f"example_reduce={attributor.example_reduce!r} needs every row of an example in "
            "one process; score rows here (example_reduce='none') or use write_score_array"
        )
    trainer = trainer or _default_trainer()
    if trainer._accelerator_connector.use_distributed_sampler:
        raise ValueError("score_with_lightning needs Trainer(use_distributed_sampler=False)")
    q = attributor.encoder.rows(queries)
    out_q = q.shape[0] if query_reduce == "none" else 1
    n = len(attributor.store)
    world = trainer.world_size
    cols = (
        _default_chunk_cols(attributor.chunk_rows, out_q, n, world)
        if chunk_cols is None
        else chunk_cols
    )
    if cols < 1:
        raise ValueError(f"chunk_cols must be >= 1; got {chunk_cols}")
    meta = {
        "unit_norm": attributor.unit_norm,
        "query_mix": attributor.query_mix,
        "modules": list(modules) if modules else None,
    }  # as write_score_array's
    header = score_header(attributor, query_reduce=query_reduce, metadata=meta | (metadata or {}))
    out = Location.of(path, storage_options)
    if out.exists() and not overwrite:  # asked on every rank before any creates the array
        raise FileExistsError(f"{out} exists; pass overwrite=True or choose another path")
    plan = _Plan(
        attributor, out, header, out_q, max(1, min(cols, n)), query_reduce, modules,
        min(int(k or 0), n), overwrite,
    )  # fmt: skip
    module = _ScoreChunks(attributor, q, plan)
    trainer.predict(module, return_predictions=False)
    return LightningScores(out.path, _merged_top(module, trainer, attributor) if plan.k else None)


def _default_chunk_cols(scan: int, num_queries: int, rows: int, world: int) -> int:
    """About 4 MiB of scores, a multiple of the scan chunk, and at least one per rank."""
    cols = scan * max(1, 2**22 // (4 * num_queries * scan))
    return max(1, min(cols, -(-rows // world)))


def _default_trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip


def _merged_top(module: _ScoreChunks, trainer: L.Trainer, attributor: Attributor) -> SearchResult:
    """This rank's best ``k`` per query, gathered from every rank and merged."""
    k = module.plan.k
    num_q = module.plan.num_queries
    vals = torch.full((num_q, k), float("-inf"))
    rows = torch.full((num_q, k), -1, dtype=torch.int64)
    if module.tops:
        v = torch.cat([t[0] for t in module.tops], dim=1)
        r = torch.cat([t[1] for t in module.tops], dim=1)
        best = min(k, v.shape[1])
        top, pos = v.topk(best, dim=1, sorted=True)
        vals[:, :best], rows[:, :best] = top, r.gather(1, pos)
    if trainer.world_size > 1:
        vals = trainer.strategy.all_gather(vals).permute(1, 0, 2).reshape(num_q, -1)
        rows = trainer.strategy.all_gather(rows).permute(1, 0, 2).reshape(num_q, -1)
    top, pos = vals.topk(k, dim=1, sorted=True)  # (Q', k)
    rows = rows.gather(1, pos)
    ids = torch.from_numpy(attributor.store.example_ids)[rows]
    return SearchResult(top, ids, rows)
