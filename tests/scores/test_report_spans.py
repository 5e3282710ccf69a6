"""Token spans in the console text and Markdown reports; ``best_span`` against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_bergson.scores.render import format_text, render_markdown
from lightning_bergson.scores.report import query_reports
from lightning_bergson.scores.spans import TokenScores, best_span


@pytest.mark.parametrize("seed", range(5))
def test_best_span_is_the_window_with_the_largest_sum(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=int(rng.integers(1, 30))).tolist()
    width = int(rng.integers(1, 10))
    w = min(width, len(scores))
    sums = [sum(scores[i : i + w]) for i in range(len(scores) - w + 1)]  # every window
    start = int(np.argmax(sums))
    assert best_span(scores, width) == (start, start + w)
    with pytest.raises(ValueError, match="span width"):
        best_span(scores, 0)


def _reports():
    reports = query_reports(np.array([[2.0, -1.0]]), [0, 1], ["doc a", "doc b"], ["q?"], k=1)
    pieces = ["The", " cat", " sat", " on", " the", " mat", "."]
    scores = [0.0, 0.01, 0.5, 0.7, -0.02, 0.03, 0.0]
    reports[0].top[0].tokens = TokenScores.make(pieces, scores, width=2)
    reports[0].top[0].query_tokens = TokenScores(["Q", " Lyon"], [0.0, 1.25])
    return reports


def test_console_and_markdown_mark_the_span_and_the_query_tokens():
    text = format_text(_reports())
    assert "span +1.200 of +1.220: The cat[[ sat on]] the mat." in text  # 0.5 + 0.7 of the sum
    assert "query tokens: ' Lyon' +1.250" in text and "'Q'" not in text
    assert "\x1b[" not in text and "Token scores:" in text
    colored = format_text(_reports(), color=True)
    assert "The cat \x1b[1;32msat on" not in colored and "\x1b[1;32m sat on\x1b[0m" in colored
    md = render_markdown(_reports(), "t", {})
    assert "The cat **sat on** the mat." in md and "query tokens: ' Lyon' +1.250" in md
