"""Reports of attribution scores: console text, Markdown, a self-contained HTML page, PNGs.

Method-agnostic: a report is built from a score array ``[Q, N]`` (any method, any sign
convention of :mod:`lightning_bergson.scores`), the training texts and the query texts.
Each query shows its most helpful (top) and most harmful (bottom) training examples with
text, score and, where a column is a stored row, its epoch and step; then a histogram of
all its scores with the top-k and known-relevant documents marked. A settings header
(store, method, sign convention, preconditioner, rows or examples), a legend and a short
"how to read this" come first. The HTML page embeds the histograms as base64 PNGs, so the
single file can be mailed or archived.

Example:
    >>> reports = query_reports(np.array([[0.1, -2.0, 3.0]]), [10, 11, 12],
    ...                         {10: "a", 11: "b", 12: "c"}, ["q"], k=1)
    >>> [(m.example_id, m.text) for m in reports[0].top + reports[0].bottom]
    [(12, 'c'), (11, 'b')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .format import ScoreHeader, helpfulness
from .render import format_text, render_html, render_markdown
from .spans import TokenScores

if TYPE_CHECKING:
    from ..attribution.results import SearchResult

__all__ = [
    "Match",
    "QueryReport",
    "format_text",
    "from_search",
    "query_reports",
    "write_report",
]

Ids = Sequence[int] | np.ndarray


@dataclass
class Match:
    """One training example (or stored row) shown for a query.

    Example:
        >>> Match(7, 0.5, "Alice Moreau was born in Lyon.", relevant=True, epoch=1).relevant
        True
    """

    example_id: int
    score: float
    text: str
    relevant: bool = False  # e.g. the document states the queried fact
    epoch: int | None = None  # when the score's column is a stored row
    step: int | None = None
    tokens: TokenScores | None = None  # the document's token scores (per-token attribution)
    query_tokens: TokenScores | None = None  # the query's tokens' scores against it


@dataclass
class QueryReport:
    """A query's top (most helpful) and bottom (most harmful) training examples.

    Example:
        >>> rep = QueryReport("Alice Moreau was born in", [Match(7, 0.5, "...")], [])
        >>> [m.example_id for m in rep.top]
        [7]
    """

    query: str
    top: list[Match]
    bottom: list[Match]
    scores: np.ndarray | None = None  # (N,) every score, for the histogram
    notes: list[str] = field(default_factory=list)
    relevant_scores: list[float] = field(default_factory=list)  # every known-relevant column
    num_scores: int | None = None  # N, columns scored
    num_examples: int | None = None  # distinct training examples among them


def _text(texts: Mapping[int, str] | Sequence[str], example_id: int) -> str:
    try:
        return str(texts[example_id])
    except (IndexError, KeyError):
        return f"<no text for example {example_id}>"


def _column(values: Ids | None, j: int) -> int | None:
    return None if values is None else int(values[j])


def query_reports(
    scores: np.ndarray,
    example_ids: Ids,
    texts: Mapping[int, str] | Sequence[str],
    queries: Sequence[str],
    *,
    k: int = 5,
    convention: str = "influence",
    relevant: Sequence[set[int]] | None = None,
    epochs: Ids | None = None,
    steps: Ids | None = None,
) -> list[QueryReport]:
    """Top and bottom ``k`` per query from a full score array.

    Args:
        scores: ``[Q, N]`` scores in ``convention``.
        example_ids: ``[N]`` example ids of the columns.
        texts: Example id -> training text (a list indexed by id works).
        queries: ``Q`` query texts.
        k: Examples per side.
        convention: ``"influence"`` or ``"metagradient"``; shown scores are "helpfulness"
            (higher = lowers the query loss more).
        relevant: Per query, example ids to mark (e.g. the documents stating the fact).
        epochs: ``[N]`` epoch of each column, when columns are stored rows.
        steps: ``[N]`` optimizer step of each column, when columns are stored rows.
    """
    helpful = helpfulness(np.asarray(scores, dtype=np.float64), convention)  # (Q, N)
    ids = np.asarray(example_ids)
    if helpful.ndim != 2 or helpful.shape != (len(queries), len(ids)):
        raise ValueError(
            f"scores must be [Q, N] = [{len(queries)}, {len(ids)}] (queries, example ids); "
            f"got {helpful.shape}"
        )
    for name, values in (("epochs", epochs), ("steps", steps)):
        if values is not None and len(values) != len(ids):
            raise ValueError(f"{name} has {len(values)} entries for {len(ids)} score columns")
    distinct = len(np.unique(ids))
    out = []
    for q, row in enumerate(helpful):
        finite = np.where(np.isfinite(row), row, -np.inf)
        order = np.argsort(-finite, kind="stable")
        mark = relevant[q] if relevant is not None else set()

        def match(j: int, mark: set[int] = mark, row: np.ndarray = row) -> Match:
            eid = int(ids[j])
            return Match(eid, float(row[j]), _text(texts, eid), eid in mark,
                         _column(epochs, j), _column(steps, j))  # fmt: skip

        top = [match(j) for j in order[:k]]
        bottom = [match(j) for j in order[::-1][: min(k, len(order))] if np.isfinite(row[j])]
        marked = row[np.isin(ids, list(mark)) & np.isfinite(row)].tolist() if mark else []
        out.append(QueryReport(queries[q], top, bottom, row, [], marked, len(ids), distinct))
    return out


def from_search(
    top: SearchResult,
    bottom: SearchResult | None,
    texts: Mapping[int, str] | Sequence[str],
    queries: Sequence[str],
    *,
    relevant: Sequence[set[int]] | None = None,
    epochs: Ids | None = None,
    steps: Ids | None = None,
    example_ids: Ids | None = None,
) -> list[QueryReport]:
    """Reports from :meth:`Attributor.extremes` results (no histogram: scores were streamed).

    Gradient scores use the ``"influence"`` convention, so they are shown as they are.
    ``epochs``, ``steps`` and ``example_ids`` (``[N]``, of every stored row) label matches
    by their ``rows`` and give the counts (rows, or distinct examples when rows were
    reduced per example: ``rows`` -1).
    """
    counts: tuple[int | None, int | None] = (None, None)
    if example_ids is not None:
        distinct = len(np.unique(np.asarray(example_ids)))
        per_row = bool((top.rows >= 0).any())
        counts = (len(example_ids) if per_row else distinct, distinct)
    out = []
    for q, query in enumerate(queries):
        mark = relevant[q] if relevant is not None else set()

        def matches(res: SearchResult | None, mark: set[int] = mark, q: int = q) -> list[Match]:
            if res is None:
                return []
            found = zip(res.indices[q].tolist(), res.scores[q].tolist(), res.rows[q].tolist(),
                        strict=True)  # fmt: skip
            return [
                Match(int(i), float(s), _text(texts, int(i)), int(i) in mark,
                      _column(epochs, r) if r >= 0 else None, _column(steps, r) if r >= 0 else None)
                for i, s, r in found
            ]  # fmt: skip

        out.append(QueryReport(query, matches(top), matches(bottom), None, [], [], *counts))
    return out


def write_report(
    reports: Sequence[QueryReport],
    out_dir: str | Path,
    *,
    title: str = "Attribution report",
    histograms: bool = True,
    header: ScoreHeader | None = None,
    source: str | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``scores_q<i>.png`` into ``out_dir``.

    Args:
        reports: From :func:`query_reports` or :func:`from_search`.
        out_dir: Output directory (created).
        title: Page title.
        histograms: Draw a score histogram per query (when its scores are known).
        header: The scores' header (method, sign convention, store, preconditioner, rows
            or examples), shown as the report's settings; ``None``: "not recorded".
        source: Where the scores were read from (a score array path), shown with them.

    Returns:
        ``{"markdown": ..., "html": ..., "png_<i>": ...}`` paths.
    """
    from .histogram import histogram_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _per_row(reports, header)
    unit = "rows" if rows else "training examples"
    pngs: dict[int, bytes] = {}
    for q, rep in enumerate(reports if histograms else ()):
        if rep.scores is not None and np.isfinite(rep.scores).any():
            pngs[q] = histogram_png(rep.scores, f"query {q}: {rep.query}",
                                    top=[m.score for m in rep.top if np.isfinite(m.score)],
                                    relevant=rep.relevant_scores,
                                    unit=unit)  # fmt: skip
    paths: dict[str, Path] = {}
    for q, data in pngs.items():
        paths[f"png_{q}"] = out / f"scores_q{q}.png"
        paths[f"png_{q}"].write_bytes(data)
    names = {q: paths[f"png_{q}"].name for q in pngs}
    paths["markdown"] = out / "report.md"
    text = render_markdown(reports, title, names, header=header, source=source, rows=rows)
    paths["markdown"].write_text(text, encoding="utf-8")
    paths["html"] = out / "report.html"
    page = render_html(reports, title, pngs, header=header, source=source, rows=rows)
    paths["html"].write_text(page, encoding="utf-8")
    return paths


def _per_row(reports: Sequence[QueryReport], header: ScoreHeader | None) -> bool:
    """Whether a column is a stored row (an example may appear once per epoch)."""
    if header is not None:
        return header.settings.columns == "rows"
    shown = [m for r in reports for m in r.top + r.bottom]
    split = any(
        r.num_examples is not None and r.num_examples < (r.num_scores or 0) for r in reports
    )
    return split or any(m.epoch is not None for m in shown)
