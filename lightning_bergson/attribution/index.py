"""Moved: :class:`IndexModule` lives in :mod:`lightning_bergson.index`, beside the capture
side. This module keeps the old import path."""

from __future__ import annotations

from ..index import DTYPES, IndexModule

__all__ = ["DTYPES", "IndexModule"]
