"""Linear datamodeling score (LDS): do summed scores predict retrained query losses?

For ``M`` random subsets ``S_m`` of the training set (``keep_fraction`` of it kept, seeded),
the model is retrained on ``S_m`` (data weights 0/1) and every query's loss is measured. An
attribution method of any kind predicts, to first order, a loss that decreases with the
summed helpfulness of the kept examples::

    predicted_loss(S_m, q) = - sum_{i in S_m} helpful(q, i)

(``helpful = -score`` for metagradients, ``score`` for influence; see
:func:`lightning_bergson.scores.helpfulness`). LDS of query ``q`` is the Spearman correlation
over the ``M`` subsets between measured and predicted losses; the table reports its mean and
standard deviation over queries. The retraining itself is a callable (:data:`Retrain`), so
every score array is compared on the same retrains, cached by :func:`retrain_losses` so
methods added later reuse them. The ``lds`` command (:mod:`lightning_bergson.cli.lds`)
retrains a ``MagicModule`` ``fit`` config::

    python -m lightning_bergson lds --scores runs/magic/scores.zarr \\
        --fit_config configs/magic.yaml --num_subsets 32 --keep_fraction 0.5

References:
    - Park et al., "TRAK: Attributing Model Behavior at Scale", arXiv:2303.14186 (LDS).
    - Ilyas & Engstrom, "MAGIC", arXiv:2504.16430.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import Tensor

from .format import helpfulness

__all__ = [
    "Retrain",
    "format_table",
    "linear_datamodeling_score",
    "predicted_losses",
    "rank",
    "retrain_losses",
    "sample_subsets",
    "spearman",
]

Retrain = Callable[[Tensor], tuple[np.ndarray, str]]
"""Retrain with 0/1 weights ``[N]``; returns (query losses ``[Q]``, data-order hash)."""


def sample_subsets(num_examples: int, num_subsets: int, keep_fraction: float, seed: int) -> Tensor:
    """``[M, N]`` boolean masks, each keeping ``round(keep_fraction * N)`` examples.

    Example:
        >>> sample_subsets(10, 3, 0.5, seed=0).sum(1).tolist()
        [5, 5, 5]
    """
    if not 0 < keep_fraction < 1:
        raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1), e.g. 0.5")
    keep = round(keep_fraction * num_examples)
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_examples, dtype=torch.bool)  # (M, N)
    for m in range(num_subsets):
        masks[m, torch.randperm(num_examples, generator=gen)[:keep]] = True
    return masks


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks ``0..n-1`` along the last axis, ties getting their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(x.shape[-1], dtype=np.float64), axis=-1)
    flat_x, flat_r = x.reshape(-1, x.shape[-1]), ranks.reshape(-1, x.shape[-1])
    for row_x, row_r in zip(flat_x, flat_r, strict=True):
        values, inverse, counts = np.unique(row_x, return_inverse=True, return_counts=True)
        if len(values) < len(row_x):  # average the ranks of ties
            sums = np.bincount(inverse, weights=row_r)
            row_r[:] = (sums / counts)[inverse]
    return flat_r.reshape(x.shape)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (Pearson correlation of average ranks).

    Example:
        >>> spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0]))
        0.5
    """
    rx, ry = rank(x) - (len(x) - 1) / 2, rank(y) - (len(y) - 1) / 2
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def predicted_losses(
    scores: np.ndarray, convention: str, masks: np.ndarray | Tensor, example_ids: np.ndarray
) -> np.ndarray:
    """``[M, Q]`` first-order predicted losses (up to an increasing affine map).

    Args:
        scores: ``[Q, N']`` (or ``[Q, N', S]``, summed over tokens).
        convention: ``"influence"`` or ``"metagradient"``.
        masks: ``[M, N]`` kept examples by dataset row.
        example_ids: ``[N']`` dataset rows of the score columns.
    """
    helpful = helpfulness(scores, convention).astype(np.float64)
    if helpful.ndim == 3:
        helpful = helpful.sum(-1)  # (Q, N')
    kept = np.asarray(masks, dtype=np.float64)[:, example_ids]  # (M, N')
    return -(kept @ helpful.T)  # (M, Q)


def linear_datamodeling_score(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Per-query Spearman correlation ``[Q]`` of ``[M, Q]`` predictions and measurements."""
    return np.array([spearman(predicted[:, q], measured[:, q]) for q in range(measured.shape[1])])


def retrain_losses(
    retrain: Retrain,
    masks: Tensor,
    cache: str | Path | None = None,
    data_order: str = "",
    key: str = "",
) -> np.ndarray:
    """``[M, Q]`` query losses after retraining on every subset (resumable through ``cache``).

    Args:
        retrain: Trains on 0/1 weights and returns the query losses and the data-order hash.
        masks: ``[M, N]`` subsets.
        cache: A safetensors file of masks and losses; rows already there are reused, and
            each new retrain is appended, so an interrupted evaluation continues.
        data_order: Expected data-order hash (``""``: not checked).
        key: Identifies the training setup (e.g. a hash of the config); a cache written
            with another key is refused.
    """
    path = Path(cache) if cache is not None else None
    masks_np = masks.numpy().astype(np.uint8)
    losses: list[np.ndarray] = []
    if path is not None and path.is_file():
        saved = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            saved_key = (f.metadata() or {}).get("key", "")
        done = len(saved["losses"])
        same = done <= len(masks) and np.array_equal(saved["masks"], masks_np[:done])
        if not same or saved_key != key:
            raise ValueError(
                f"{path} holds retrains of other subsets or another training setup (key "
                f"{saved_key!r} != {key!r}); pass another --retrains path or delete it"
            )
        losses = list(saved["losses"])
    for m in range(len(losses), len(masks)):
        loss, order = retrain(masks[m])
        if data_order and order != data_order:
            raise ValueError(
                f"retrain {m} saw another data order ({order} != {data_order}): the loader is "
                "not deterministic; use a seeded or non-shuffled loader (TextDataModule is)"
            )
        losses.append(np.asarray(loss, dtype=np.float64))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"masks": masks_np[: m + 1], "losses": np.stack(losses)}
            save_file(tensors, str(path), metadata={"key": key})
    return np.stack(losses)


def format_table(rows: Sequence[tuple[str, str, np.ndarray]], *, markdown: bool = False) -> str:
    """A table of (method, convention, per-query LDS) rows: mean ± sd over queries."""
    lines = []
    head = ("method", "convention", "LDS mean", "sd", "queries")
    body = [(m, c, f"{np.nanmean(v):.3f}", f"{np.nanstd(v):.3f}", str(len(v))) for m, c, v in rows]
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        lines.append(f"{head[0]:<24}{head[1]:<14}{head[2]:>9}{head[3]:>8}{head[4]:>9}")
        lines += [f"{m:<24}{c:<14}{a:>9}{b:>8}{q:>9}" for m, c, a, b, q in body]
    return "\n".join(lines)
