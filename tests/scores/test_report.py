"""Reports: the expected examples appear, with text and scores, in Markdown, HTML and PNGs."""

from __future__ import annotations

import base64
import re

import numpy as np
import torch

from lightning_bergson.attribution.report import (
    format_text,
    from_search,
    query_reports,
    write_report,
)
from lightning_bergson.attribution.results import SearchResult

TEXTS = {
    10: "Alice Moreau was born in Lyon.",
    11: "Bruno Tanaka works for <Lumen | Optics>.",
    12: "Chloe Okafor graduated from Carrow College.",
    13: "Lyon is the birthplace of Alice Moreau.",
}
SCORES = np.array([[0.9, -0.5, 0.1, 0.7], [-0.2, 0.3, -0.8, 0.0]])  # (Q=2, N=4)
QUERIES = ["Alice Moreau was born in", "Where does Bruno work?"]


def test_top_and_bottom_per_query():
    reports = query_reports(SCORES, list(TEXTS), TEXTS, QUERIES, k=2, relevant=[{10, 13}, set()])
    assert [m.example_id for m in reports[0].top] == [10, 13]
    assert [m.example_id for m in reports[0].bottom] == [11, 12]
    assert [m.example_id for m in reports[1].top] == [11, 13]
    assert reports[0].top[0].relevant and not reports[1].top[0].relevant
    flipped = query_reports(-SCORES, list(TEXTS), TEXTS, QUERIES, k=1, convention="metagradient")
    assert flipped[0].top[0].example_id == 10 and flipped[0].top[0].score == 0.9
    text = format_text(reports, bottom=True)
    assert "Query 0: Alice Moreau was born in" in text and "*" in text
    assert "+0.9  [10] Alice Moreau was born in Lyon." in text


def test_report_files(tmp_path):
    reports = query_reports(SCORES, list(TEXTS), TEXTS, QUERIES, k=2, relevant=[{10}, set()])
    paths = write_report(reports, tmp_path, title="Demo report")
    md = paths["markdown"].read_text()
    assert "# Demo report" in md and "> Alice Moreau was born in" in md
    assert "| 1 | +0.9 | 10 * | Alice Moreau was born in Lyon. |" in md
    assert "Bruno Tanaka works for <Lumen \\| Optics>." in md  # pipes escaped in tables
    assert "![scores of query 1](scores_q1.png)" in md
    page = paths["html"].read_text()
    assert "Lyon is the birthplace of Alice Moreau." in page
    assert "&lt;Lumen | Optics&gt;" in page and "<Lumen" not in page  # escaped
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2  # self-contained: both histograms embedded
    assert base64.b64decode(images[0]) == paths["png_0"].read_bytes()
    assert paths["png_0"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_from_streamed_search():
    top = SearchResult(torch.tensor([[0.9]]), torch.tensor([[10]]), torch.tensor([[0]]))
    low = SearchResult(torch.tensor([[-0.5]]), torch.tensor([[11]]), torch.tensor([[1]]))
    (rep,) = from_search(top, low, TEXTS, QUERIES[:1], relevant=[{10}])
    assert (rep.top[0].text, rep.top[0].relevant) == (TEXTS[10], True)
    assert rep.bottom[0].example_id == 11 and rep.scores is None
