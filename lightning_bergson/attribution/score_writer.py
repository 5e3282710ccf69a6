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

from torch import Tensor

from ..scores import ScoreArrayWriter, ScoreHeader, ScoreSettings
from ..store.location import Location, StorePath
from .attributor import Attributor, Queries

__all__ = ["QueryReduce", "reduce_queries", "score_header", "write_score_array"]

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


def score_header(
    attributor: Attributor,
    *,
    query_reduce: QueryReduce = "none",
    metadata: dict[str, Any] | None = None,
) -> ScoreHeader:
    """The header of the attributor's scores: method, sign, store, preconditioner, reduction.

    ``score`` writes it with the array; ``attribute`` shows it atop its report.
    """
    method = "gradient_cosine" if attributor.unit_norm else "gradient_inner_product"
    settings = _settings(attributor, query_reduce)
    return ScoreHeader(method, "influence", settings, dict(metadata or {}))


def _settings(attributor: Attributor, query_reduce: QueryReduce) -> ScoreSettings:
    pre = attributor.preconditioner
    described = "none"
    if pre is not None:
        described = f"TrackStar second moments (damping {pre.damping:g}"
        described += f", query_mix {attributor.query_mix:g})" if attributor.query_mix else ")"
    rows = attributor.example_reduce == "none"
    return ScoreSettings(
        store=str(attributor.store.location),
        preconditioner=described,
        columns="rows" if rows else "examples",
        example_reduce=None if rows else attributor.example_reduce,
        query_reduce=query_reduce,
    )


def write_score_array(
    attributor: Attributor,
    queries: Queries,
    path: StorePath,
    *,
    query_reduce: QueryReduce = "none",
    modules: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Path | Location:
    """Score ``queries`` against every row (or example) of the attributor's store.

    Args:
        attributor: Decides the similarity (inner product or cosine), the preconditioner
            and whether rows are reduced per example id (``example_reduce``).
        queries: ``[Q, D]`` query rows.
        path: Output directory (``*.zarr``).
        query_reduce: ``"none"`` keeps ``[Q, N]``; ``"mean"``/``"max"`` store ``[1, N]``.
        modules: Score only these blocks.
        metadata: JSON entries saved with the array (e.g. query texts, ``relevant`` ids).
        overwrite: Replace an existing array at ``path``.
        storage_options: Options of the fsspec filesystem when ``path`` is a URL.

    Returns:
        ``path``; read it with ``ScoreArray.open`` (``convention="influence"``; its
        ``settings`` name the store, the preconditioner and whether columns are stored
        rows, with their ``epochs`` and ``steps``, or examples).
    """
    path = Location.of(path, storage_options)
    num_q = attributor.encoder.rows(queries).shape[0]
    out_q = num_q if query_reduce == "none" else 1
    meta = {
        "unit_norm": attributor.unit_norm,
        "query_mix": attributor.query_mix,
        "modules": list(modules) if modules else None,
        **(metadata or {}),
    }  # the store, preconditioner and reductions are the header's settings
    header = score_header(attributor, query_reduce=query_reduce, metadata=meta)
    if attributor.example_reduce != "none":
        scores, ids = attributor.scores(queries, modules=modules)
        with ScoreArrayWriter(
            path, header, num_queries=out_q, example_ids=ids, overwrite=overwrite
        ) as writer:
            writer.add(reduce_queries(scores, query_reduce))
        return path.path
    store = attributor.store
    scan = attributor.chunk_rows
    cols = scan * max(1, 2**22 // (4 * out_q * scan))  # about 4 MiB per score chunk
    with ScoreArrayWriter(
        path, header, num_queries=out_q, example_ids=store.example_ids, epochs=store.epochs,
        steps=store.steps, chunk_cols=cols, overwrite=overwrite,
    ) as writer:  # fmt: skip
        for chunk in attributor.iter_scores(queries, modules=modules):
            writer.add(reduce_queries(chunk.scores, query_reduce).float().cpu())  # (Q', n)
    return path.path
