"""Moved: the checks that a model matches a gradient store live in
:mod:`lightning_bergson.attribution.store_match`. This module keeps the old import path."""

from __future__ import annotations

from .store_match import (
    CHECK_MODEL_MODES,
    VOLATILE_CONFIG_KEYS,
    CaptureSettings,
    StoreMismatchError,
    capture_settings,
    check_blocks,
    check_model,
    resolve_network,
    store_normalizers,
)

__all__ = [
    "CHECK_MODEL_MODES",
    "VOLATILE_CONFIG_KEYS",
    "CaptureSettings",
    "StoreMismatchError",
    "capture_settings",
    "check_blocks",
    "check_model",
    "resolve_network",
    "store_normalizers",
]
