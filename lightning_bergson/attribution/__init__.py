"""Attribution: query a gradient store, TrackStar preconditioners, score arrays and reports.

* :class:`Attributor` makes query rows with the store's own capture settings and streams
  the store in chunks for top-k inner-product or cosine scores (Bergson's call shape).
* :class:`Preconditioner` fits per-block second moments of stored rows (float64 eigh,
  damped inverse powers) and saves them beside the store.
* :func:`write_score_array` scores many queries into the shared Zarr score format.
* :mod:`~lightning_bergson.attribution.report` renders Markdown/HTML reports of any scores.
* :class:`IndexModule` builds a store post hoc from a trained model (``index`` command).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "Attributor": ".attributor",
    "IndexModule": ".index",
    "Preconditioner": ".preconditioners",
    "SearchResult": ".attributor",
    "StoreMismatchError": ".compat",
    "TraceResult": ".attributor",
    "capture_settings": ".compat",
    "check_model": ".compat",
    "query_batch": ".queries",
}
__all__ = [
    "Attributor",
    "IndexModule",
    "Preconditioner",
    "SearchResult",
    "StoreMismatchError",
    "TraceResult",
    "capture_settings",
    "check_model",
    "query_batch",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from .attributor import Attributor, SearchResult, TraceResult
    from .compat import StoreMismatchError, capture_settings, check_model
    from .index import IndexModule
    from .preconditioners import Preconditioner
    from .queries import query_batch
