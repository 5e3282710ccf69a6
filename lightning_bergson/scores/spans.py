"""Per-token scores in reports: a document's tokens with their scores and its top span.

:class:`TokenScores` holds a text split into its tokens (as the tokenizer decodes them one
by one), one score per token (the score of the loss of predicting that token, from
:meth:`~lightning_bergson.attribution.Attributor.token_scores`; 0 for a token no loss is
taken on) and the most influential span: the ``width`` consecutive tokens with the largest
summed score. The renderers mark the span in console text (``[[...]]``, or bold green on a
terminal) and in Markdown (bold), and shade every token by its score in HTML.

Example:
    >>> ts = TokenScores.make(["A", " cat", " sat", "."], [0.0, 0.5, 2.0, -0.1], width=2)
    >>> ts.span, span_text(ts)
    ((1, 3), 'A[[ cat sat]].')
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "TokenScores",
    "best_span",
    "score_list",
    "shaded_html",
    "span_markdown",
    "span_text",
]

ANSI_SPAN, ANSI_END = "\x1b[1;32m", "\x1b[0m"


def best_span(scores: Sequence[float], width: int) -> tuple[int, int]:
    """``(start, end)`` of the ``width`` consecutive scores with the largest sum (first wins).

    Example:
        >>> best_span([0, 1, -1, 3, 0], 2)
        (3, 5)
    """
    if width < 1:
        raise ValueError(f"span width must be >= 1 token, got {width}")
    if not scores:
        return (0, 0)
    width = min(width, len(scores))
    total = sum(scores[:width])
    best, start = total, 0
    for i in range(width, len(scores)):
        total += scores[i] - scores[i - width]
        if total > best:
            best, start = total, i - width + 1
    return (start, start + width)


@dataclass
class TokenScores:
    """A text's tokens, their scores, and the span to highlight (``[start, end)`` tokens)."""

    pieces: list[str]
    scores: list[float]
    span: tuple[int, int] | None = None
    note: str = ""  # what the scores are (shown with them)

    @classmethod
    def make(cls, pieces: Sequence[str], scores: Sequence[float], *, width: int = 8,
             note: str = "") -> TokenScores:  # fmt: skip
        """Tokens and scores, with their best ``width``-token span (:func:`best_span`)."""
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} tokens but {len(scores)} token scores")
        scores = [float(s) for s in scores]
        return cls(list(pieces), scores, best_span(scores, width) if scores else None, note)

    @property
    def total(self) -> float:
        """The sum of the token scores."""
        return sum(self.scores)

    @property
    def span_score(self) -> float:
        """The sum of the span's token scores."""
        return sum(self.scores[slice(*self.span)]) if self.span else 0.0


def _parts(ts: TokenScores) -> tuple[str, str, str]:
    start, end = ts.span or (0, 0)
    return "".join(ts.pieces[:start]), "".join(ts.pieces[start:end]), "".join(ts.pieces[end:])


def span_text(ts: TokenScores, *, color: bool = False, context: int | None = None) -> str:
    """The text with its span in ``[[...]]`` (``color``: bold green ANSI instead), with at
    most ``context`` characters either side of the span (``...`` marks a cut)."""
    before, span, after = _parts(ts)
    if context is not None:
        before = before if len(before) <= context else "..." + before[len(before) - context :]
        after = after if len(after) <= context else after[:context] + "..."
    if not span:
        return before + after
    mark = (ANSI_SPAN, ANSI_END) if color else ("[[", "]]")
    return f"{before}{mark[0]}{span}{mark[1]}{after}"


def span_markdown(ts: TokenScores, escape: Callable[[str], str]) -> str:
    """The text with its span in bold, each part escaped by ``escape`` (a table cell's)."""
    before, span, after = (escape(p) for p in _parts(ts))
    if not span.strip():
        return before + span + after
    lead, trail = span[: len(span) - len(span.lstrip())], span[len(span.rstrip()) :]
    return f"{before}{lead}**{span.strip()}**{trail}{after}"


def _shade(score: float, scale: float) -> str:
    alpha = min(1.0, abs(score) / scale) * 0.6 if scale > 0 else 0.0
    rgb = "26,127,55" if score >= 0 else "207,34,46"  # the report's green and red
    return f"rgba({rgb},{alpha:.3f})"


def shaded_html(ts: TokenScores, fmt: Callable[[float], str]) -> str:
    """Every token in a ``<span class='tok'>`` shaded by its score (green helps, red hurts,
    darker = larger share), its score as a tooltip; the top span inside ``<mark>``."""
    scale = max((abs(s) for s in ts.scores), default=0.0)
    start, end = ts.span or (-1, -1)
    out = []
    for i, (piece, score) in enumerate(zip(ts.pieces, ts.scores, strict=True)):
        if i == start:
            out.append("<mark class='span'>")
        out.append(
            f"<span class='tok' style='background:{_shade(score, scale)}' "
            f"title='{fmt(score)}'>{html.escape(piece)}</span>"
        )
        if i == end - 1:
            out.append("</mark>")
    return "".join(out)


def score_list(ts: TokenScores, fmt: Callable[[float], str], *, skip_zero: bool = True) -> str:
    """``'piece' +0.12, ...`` of the tokens (those scored when ``skip_zero``)."""
    pairs = [(p, s) for p, s in zip(ts.pieces, ts.scores, strict=True) if s or not skip_zero]
    return ", ".join(f"{p!r} {fmt(s)}" for p, s in pairs)
