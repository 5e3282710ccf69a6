"""Scoring methods of :class:`~lightning_bergson.ekfac.EkfacModule` (kept apart from fitting).

``pairwise_scores`` and ``self_scores`` run outside the Trainer, on the network's device,
with the factors read from ``factors_dir``; the math is in :mod:`.influence`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..scores import ScoreSettings, write_scores
from ..store import GradientStore
from .influence import EkfacPreconditioner, iter_loader_gradients, iter_store_gradients
from .influence import pairwise_influence as _pairwise
from .storage import EkfacFactors

__all__ = ["ScoringMixin"]

Method = Literal["ekfac", "kfac"]


class ScoringMixin:
    """Influence scores from fitted factors; mixed into EkfacModule."""

    factors_dir: Path
    network: nn.Module
    tracked: dict[str, bool]
    shapes: dict[str, tuple[int, int]]
    _factors: EkfacFactors | None

    def example_losses(self, batch: Any, *, sample: bool = False) -> Tensor:
        raise NotImplementedError

    def load_factors(self, *, reload: bool = False) -> EkfacFactors:
        """The fitted factors of ``factors_dir`` (cached), checked against the tracked modules."""
        if self._factors is None or reload:
            factors = EkfacFactors.load(self.factors_dir)
            expected = {n: list(s) for n, s in self.shapes.items()}
            found = {n: m["shape"] for n, m in factors.config["modules"].items()}
            if expected != found:
                raise ValueError(
                    f"factors in {self.factors_dir} were fitted for modules {sorted(found)} "
                    f"(shapes {found}) but this module tracks {expected}; use the same include/"
                    "exclude/include_bias and network, or refit"
                )
            self._factors = factors
        return self._factors

    def preconditioner(
        self, *, damping: float = 0.1, relative_damping: bool = True, method: Method = "ekfac"
    ) -> EkfacPreconditioner:
        """Damped (E)K-FAC preconditioner on the network's device and dtype (>= float32)."""
        return EkfacPreconditioner.from_factors(
            self.load_factors(),
            damping=damping,
            relative_damping=relative_damping,
            method=method,
            dtype=self._score_dtype(),
            device=self._score_device(),
        )

    def pairwise_scores(
        self,
        query_dataloader: Iterable[Any],
        train_dataloader: Iterable[Any] | None = None,
        *,
        store: str | Path | GradientStore | None = None,
        damping: float = 0.1,
        relative_damping: bool = True,
        method: Method = "ekfac",
        out: str | Path | None = None,
        overwrite: bool = False,
    ) -> Tensor:
        """Influence of every training example on every query: ``[num_queries, num_train]``.

        Positive = training on the example lowers the query's loss. Rows follow the query
        dataloader's order, columns ascending ``example_id`` (whatever the training order).

        Args:
            query_dataloader: Query batches (same format as training batches).
            train_dataloader: Training batches; gradients are computed on the fly.
            store: Instead of ``train_dataloader``, a gradient store captured with
                ``projection_dim=0`` (and no normalizer, summed losses) at these weights.
            damping: Damping added to the eigenvalues.
            relative_damping: ``damping`` is a multiple of each module's mean eigenvalue
                (``0.1`` relative is Kronfluence's default heuristic); else absolute.
            method: ``"ekfac"`` or ``"kfac"`` (eigenvalues ``e_S e_A^T``, no correction).
            out: Also write the scores to this Zarr path (:func:`~lightning_bergson.scores.
                write_scores`, ``method="ekfac"``, ``convention="influence"``).
            overwrite: Replace an existing ``out``.
        """
        pre = self.preconditioner(damping=damping, relative_damping=relative_damping, method=method)
        with _eval(self.network):
            query_ids, preconditioned = self._preconditioned_queries(query_dataloader, pre)
            scores, example_ids = _pairwise(
                preconditioned, self._train_batches(train_dataloader, store)
            )
        if out is not None:
            meta = {
                "damping": damping,
                "relative_damping": relative_damping,
                "preconditioner": method,
                "factors_dir": str(self.factors_dir),
                "sign": "positive = training on the example lowers the query loss",
            }
            damped = f"{'relative ' if relative_damping else ''}damping {damping:g}"
            settings = ScoreSettings(
                store=None if store is None else str(getattr(store, "path", store)),
                preconditioner=f"{method} inverse Fisher ({damped}; factors {self.factors_dir})",
                columns="examples",
            )
            write_scores(
                out,
                scores,
                example_ids,
                method="ekfac",
                convention="influence",
                query_ids=query_ids,
                metadata=meta,
                settings=settings,
                overwrite=overwrite,
            )
        return scores

    def self_scores(
        self,
        train_dataloader: Iterable[Any] | None = None,
        *,
        store: str | Path | GradientStore | None = None,
        damping: float = 0.1,
        relative_damping: bool = True,
        method: Method = "ekfac",
    ) -> Tensor:
        """Self-influence ``<G_i, (H + damping)^-1 G_i>`` ``[num_train]``, ascending example id."""
        pre = self.preconditioner(damping=damping, relative_damping=relative_damping, method=method)
        ids, parts = [], []
        with _eval(self.network):
            for batch_ids, grads in self._train_batches(train_dataloader, store):
                parts.append(pre.self_influence(grads).cpu())
                ids.append(batch_ids)
        order = torch.argsort(torch.cat(ids))
        return torch.cat(parts)[order]

    def inspect_factors(
        self, module: str | None = None, out_dir: str | Path | None = None
    ) -> list[Path]:
        """PNG heatmaps of ``A``, ``S``, ``Lambda`` of ``module`` and eigenvalue spectra."""
        from .inspect import inspect_factors

        return inspect_factors(self.factors_dir, module=module, out_dir=out_dir)

    def _preconditioned_queries(
        self, loader: Iterable[Any], pre: EkfacPreconditioner
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ids, parts = [], []
        loss_fn = partial(self.example_losses, sample=False)
        grads_iter = iter_loader_gradients(
            self.network, self.tracked, loader, loss_fn, dtype=self._score_dtype()
        )
        for batch_ids, grads in grads_iter:
            ids.append(batch_ids)
            parts.append(pre.ihvp(grads))
        if not parts:
            raise ValueError("query_dataloader yielded no batches")
        return torch.cat(ids), {n: torch.cat([p[n] for p in parts]) for n in parts[0]}

    def _train_batches(
        self, loader: Iterable[Any] | None, store: str | Path | GradientStore | None
    ) -> Iterable[tuple[Tensor, dict[str, Tensor]]]:
        if (loader is None) == (store is None):
            raise ValueError("pass exactly one of train_dataloader and store=")
        dtype = self._score_dtype()
        if store is not None:
            opened = store if isinstance(store, GradientStore) else GradientStore.open(store)
            return _to(iter_store_gradients(opened, self.shapes, dtype=dtype), self._score_device())
        loss_fn = partial(self.example_losses, sample=False)
        return iter_loader_gradients(self.network, self.tracked, loader, loss_fn, dtype=dtype)  # type: ignore[arg-type]

    def _score_device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _score_dtype(self) -> torch.dtype:
        return torch.promote_types(next(self.network.parameters()).dtype, torch.float32)


def _to(batches: Iterable[tuple[Tensor, dict[str, Tensor]]], device: torch.device):
    for ids, grads in batches:
        yield ids, {n: g.to(device) for n, g in grads.items()}


class _eval:
    """Put a network in eval mode for the duration of a block, then restore its mode."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.was_training = net, net.training

    def __enter__(self) -> nn.Module:
        self.net.eval()
        return self.net

    def __exit__(self, *exc: object) -> None:
        self.net.train(self.was_training)
