"""Reports of attribution scores: console text, Markdown, a self-contained HTML page, PNGs.

Method-agnostic: a report is built from a score array ``[Q, N]`` (any method, any sign
convention of :mod:`lightning_bergson.scores`), the training texts and the query texts.
Each query shows its most helpful (top) and most harmful (bottom) training examples with
text and score, and a histogram of all its scores. The HTML page embeds the histograms
as base64 PNGs, so the single file can be mailed or archived.

Example:
    >>> reports = query_reports(np.array([[0.1, -2.0, 3.0]]), [10, 11, 12],
    ...                         {10: "a", 11: "b", 12: "c"}, ["q"], k=1)
    >>> [(m.example_id, m.text) for m in reports[0].top + reports[0].bottom]
    [(12, 'c'), (11, 'b')]
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..scores import helpfulness

if TYPE_CHECKING:
    from .results import SearchResult

__all__ = ["Match", "QueryReport", "format_text", "from_search", "query_reports", "write_report"]


@dataclass
class Match:
    """One training example shown for a query.

    Example:
        >>> Match(7, 0.5, "Alice Moreau was born in Lyon.", relevant=True).relevant
        True
    """

    example_id: int
    score: float
    text: str
    relevant: bool = False  # e.g. the document states the queried fact


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


def _text(texts: Mapping[int, str] | Sequence[str], example_id: int) -> str:
    try:
        return str(texts[example_id])
    except (IndexError, KeyError):
        return f"<no text for example {example_id}>"


def query_reports(
    scores: np.ndarray,
    example_ids: Sequence[int] | np.ndarray,
    texts: Mapping[int, str] | Sequence[str],
    queries: Sequence[str],
    *,
    k: int = 5,
    convention: str = "influence",
    relevant: Sequence[set[int]] | None = None,
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
    """
    helpful = helpfulness(np.asarray(scores, dtype=np.float64), convention)  # (Q, N)
    ids = np.asarray(example_ids)
    if helpful.ndim != 2 or helpful.shape != (len(queries), len(ids)):
        raise ValueError(
            f"scores must be [Q, N] = [{len(queries)}, {len(ids)}] (queries, example ids); "
            f"got {helpful.shape}"
        )
    out = []
    for q, row in enumerate(helpful):
        finite = np.where(np.isfinite(row), row, -np.inf)
        order = np.argsort(-finite, kind="stable")
        mark = relevant[q] if relevant is not None else set()

        def match(j: int, mark: set[int] = mark, row: np.ndarray = row) -> Match:
            eid = int(ids[j])
            return Match(eid, float(row[j]), _text(texts, eid), eid in mark)

        top = [match(j) for j in order[:k]]
        bottom = [match(j) for j in order[::-1][: min(k, len(order))] if np.isfinite(row[j])]
        out.append(QueryReport(queries[q], top, bottom, row))
    return out


def format_text(reports: Sequence[QueryReport], *, bottom: bool = False, width: int = 100) -> str:
    """The console rendering used by ``python -m lightning_bergson attribute``."""
    lines = []
    for q, rep in enumerate(reports):
        lines.append(f"Query {q}: {rep.query}")
        lines.extend(f"  {note}" for note in rep.notes)
        sides = [("top", rep.top)] + ([("bottom", rep.bottom)] if bottom else [])
        for name, matches in sides:
            lines.append(f"  {name} {len(matches)}:")
            for rank, m in enumerate(matches, 1):
                text = m.text if len(m.text) <= width else m.text[: width - 3] + "..."
                flag = "*" if m.relevant else " "
                score = f"{m.score:+.4g}"
                lines.append(f"  {flag}{rank:>2}. {score:>10}  [{m.example_id}] {text}")
        lines.append("")
    if any(m.relevant for r in reports for m in r.top + r.bottom):
        lines.append("* = a training document that states the queried fact")
    return "\n".join(lines)


def _histogram_png(scores: np.ndarray, title: str) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(5, 2.6), dpi=100)
    ax = fig.add_subplot()
    finite = scores[np.isfinite(scores)]
    ax.hist(finite, bins=min(50, max(5, len(finite) // 4)), color="#4c72b0")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_title(title[:70], fontsize=9)
    ax.set_xlabel("score (higher = more helpful)", fontsize=8)
    ax.set_ylabel("training examples", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _md_cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(reports: Sequence[QueryReport], title: str, pngs: Mapping[int, str]) -> str:
    out = [f"# {title}", ""]
    for q, rep in enumerate(reports):
        out += [f"## Query {q}", "", f"> {_md_cell(rep.query, 1000)}", ""]
        out += [f"- {note}" for note in rep.notes] + ([""] if rep.notes else [])
        for name, matches in (("Top (most helpful)", rep.top), ("Bottom", rep.bottom)):
            out += [f"**{name}**", "", "| # | score | example | text |", "|---|---|---|---|"]
            for rank, m in enumerate(matches, 1):
                star = " *" if m.relevant else ""
                row = f"| {rank} | {m.score:+.4g} | {m.example_id}{star} | {_md_cell(m.text)} |"
                out.append(row)
            out.append("")
        if q in pngs:
            out += [f"![scores of query {q}]({pngs[q]})", ""]
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;width:100%;margin:.5em 0}"
    "td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}"
    ".pos{color:#1a7f37}.neg{color:#cf222e}.rel{background:#fff8c5}"
    "blockquote{background:#f6f8fa;margin:0;padding:.5em 1em}"
)


def _html(reports: Sequence[QueryReport], title: str, pngs: Mapping[int, bytes]) -> str:
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"]
    out.append(f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>")
    for q, rep in enumerate(reports):
        out.append(f"<h2>Query {q}</h2><blockquote>{esc(rep.query)}</blockquote>")
        out += [f"<p>{esc(note)}</p>" for note in rep.notes]
        for name, matches in (("Top (most helpful)", rep.top), ("Bottom", rep.bottom)):
            out.append(f"<h3>{name}</h3><table><tr><th>#</th><th>score</th>")
            out.append("<th>example</th><th>text</th></tr>")
            for rank, m in enumerate(matches, 1):
                cls = "pos" if m.score >= 0 else "neg"
                rel = " class='rel'" if m.relevant else ""
                out.append(
                    f"<tr{rel}><td>{rank}</td><td class='{cls}'>{m.score:+.4g}</td>"
                    f"<td>{m.example_id}</td><td>{esc(m.text)}</td></tr>"
                )
            out.append("</table>")
        if q in pngs:
            data = base64.b64encode(pngs[q]).decode()
            out.append(f"<img alt='scores of query {q}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    reports: Sequence[QueryReport],
    out_dir: str | Path,
    *,
    title: str = "Attribution report",
    histograms: bool = True,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``scores_q<i>.png`` into ``out_dir``.

    Returns:
        ``{"markdown": ..., "html": ..., "png_<i>": ...}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: dict[int, bytes] = {}
    if histograms:
        for q, rep in enumerate(reports):
            if rep.scores is not None and np.isfinite(rep.scores).any():
                pngs[q] = _histogram_png(rep.scores, f"query {q}: {rep.query}")
    paths: dict[str, Path] = {}
    for q, data in pngs.items():
        paths[f"png_{q}"] = out / f"scores_q{q}.png"
        paths[f"png_{q}"].write_bytes(data)
    names = {q: p.name for q, p in ((q, paths[f"png_{q}"]) for q in pngs)}
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(_markdown(reports, title, names), encoding="utf-8")
    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(reports, title, pngs), encoding="utf-8")
    return paths


def from_search(
    top: SearchResult,
    bottom: SearchResult | None,
    texts: Mapping[int, str] | Sequence[str],
    queries: Sequence[str],
    *,
    relevant: Sequence[set[int]] | None = None,
) -> list[QueryReport]:
    """Reports from :meth:`Attributor.extremes` results (no histogram: scores were streamed).

    Gradient scores use the ``"influence"`` convention, so they are shown as they are.
    """
    out = []
    for q, query in enumerate(queries):
        mark = relevant[q] if relevant is not None else set()

        def matches(res: SearchResult | None, mark: set[int] = mark, q: int = q) -> list[Match]:
            if res is None:
                return []
            pairs = zip(res.indices[q].tolist(), res.scores[q].tolist(), strict=True)
            return [Match(int(i), float(s), _text(texts, int(i)), int(i) in mark) for i, s in pairs]

        out.append(QueryReport(query, matches(top), matches(bottom)))
    return out
