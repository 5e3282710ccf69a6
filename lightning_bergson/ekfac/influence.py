"""Influence scores from EK-FAC factors: iHVPs, pairwise and self scores, top-k, Zarr output.

``influence(q, t) = sum_modules <(H + damping)^-1 G_q, G_t>`` with ``G`` each example's
gradient of its summed token loss, so positive means training on ``t`` lowers the query
loss (the ``"influence"`` convention of :mod:`lightning_bergson.scores`), as in Kronfluence.
Training gradients are computed on the fly from a dataloader or read from a gradient store
captured with ``projection_dim=0``.

Example:
    >>> scores = torch.tensor([[0.5, -2.0, 1.0], [0.0, 3.0, -1.0]])
    >>> top = top_influences(scores, k=1, example_ids=torch.tensor([10, 11, 12]))
    >>> top.positive_ids.tolist(), top.negative_ids.tolist()
    ([[12], [11]], [[11], [12]])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from ..capture.settings import CaptureSettings
from ..store import GradientStore
from .factors import kfac_eigenvalues, resolve_damping, rotate, unrotate
from .storage import EkfacFactors
from .taps import LossFn, example_gradients

__all__ = [
    "EkfacPreconditioner",
    "Preconditioner",
    "TopInfluences",
    "check_store",
    "iter_loader_gradients",
    "iter_store_gradients",
    "pairwise_influence",
    "top_influences",
]

Grads = dict[str, Tensor]  # module -> [B, O, I]
Batches = Iterable[tuple[Tensor, Grads]]  # (example ids [B], grads)


@dataclass
class EkfacPreconditioner:
    """Per-module ``(Q_S, Q_A, eigenvalues + damping)`` of EK-FAC (or K-FAC), ready to apply.

    (Formerly ``Preconditioner``, a name TrackStar's preconditioner also had; that name still
    imports it from :mod:`lightning_bergson.ekfac`.)
    """

    bases: dict[str, tuple[Tensor, Tensor, Tensor]]
    method: str

    @classmethod
    def from_factors(
        cls,
        factors: EkfacFactors,
        *,
        damping: float = 0.1,
        relative_damping: bool = True,
        method: Literal["ekfac", "kfac"] = "ekfac",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> EkfacPreconditioner:
        """Damp each module's eigenvalues (absolute, or ``damping * mean`` when relative)."""
        if method not in ("ekfac", "kfac"):
            raise ValueError(f"method={method!r} is not one of 'ekfac', 'kfac'")
        bases = {}
        for name, f in factors.modules.items():
            if method == "kfac":
                eig = kfac_eigenvalues(f.gradient_eigenvalues, f.activation_eigenvalues)
            elif f.eigenvalue_correction is None:
                raise ValueError(
                    f"EK-FAC eigenvalue corrections of {name!r} are missing (the second fitting "
                    "phase did not run): fit with max_epochs=ek.num_phases, or use method='kfac'"
                )
            else:
                eig = f.eigenvalue_correction
            eig = eig.to(torch.float64)
            damped = eig + resolve_damping(eig, damping, relative_damping)  # (O, I)
            bases[name] = tuple(  # type: ignore[assignment]
                t.to(device=device, dtype=dtype)
                for t in (f.gradient_eigenvectors, f.activation_eigenvectors, damped)
            )
        return cls(bases, method)

    def ihvp(self, grads: Grads) -> Grads:
        """``(H + damping)^-1 G`` per module (``[B, O, I]`` each)."""
        out = {}
        for name, grad in grads.items():
            q_s, q_a, damped = self.bases[name]
            out[name] = unrotate(rotate(grad.to(q_s.dtype), q_s, q_a) / damped, q_s, q_a)
        return out

    def self_influence(self, grads: Grads) -> Tensor:
        """``sum_modules <G_i, (H + damping)^-1 G_i>`` ``[B]``."""
        total = None
        for name, grad in grads.items():
            q_s, q_a, damped = self.bases[name]
            part = (rotate(grad.to(q_s.dtype), q_s, q_a).square() / damped).sum((-2, -1))  # (B,)
            total = part if total is None else total + part
        assert total is not None, "no tracked module produced a gradient"
        return total


Preconditioner = EkfacPreconditioner  # the old name, kept importable


def iter_loader_gradients(
    model: nn.Module,
    tracked: Mapping[str, bool],
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    *,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[Tensor, Grads]]:
    """Yield ``(example ids [B], {module: G [B, O, I]})`` for every batch of ``dataloader``.

    Batches without ``example_id`` are numbered in iteration order.
    """
    device = next(model.parameters()).device
    seen = 0
    for batch in dataloader:
        batch = move_data_to_device(batch, device)
        grads = example_gradients(model, tracked, batch, loss_fn, dtype=dtype)
        size = next(iter(grads.values())).shape[0]
        ids = batch.get("example_id") if isinstance(batch, dict) else None
        ids = torch.arange(seen, seen + size) if ids is None else torch.as_tensor(ids).cpu()
        seen += size
        yield ids.to(torch.int64), grads


def check_store(store: GradientStore, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a store whose rows are not exact, unnormalized, summed-loss gradients of ``shapes``.

    Raises:
        ValueError: the store is projected, normalized, mean-reduced, split into heads, has
            several rows per example, or lacks a module (each message gives the reason and fix).
    """
    settings = CaptureSettings.from_attrs(store.attrs)
    dim = settings.projection_dim
    if dim != 0:
        raise ValueError(
            f"gradient store {store.path} holds randomly projected gradients (projection dim "
            f"{dim}); EK-FAC rotates each exact gradient G_i [out, in] into the Kronecker "
            "eigenbasis, which a projection L G_i R^T does not preserve. Capture with "
            "GradientCaptureCallback(projection_dim=0), or pass no store to compute training "
            "gradients on the fly."
        )
    normalizer = settings.normalizer
    if normalizer != "none":
        raise ValueError(
            f"gradient store {store.path} holds {normalizer}-normalized gradients; EK-FAC needs "
            "raw gradients. Capture with normalizer='none'."
        )
    if settings.loss_reduction != "sum":
        raise ValueError(
            f"gradient store {store.path} holds gradients of mean token losses; EK-FAC uses "
            "summed token losses. Capture with loss_reduction='sum'."
        )
    if len(np.unique(store.example_ids)) != len(store.example_ids):
        raise ValueError(
            f"gradient store {store.path} holds several rows for some examples (several epochs "
            "or steps); EK-FAC scores need one gradient per example at the final parameters."
        )
    blocks = {b.name: b for b in store.modules}
    for name, shape in shapes.items():
        block = blocks.get(name)
        if block is None or block.head is not None or tuple(block.shape) != tuple(shape):
            found = None if block is None else (tuple(block.shape), block.head)
            raise ValueError(
                f"gradient store {store.path} has no whole-module block {name!r} of shape "
                f"{tuple(shape)} (found {found}); capture the same modules without head_cfgs and "
                "with the same include_bias as the EK-FAC factors."
            )


def iter_store_gradients(
    store: GradientStore,
    shapes: Mapping[str, tuple[int, int]],
    *,
    chunk_rows: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[Tensor, Grads]]:
    """Yield ``(example ids, {module: G [n, O, I]})`` from a store (see :func:`check_store`)."""
    check_store(store, shapes)
    blocks = {b.name: b for b in store.modules}
    for start, rows in store.iter_chunks(chunk_rows, dtype=dtype):  # (n, D)
        ids = torch.from_numpy(store.example_ids[start : start + rows.shape[0]].copy())
        grads = {
            name: rows[:, blocks[name].offset : blocks[name].offset + blocks[name].size].reshape(
                -1, *shape
            )  # (n, O, I)
            for name, shape in shapes.items()
        }
        yield ids, grads


def pairwise_influence(preconditioned: Grads, batches: Batches) -> tuple[Tensor, Tensor]:
    """Scores ``[Q, N]`` of preconditioned queries against training batches, columns by id.

    Returns:
        ``(scores [Q, N], example_ids [N])`` sorted by example id.
    """
    parts, ids = [], []
    for batch_ids, grads in batches:
        score = None
        for name, grad in grads.items():
            q = preconditioned[name]
            term = q.reshape(q.shape[0], -1) @ grad.to(q).reshape(grad.shape[0], -1).T  # (Q, B)
            score = term if score is None else score + term
        assert score is not None
        parts.append(score.cpu())
        ids.append(batch_ids.cpu())
    example_ids = torch.cat(ids)
    order = torch.argsort(example_ids)
    return torch.cat(parts, dim=1)[:, order], example_ids[order]


@dataclass
class TopInfluences:
    """The ``k`` most helpful (largest) and most harmful (smallest) training examples per query."""

    positive_ids: Tensor  # (Q, k) example ids, most helpful first
    positive_scores: Tensor  # (Q, k)
    negative_ids: Tensor  # (Q, k) example ids, most harmful first
    negative_scores: Tensor  # (Q, k)


def top_influences(scores: Tensor, k: int = 5, example_ids: Tensor | None = None) -> TopInfluences:
    """Top-``k`` positive and negative influences per query of ``scores`` ``[Q, N]``."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of training examples")
    ids = torch.arange(scores.shape[1]) if example_ids is None else torch.as_tensor(example_ids)
    pos = torch.topk(scores, k, dim=1)
    neg = torch.topk(scores, k, dim=1, largest=False)
    return TopInfluences(ids[pos.indices], pos.values, ids[neg.indices], neg.values)
