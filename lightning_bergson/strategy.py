"""Strategies that make gradient capture exact under DDP, FSDP2 and crashes.

:class:`BergsonStrategyMixin` adds, to any Lightning strategy, what a callback
cannot do cleanly:

* every training DataLoader becomes a :class:`~lightning_bergson.loader.ResumableLoader`
  (after Lightning inserted its ``DistributedSampler``): batches of datasets without an
  ``example_id`` column get the sampler's dataset rows, and a mid-epoch checkpoint
  records how many batches were trained on, so a resumed run sees exactly the
  examples an uninterrupted run would;
* the ids are taken out of the batch before the LightningModule's ``*_step`` sees it (after
  the callback read them): batches of types that cannot hold a key arrive unwrapped, and
  the ``example_id`` key is removed from dict batches, so ``self.model(**batch)`` works on
  Hugging Face models. A LightningModule that needs the ids itself sets the class attribute
  ``needs_example_id = True`` (:class:`~lightning_bergson.MagicModule` and
  :class:`~lightning_bergson.EkfacModule` do) and keeps the key.

Registered names (use them as ``Trainer(strategy=...)`` or ``--trainer.strategy``):

=====================  ===============================================================
``bergson``            single device (:class:`BergsonSingleDeviceStrategy`)
``bergson_ddp``        DistributedDataParallel (:class:`BergsonDDPStrategy`)
``bergson_fsdp2``      FSDP2 via ``fully_shard`` in ``configure_model``
                       (:class:`BergsonModelParallelStrategy`, data parallel only)
=====================  ===============================================================

Sharded optimizer state (FSDP2 ``DTensor``) is gathered by
:func:`~lightning_bergson.capture.normalizers_from_optimizer` with ``full_tensor()``,
a collective that every rank runs at the same point of every step.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    StrategyRegistry,
)
from typing_extensions import override

from .batch import unstamp
from .loader import ResumableLoader, make_resumable

__all__ = [
    "BergsonDDPStrategy",
    "BergsonModelParallelStrategy",
    "BergsonSingleDeviceStrategy",
    "BergsonStrategyMixin",
]


class BergsonStrategyMixin:
    """Mix into a Lightning ``Strategy`` (before it in the bases) to support capture.

    Attributes:
        example_id_key: Batch key of the dataset rows.
        strip_example_id: Remove the key before ``training_step`` sees the batch.
    """

    example_id_key: str = "example_id"
    strip_example_id: bool = True

    @override
    def process_dataloader(self, dataloader: object) -> object:
        processed = super().process_dataloader(dataloader)  # type: ignore[misc]
        return make_resumable(processed, key=self.example_id_key)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.mark_trained()
        args, kwargs = self._unstamped(args, kwargs)
        return super().training_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._unstamped(args, kwargs)
        return super().validation_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._unstamped(args, kwargs)
        return super().test_step(*args, **kwargs)  # type: ignore[misc]

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._unstamped(args, kwargs)
        return super().predict_step(*args, **kwargs)  # type: ignore[misc]

    def _unstamped(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The step's arguments with the batch as the LightningModule should see it."""
        if args:
            batch, args = args[0], args[1:]
        else:
            batch = kwargs.pop("batch", None)
        batch = unstamp(batch)
        keep = getattr(self.lightning_module, "needs_example_id", False)  # type: ignore[attr-defined]
        if self.strip_example_id and not keep and isinstance(batch, MutableMapping):
            batch.pop(self.example_id_key, None)
        return (batch, *args), kwargs


class BergsonSingleDeviceStrategy(BergsonStrategyMixin, SingleDeviceStrategy):
    """Single device with resumable, example-id-stamping train loaders.

    Example:
        >>> import lightning.pytorch as L
        >>> type(L.Trainer(strategy="bergson", logger=False).strategy).__name__
        'BergsonSingleDeviceStrategy'
    """

    def __init__(self, device: str | torch.device = "cpu", **kwargs: Any) -> None:
        super().__init__(device=device, **kwargs)


class BergsonDDPStrategy(BergsonStrategyMixin, DDPStrategy):
    """``DDPStrategy`` with resumable, example-id-stamping train loaders."""


class BergsonModelParallelStrategy(BergsonStrategyMixin, ModelParallelStrategy):
    """FSDP2 (``ModelParallelStrategy``) with resumable, example-id-stamping train loaders.

    The LightningModule shards itself in ``configure_model`` with ``fully_shard``
    (:class:`~lightning_bergson.CausalLMModule` does so when ``self.device_mesh`` is set).
    Defaults to pure data parallelism over all processes.
    """

    def __init__(self, data_parallel_size: int | str = "auto", **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(data_parallel_size=data_parallel_size, **kwargs)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()


def _register() -> None:
    entries = {
        "bergson": (BergsonSingleDeviceStrategy, "single device, capture-aware"),
        "bergson_ddp": (BergsonDDPStrategy, "DDP, capture-aware"),
        "bergson_fsdp2": (BergsonModelParallelStrategy, "FSDP2 data parallel, capture-aware"),
    }
    for name, (cls, description) in entries.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description)


_register()
