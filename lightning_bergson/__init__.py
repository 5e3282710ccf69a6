"""Training-data attribution for PyTorch Lightning.

Capture every training example's gradient during ``fit`` with
:class:`GradientCaptureCallback`, read it back with :class:`GradientStore`.

The names below are imported on first use (PEP 562), so ``import lightning_bergson.store``
or ``lightning_bergson.scores`` does not pay for Lightning and transformers.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

_EXPORTS = {
    "AdafactorNormalizer": ".capture",
    "AdamNormalizer": ".capture",
    "Attributor": ".attribution",
    "BergsonDDPStrategy": ".strategy",
    "BergsonModelParallelStrategy": ".strategy",
    "BergsonSingleDeviceStrategy": ".strategy",
    "BergsonStrategyMixin": ".strategy",
    "BiographyCorpus": ".corpus",
    "CausalLMModule": ".models",
    "EkfacModule": ".ekfac",
    "GradientCaptureCallback": ".callbacks",
    "GradientCollector": ".capture",
    "GradientStore": ".store",
    "GradientStoreWriter": ".store",
    "HeadConfig": ".capture",
    "IndexModule": ".index",
    "MagicModule": ".magic",
    "NonFiniteGradientError": ".callbacks",
    "TextDataModule": ".data",
    "capture_example_loss": ".callbacks",
    "make_biographies": ".corpus",
    "normalizers_from_optimizer": ".capture",
}
__all__ = [
    "AdafactorNormalizer",
    "AdamNormalizer",
    "Attributor",
    "BergsonDDPStrategy",
    "BergsonModelParallelStrategy",
    "BergsonSingleDeviceStrategy",
    "BergsonStrategyMixin",
    "BiographyCorpus",
    "CausalLMModule",
    "EkfacModule",
    "GradientCaptureCallback",
    "GradientCollector",
    "GradientStore",
    "GradientStoreWriter",
    "HeadConfig",
    "IndexModule",
    "MagicModule",
    "NonFiniteGradientError",
    "TextDataModule",
    "capture_example_loss",
    "make_biographies",
    "normalizers_from_optimizer",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if "lightning.pytorch" in sys.modules:
    # Lightning is loaded already, so registering costs nothing: Trainer(strategy="bergson")
    # then works after a bare `import lightning_bergson`. Otherwise the names are registered
    # by the first import of a Lightning-side name (callbacks, models, data, strategy, ...).
    from . import strategy as _strategy  # noqa: F401

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .attribution import Attributor
    from .callbacks import GradientCaptureCallback, NonFiniteGradientError, capture_example_loss
    from .capture import (
        AdafactorNormalizer,
        AdamNormalizer,
        GradientCollector,
        HeadConfig,
        normalizers_from_optimizer,
    )
    from .corpus import BiographyCorpus, make_biographies
    from .data import TextDataModule
    from .ekfac import EkfacModule
    from .index import IndexModule
    from .magic import MagicModule
    from .models import CausalLMModule
    from .store import GradientStore, GradientStoreWriter
    from .strategy import (
        BergsonDDPStrategy,
        BergsonModelParallelStrategy,
        BergsonSingleDeviceStrategy,
        BergsonStrategyMixin,
    )
