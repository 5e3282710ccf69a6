"""Training-data attribution for PyTorch Lightning.

Capture every training example's gradient during ``fit`` with
:class:`GradientCaptureCallback`, read it back with :class:`GradientStore`.
"""

from .attribution import Attributor, IndexModule
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
from .magic import MagicModule
from .models import CausalLMModule
from .store import GradientStore, GradientStoreWriter
from .strategy import (
    BergsonDDPStrategy,
    BergsonModelParallelStrategy,
    BergsonSingleDeviceStrategy,
    BergsonStrategyMixin,
)

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
