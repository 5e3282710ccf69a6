"""Gradient capture math: projections, normalizers, head splits and hooks (pure torch)."""

from .coverage import CaptureReport, describe_capture
from .heads import HeadConfig
from .hooks import DEFAULT_EXCLUDE, Block, GradientCollector, trackable_modules
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from .optimizer_state import normalizers_from_optimizer
from .projection import ProjectionCache, projection_matrix, stable_seed
from .selection import select_modules

__all__ = [
    "DEFAULT_EXCLUDE",
    "AdafactorNormalizer",
    "AdamNormalizer",
    "Block",
    "CaptureReport",
    "GradientCollector",
    "HeadConfig",
    "Normalizer",
    "ProjectionCache",
    "describe_capture",
    "normalizers_from_optimizer",
    "projection_matrix",
    "select_modules",
    "stable_seed",
    "trackable_modules",
]
