"""Attribution: query a gradient store, TrackStar preconditioners, score arrays and reports.

* :class:`Attributor` makes query rows with the store's own capture settings and streams
  the store in chunks for top-k inner-product or cosine scores (Bergson's call shape).
* :class:`SecondMomentPreconditioner` (TrackStar's) fits per-block second moments of
  stored rows (float64 eigh, damped inverse powers) and saves them beside the store.
* :meth:`Attributor.token_scores` / :meth:`Attributor.query_token_scores` split a score over
  the tokens of a document or of a query (:mod:`.token_scores`).
* :func:`write_score_array` scores many queries into the shared Zarr score format.
* :mod:`~lightning_bergson.attribution.report` renders Markdown/HTML reports of any scores.

Old names still import from here: ``Preconditioner`` (now ``SecondMomentPreconditioner``)
and ``IndexModule`` (its home is :mod:`lightning_bergson.index`, beside the capture side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "Attributor": ".attributor",
    "SearchResult": ".attributor",
    "SecondMomentPreconditioner": ".preconditioners",
    "StoreMismatchError": ".store_match",
    "TokenScoreMismatchError": ".token_scores",
    "TraceResult": ".attributor",
    "capture_settings": ".store_match",
    "check_model": ".store_match",
    "query_batch": ".queries",
}
__all__ = [
    "Attributor",
    "SearchResult",
    "SecondMomentPreconditioner",
    "StoreMismatchError",
    "TokenScoreMismatchError",
    "TraceResult",
    "capture_settings",
    "check_model",
    "query_batch",
]
_MOVED = {
    "IndexModule": ("..index", "IndexModule"),
    "Preconditioner": (".preconditioners", "SecondMomentPreconditioner"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), _MOVED)

if TYPE_CHECKING:
    from ..index import IndexModule as IndexModule  # old path, see _MOVED
    from .attributor import Attributor, SearchResult, TraceResult
    from .preconditioners import Preconditioner as Preconditioner  # old name
    from .preconditioners import SecondMomentPreconditioner
    from .queries import query_batch
    from .store_match import StoreMismatchError, capture_settings, check_model
    from .token_scores import TokenScoreMismatchError
