"""Moved: model loading lives in :mod:`lightning_bergson.networks`, the run's data module
in :func:`lightning_bergson.data.load_text_data`. This module keeps the old import path."""

from __future__ import annotations

from ..data import load_text_data
from ..networks import find_checkpoint, is_pretrained_source, load_model

__all__ = ["find_checkpoint", "is_pretrained_source", "load_model", "load_text_data"]
