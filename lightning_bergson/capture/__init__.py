"""Gradient capture math: projections, normalizers, head splits and hooks (pure torch)."""

from .heads import HeadConfig
from .hooks import DEFAULT_EXCLUDE, Block, GradientCollector, trackable_modules
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from .optimizer_state import normalizers_from_optimizer
from .projection import ProjectionCache, projection_matrix, stable_seed

__all__ = [
    "DEFAULT_EXCLUDE",
    "AdafactorNormalizer",
    "AdamNormalizer",
    "Block",
    "GradientCollector",
    "HeadConfig",
    "Normalizer",
    "ProjectionCache",
    "normalizers_from_optimizer",
    "projection_matrix",
    "stable_seed",
    "trackable_modules",
]
