"""Render query reports as console text, Markdown and a self-contained HTML page.

Every rendering shares one number format (:func:`score_format`: the same decimals, or the
same scientific notation, for every score of a report), the settings header
(:func:`settings_lines`), the legend and the "how to read this" paragraph, so the three
say the same thing.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from .format import SIGN_MEANING, ScoreHeader
from .spans import score_list, shaded_html, span_markdown, span_text

if TYPE_CHECKING:
    from .report import Match, QueryReport

__all__ = ["format_text", "render_html", "render_markdown", "score_format", "settings_lines"]

NOT_RECORDED = "not recorded"
RELEVANT_LEGEND = (
    "a known-relevant document given with the query (e.g. one that states the queried "
    "fact); a good attribution ranks it near the top."
)
NO_RELEVANT = "No known-relevant documents were given, so none is marked with *."


def score_format(scores: Iterable[float]) -> Callable[[float], str]:
    """One format for every score of a report: signed, aligned, 4 significant digits.

    Fixed-point with the decimals that give the largest magnitude 4 significant digits
    when it lies in ``[1e-3, 1e5)``, else scientific notation with 4 significant digits.

    Example:
        >>> fmt = score_format([0.9, -0.05])
        >>> fmt(0.9), fmt(-0.05)
        ('+0.9000', '-0.0500')
        >>> score_format([2.5e-6])(1e-7)
        '+1.000e-07'
    """
    mags = [abs(s) for s in scores if math.isfinite(s) and s != 0]
    top = max(mags, default=1.0)
    if 1e-3 <= top < 1e5:
        decimals = min(6, max(0, 3 - math.floor(math.log10(top))))
        return lambda s: f"{s:+.{decimals}f}"
    return lambda s: f"{s:+.3e}"


def _shown(reports: Sequence[QueryReport]) -> list[Match]:
    return [m for r in reports for m in r.top + r.bottom]


def _counts(reports: Sequence[QueryReport], rows: bool) -> str:
    known = [r for r in reports if r.num_scores is not None]
    if not known:
        return NOT_RECORDED
    n, u = known[0].num_scores or 0, known[0].num_examples or 0
    if rows:
        return f"{n:,} rows of {u:,} training examples, per query"
    return f"{n:,} training examples, per query"


def _reduction(header: ScoreHeader | None, rows: bool) -> str:
    if rows:
        text = ("rows: one score per stored row; an example trained in several epochs has a "
                "row per epoch (see the epoch and step columns)")  # fmt: skip
    elif header is not None and header.settings.example_reduce:
        text = f"examples: the {header.settings.example_reduce} of each example's rows"
    else:
        text = "examples: one score per training example"
    if header is not None and header.settings.query_reduce not in ("none", ""):
        text += f"; queries reduced to one score row by their {header.settings.query_reduce}"
    return text


def settings_lines(
    reports: Sequence[QueryReport], header: ScoreHeader | None, source: str | None, rows: bool
) -> list[tuple[str, str]]:
    """``(label, value)`` pairs of the settings header, in order."""
    s = header.settings if header is not None else None
    sign = (
        f"{header.convention}: {SIGN_MEANING[header.convention]}"
        if header is not None
        else f"{NOT_RECORDED}; shown scores: higher = more helpful"
    )
    lines = [("scores", source)] if source else []
    lines += [
        ("store", (s.store if s else None) or NOT_RECORDED),
        ("method", header.method if header is not None else NOT_RECORDED),
        ("sign convention", sign),
        ("preconditioner", (s.preconditioner if s else None) or NOT_RECORDED),
        ("reduction", _reduction(header, rows)),
        ("scored", _counts(reports, rows)),
    ]
    return lines


def how_to_read(rows: bool) -> str:
    """The short paragraph that says how to read the tables and histograms."""
    unit = "rows" if rows else "training examples"
    parts = [
        f"Each query lists the {unit} whose scores say they helped it most (Top: training "
        "on them lowers the query's loss) and hurt it most (Bottom: they raise it). Scores "
        "are shown as helpfulness, higher = more helpful, whatever the method's sign "
        "convention; compare them within a query and a method (their scale changes with "
        "the method and its settings), not across methods.",
        "An example trained in several epochs appears once per epoch, each row with the "
        "epoch and optimizer step it was captured at."
        if rows
        else "",
        "The histogram counts all of a query's scores on a log axis, over a symmetric-log "
        "score axis when scores take both signs, so the few documents in the tails stay "
        "visible; dashed green lines mark the top-k, orange lines the known-relevant "
        "documents.",
    ]
    return " ".join(p for p in parts if p)


TOKENS_LEGEND = (
    "Token scores: each token's share of the document's score against the query (the score "
    "of the loss of predicting that token; the tokens of a document add up to its score "
    "computed with the model given, which can differ from the stored rows' score when the "
    "rows were captured at other parameters). The span is the run of consecutive tokens "
    "with the largest summed score. Query tokens: each of the query's scored tokens' share "
    "of its score against the document."
)


def _token_fmt(reports: Sequence[QueryReport]) -> Callable[[float], str] | None:
    """One format for every token score of a report; ``None`` when none has token scores."""
    shown = [t for m in _shown(reports) for t in (m.tokens, m.query_tokens) if t is not None]
    return score_format(s for t in shown for s in t.scores) if shown else None


def _token_lines(m: Match, fmt: Callable[[float], str], color: bool, width: int) -> list[str]:
    out = []
    if m.tokens is not None:
        text = span_text(m.tokens, color=color, context=width // 3).replace("\n", " ")
        out.append(f"        span {fmt(m.tokens.span_score)} of {fmt(m.tokens.total)}: {text}")
    if m.query_tokens is not None:
        out.append(f"        query tokens: {score_list(m.query_tokens, fmt)}")
    return out


def _legend(reports: Sequence[QueryReport], marked: str) -> str:
    """What ``marked`` (a row marked ``*``; in HTML, highlighted) means in this report."""
    relevant = any(m.relevant for m in _shown(reports))
    return f"{marked} is {RELEVANT_LEGEND}" if relevant else NO_RELEVANT


def format_text(
    reports: Sequence[QueryReport], *, bottom: bool = False, width: int = 100, color: bool = False
) -> str:
    """The console rendering used by ``python -m lightning_bergson attribute``.

    Matches with token scores get a line with their top span marked (``[[...]]``, or bold
    green with ``color``, for a terminal) and one with the query's token scores.
    """
    fmt = score_format(m.score for m in _shown(reports))
    tfmt = _token_fmt(reports)
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
                where = f" (epoch {m.epoch}, step {m.step})" if m.epoch is not None else ""
                lines.append(
                    f"  {flag}{rank:>2}. {fmt(m.score):>11}  [{m.example_id}]{where} {text}"
                )
                lines += _token_lines(m, tfmt, color, width) if tfmt else []
        lines.append("")
    if any(m.relevant for m in _shown(reports)):
        lines.append("* = a known-relevant training document (e.g. it states the queried fact)")
    if tfmt:
        lines.append(TOKENS_LEGEND)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- Markdown


def _md_cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _opt(value: int | None) -> str:
    return "–" if value is None else str(value)


def _md_text(m: Match, tfmt: Callable[[float], str] | None) -> str:
    """The text cell: the text, or with token scores its span in bold and their sums."""
    if m.tokens is None or tfmt is None:
        return _md_cell(m.text)
    cell = span_markdown(m.tokens, lambda t: _md_cell(t, 100_000))
    cell += f" (span {tfmt(m.tokens.span_score)} of {tfmt(m.tokens.total)})"
    if m.query_tokens is not None:
        cell += "; query tokens: " + _md_cell(score_list(m.query_tokens, tfmt), 100_000)
    return cell


def _md_table(
    matches: Sequence[Match], fmt: Callable[[float], str], rows: bool,
    tfmt: Callable[[float], str] | None = None,
) -> list[str]:  # fmt: skip
    head = ["#", "score", "example", *(["epoch", "step"] if rows else []), "text"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, m in enumerate(matches, 1):
        cells = [str(rank), fmt(m.score), f"{m.example_id}{' *' if m.relevant else ''}"]
        cells += [_opt(m.epoch), _opt(m.step)] if rows else []
        out.append("| " + " | ".join([*cells, _md_text(m, tfmt)]) + " |")
    return out


def render_markdown(
    reports: Sequence[QueryReport],
    title: str,
    pngs: Mapping[int, str],
    *,
    header: ScoreHeader | None = None,
    source: str | None = None,
    rows: bool = False,
) -> str:
    """``report.md``: settings, legend, how to read, then a section per query."""
    fmt = score_format(m.score for m in _shown(reports))
    out = [f"# {title}", "", "## Settings", ""]
    out += [
        f"- **{k}**: {_md_cell(v, 1000)}" for k, v in settings_lines(reports, header, source, rows)
    ]
    out += [
        "",
        "## How to read this",
        "",
        how_to_read(rows),
        "",
        f"Legend: {_legend(reports, 'A row marked *')}",
        "",
    ]
    tfmt = _token_fmt(reports)
    out += [f"{TOKENS_LEGEND} The span is in **bold**.", ""] if tfmt else []
    for q, rep in enumerate(reports):
        out += [f"## Query {q}", "", f"> {_md_cell(rep.query, 1000)}", ""]
        out += [f"- {note}" for note in rep.notes] + ([""] if rep.notes else [])
        for name, matches in (("Top (most helpful)", rep.top), ("Bottom", rep.bottom)):
            out += [f"**{name}**", "", *_md_table(matches, fmt, rows, tfmt), ""]
        if q in pngs:
            out += [f"![scores of query {q}]({pngs[q]})", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- HTML

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;width:100%;margin:.5em 0}"
    "td,th{border:1px solid #ddd;padding:.3em .5em;vertical-align:top;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    ".pos{color:#1a7f37}.neg{color:#cf222e}.rel{background:#fff8c5}"
    "table.settings th{width:12em;background:#f6f8fa}"
    ".legend{border:1px solid #ddd;padding:.5em 1em;background:#fcfcfc}"
    "blockquote{background:#f6f8fa;margin:0;padding:.5em 1em}"
    ".tok{border-radius:2px;white-space:pre-wrap}"
    "mark.span{background:none;outline:2px solid #1a7f37;border-radius:2px}"
    ".qtok{margin-top:.3em;font-size:90%;color:#555}"
)


def _html_text(m: Match, tfmt: Callable[[float], str] | None) -> str:
    """The text cell: the text, or its tokens shaded by score with the span outlined."""
    if m.tokens is None or tfmt is None:
        return html.escape(m.text)
    out = f"<div class='tokens'>{shaded_html(m.tokens, tfmt)}</div>"
    sums = f"span {tfmt(m.tokens.span_score)} of {tfmt(m.tokens.total)}"
    if m.query_tokens is not None:
        kept = [i for i, s in enumerate(m.query_tokens.scores) if s]
        q = dataclasses.replace(
            m.query_tokens, pieces=[m.query_tokens.pieces[i] for i in kept],
            scores=[m.query_tokens.scores[i] for i in kept], span=None,
        )  # fmt: skip
        sums += f"; query tokens: {shaded_html(q, tfmt)}"
    return out + f"<div class='qtok'>{sums}</div>"


def _html_table(
    matches: Sequence[Match], fmt: Callable[[float], str], rows: bool, side: str,
    tfmt: Callable[[float], str] | None = None,
) -> str:  # fmt: skip
    head = ["#", "score", "example", *(["epoch", "step"] if rows else []), "text"]
    out = [f"<table class='matches {side}'><thead><tr>"]
    out += [f"<th>{h}</th>" for h in head] + ["</tr></thead><tbody>"]
    for rank, m in enumerate(matches, 1):
        cls = "pos" if m.score >= 0 else "neg"
        rel = " class='rel'" if m.relevant else ""
        star = " *" if m.relevant else ""
        cells = [f"<td class='num'>{rank}</td>", f"<td class='num {cls}'>{fmt(m.score)}</td>",
                 f"<td class='eid'>{m.example_id}{star}</td>"]  # fmt: skip
        cells += [f"<td class='num'>{_opt(v)}</td>" for v in (m.epoch, m.step)] if rows else []
        out.append(f"<tr{rel}>{''.join(cells)}<td>{_html_text(m, tfmt)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(
    reports: Sequence[QueryReport],
    title: str,
    pngs: Mapping[int, bytes],
    *,
    header: ScoreHeader | None = None,
    source: str | None = None,
    rows: bool = False,
) -> str:
    """``report.html``: one self-contained page (histograms embedded as base64 PNGs)."""
    esc = html.escape
    fmt = score_format(m.score for m in _shown(reports))
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"]
    out.append(f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>")
    out.append("<h2>Settings</h2><table class='settings'>")
    out += [
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
        for k, v in settings_lines(reports, header, source, rows)
    ]
    out.append(f"</table><h2>How to read this</h2><p>{esc(how_to_read(rows))}</p>")
    swatch = "A <span class='rel'>&nbsp;highlighted&nbsp;</span> row marked *"
    out.append(
        f"<div class='legend'><p>{_legend(reports, swatch)}</p>"  # fixed text: nothing to escape
        "<p><span class='pos'>green</span> score: helpful (above 0); "
        "<span class='neg'>red</span>: harmful (below 0).</p>"
    )
    tfmt = _token_fmt(reports)
    if tfmt:
        out.append(
            f"<p class='token-legend'>{esc(TOKENS_LEGEND)} Each token is shaded by its score "
            "(<span class='tok' style='background:rgba(26,127,55,.6)'>helps</span>, "
            "<span class='tok' style='background:rgba(207,34,46,.6)'>hurts</span>; darker = "
            "larger share; hover for the score); <mark class='span'>the span</mark> is "
            "outlined.</p>"
        )
    out.append("</div>")
    for q, rep in enumerate(reports):
        out.append(f"<h2>Query {q}</h2><blockquote>{esc(rep.query)}</blockquote>")
        out += [f"<p>{esc(note)}</p>" for note in rep.notes]
        for name, side, matches in (
            ("Top (most helpful)", "top", rep.top),
            ("Bottom", "bottom", rep.bottom),
        ):
            out.append(f"<h3>{name}</h3>{_html_table(matches, fmt, rows, side, tfmt)}")
        if q in pngs:
            data = base64.b64encode(pngs[q]).decode()
            out.append(f"<img alt='scores of query {q}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)
