"""Moved: store scanning lives in :mod:`lightning_bergson.store.scan` (public API:
:class:`~lightning_bergson.store.StoreScanner`). This module keeps the old import path."""

from __future__ import annotations

from ..store.scan import Chunk, iter_rows

__all__ = ["Chunk", "iter_rows"]
