"""QueryEncoder: query rows made exactly as a gradient store's rows were made.

The store's metadata says how its rows were made (projection, normalizers, module
selection, heads, loss reduction: :class:`~lightning_bergson.capture.settings.
CaptureSettings`); the encoder hooks the same :class:`GradientCollector` on the query model
with those settings, so query rows and stored rows match by construction, and refuses a
model that is not the store's (:mod:`.store_match`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..capture import GradientCollector
from ..store import GradientStore
from .queries import LossFn, causal_lm_query_losses, to_device
from .results import RowSink
from .store_match import (
    CHECK_MODEL_MODES,
    StoreMismatchError,
    capture_settings,
    check_blocks,
    check_model,
    resolve_network,
    store_normalizers,
)

__all__ = ["Queries", "QueryEncoder", "query_mode"]

Queries = Tensor | Mapping[str, Tensor]


@contextmanager
def query_mode(network: nn.Module, weights: Sequence[Tensor]) -> Iterator[None]:
    """Eval mode (no dropout), and every tracked weight requiring grad, restored on exit:
    gradients must flow through every tracked module, frozen or not."""
    was_training = network.training
    frozen = [w for w in weights if not w.requires_grad]
    network.eval()
    try:
        for w in frozen:
            w.requires_grad_(True)
        yield
    finally:
        network.train(was_training)
        for w in frozen:
            w.requires_grad_(False)


class QueryEncoder:
    """Make query rows ``[Q, D]`` with a store's own capture settings.

    Args:
        store: The open gradient store.
        check_model: ``"strict"``, ``"shapes"`` or ``"off"`` (see
            :func:`~lightning_bergson.attribution.store_match.check_model`).
        normalizers: Normalizer file for query rows (default: the store's own).

    Example:
        >>> import tempfile
        >>> from lightning_bergson.store import GradientStoreWriter, layout_blocks
        >>> path = f"{tempfile.mkdtemp()}/g.zarr"
        >>> blocks = layout_blocks([("fc", (1, 2), "fc", None)])
        >>> meta = {"projection": {"dim": 0, "seed": 0}, "capture": {"root": None}}
        >>> with GradientStoreWriter(path, modules=blocks, metadata=meta) as w:
        ...     w.append(torch.eye(2), example_id=[0, 1], step=0, epoch=0)
        >>> net = nn.Sequential()
        >>> net.add_module("fc", nn.Linear(2, 1, bias=False))
        >>> enc = QueryEncoder(GradientStore.open(path))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> rows = enc.query_gradients(net, x, loss_fn=lambda m, b: m(b).sum(dim=1))
        >>> rows.tolist()   # d(w . x)/dw = x
        [[1.0, 2.0]]
    """

    def __init__(
        self,
        store: GradientStore,
        *,
        check_model: Literal["strict", "shapes", "off"] = "strict",
        normalizers: str | Path | None = None,
    ) -> None:
        if check_model not in CHECK_MODEL_MODES:
            raise ValueError(f"check_model={check_model!r} is not one of {CHECK_MODEL_MODES}")
        self.store, self.check_model, self.normalizers = store, check_model, normalizers
        self.settings = capture_settings(store.attrs)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The network whose modules the store names (checked against the store)."""
        network = resolve_network(model, self.settings.root)
        check_model(self.store.attrs, network, store=self.store.path, mode=self.check_model)
        return network

    def collector(
        self, model: nn.Module, closure: Callable[[str, Tensor], None] | None = None
    ) -> GradientCollector:
        """A :class:`GradientCollector` configured exactly like the store's capture."""
        network = self.prepare(model)
        parents = sorted({b.parent for b in self.store.modules})
        collector = GradientCollector(
            network, **self.settings.collector_kwargs(parents), closure=closure
        )
        check_blocks(self.store.modules, collector.blocks)
        norms = store_normalizers(self.store.location, self.settings, self.normalizers)
        collector.set_normalizers(norms)
        return collector

    def query_gradients(
        self, model: nn.Module, batch: Any, *, loss_fn: LossFn | None = None
    ) -> Tensor:
        """Rows ``[B, D]`` (on CPU) of each query's own loss, as the store would hold them.

        The network runs in eval mode; parameters' ``.grad`` are left untouched. ``loss_fn``
        as :meth:`Attributor.query_gradients`.
        """
        sink = RowSink()
        collector = self.collector(model, closure=sink.add)
        network = collector.model
        device = next(network.parameters()).device
        fn = loss_fn or causal_lm_query_losses(self.settings.loss_reduction)
        weights = [m.weight for m in collector.modules.values()]
        with query_mode(network, weights), collector, torch.enable_grad():
            losses = fn(network, to_device(batch, device))  # (B,)
            torch.autograd.grad(losses.sum(), weights, allow_unused=True)
        return sink.rows(self.store.modules)

    def rows(self, queries: Queries) -> Tensor:
        """Query rows ``[Q, D]`` over all store blocks, from rows or block name -> ``[Q, d]``.

        Raises:
            StoreMismatchError: the rows do not have the store's row width.
        """
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
