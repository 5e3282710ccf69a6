"""Reports: the expected examples appear, with text, scores, epochs and settings, in Markdown,
HTML and PNGs; histograms on log axes mark the top-k and the known-relevant documents."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch
from matplotlib.scale import SymmetricalLogScale

from lightning_bergson.attribution.results import SearchResult
from lightning_bergson.scores import ScoreHeader, ScoreSettings
from lightning_bergson.scores.histogram import bin_edges, histogram_figure
from lightning_bergson.scores.render import score_format
from lightning_bergson.scores.report import format_text, from_search, query_reports, write_report

TEXTS = {
    10: "Alice Moreau was born in Lyon.",
    11: "Bruno Tanaka works for <Lumen | Optics>.",
    12: "Chloe Okafor graduated from Carrow College.",
    13: "Lyon is the birthplace of Alice Moreau.",
}
SCORES = np.array([[0.9, -0.5, 0.1, 0.7], [-0.2, 0.3, -0.8, 0.0]])  # (Q=2, N=4)
QUERIES = ["Alice Moreau was born in", "Where does Bruno work?"]
ROWS_HEADER = ScoreHeader(
    "gradient_cosine",
    "influence",
    ScoreSettings(store="runs/g.zarr", preconditioner="TrackStar (damping 0.1)", columns="rows"),
)


def _table(text: str, heading: str) -> list[list[str]]:
    """Cells of the Markdown table after ``heading`` (header row excluded)."""
    section = text.split(heading, 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]


def test_top_and_bottom_per_query():
    reports = query_reports(SCORES, list(TEXTS), TEXTS, QUERIES, k=2, relevant=[{10, 13}, set()])
    assert [m.example_id for m in reports[0].top] == [10, 13]
    assert [m.example_id for m in reports[0].bottom] == [11, 12]
    assert [m.example_id for m in reports[1].top] == [11, 13]
    assert reports[0].top[0].relevant and not reports[1].top[0].relevant
    assert sorted(reports[0].relevant_scores) == [0.7, 0.9]  # every column of 10 and 13
    flipped = query_reports(-SCORES, list(TEXTS), TEXTS, QUERIES, k=1, convention="metagradient")
    assert flipped[0].top[0].example_id == 10 and flipped[0].top[0].score == 0.9
    text = format_text(reports, bottom=True)
    assert "Query 0: Alice Moreau was born in" in text and "* = a known-relevant" in text
    assert "+0.9000  [10] Alice Moreau was born in Lyon." in text


def test_one_number_format_per_report():
    fmt = score_format([0.9, -0.5, 1e-7])
    assert [fmt(x) for x in (0.9, -0.5, 1e-7)] == ["+0.9000", "-0.5000", "+0.0000"]
    assert score_format([1234.5])(-3.0) == "-3"  # 4 significant digits of the largest
    big = score_format([2e6, 3.0])
    assert [big(2e6), big(3.0)] == ["+2.000e+06", "+3.000e+00"]
    tiny = score_format([4e-5, -1e-6])
    assert [tiny(4e-5), tiny(-1e-6)] == ["+4.000e-05", "-1.000e-06"]


def test_report_files(tmp_path):
    reports = query_reports(SCORES, list(TEXTS), TEXTS, QUERIES, k=2, relevant=[{10}, set()])
    paths = write_report(reports, tmp_path, title="Demo report")
    md = paths["markdown"].read_text()
    assert "# Demo report" in md and "> Alice Moreau was born in" in md
    assert "| 1 | +0.9000 | 10 * | Alice Moreau was born in Lyon. |" in md
    assert "Bruno Tanaka works for <Lumen \\| Optics>." in md  # pipes escaped in tables
    assert "![scores of query 1](scores_q1.png)" in md
    assert "- **method**: not recorded" in md and "- **scored**: 4 training examples" in md
    assert "Legend: A row marked * is a known-relevant document" in md
    page = paths["html"].read_text()
    assert "Lyon is the birthplace of Alice Moreau." in page
    assert "&lt;Lumen | Optics&gt;" in page and "<Lumen" not in page  # escaped
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2  # self-contained: both histograms embedded
    assert base64.b64decode(images[0]) == paths["png_0"].read_bytes()
    assert paths["png_0"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_report_has_settings_epochs_steps_and_row_counts(tmp_path):
    ids, epochs, steps = [10, 11, 10, 12], [0, 0, 1, 1], [3, 3, 7, 7]  # example 10: two rows
    scores = np.array([[0.9, -0.5, 0.7, 0.1]])
    reports = query_reports(scores, ids, TEXTS, QUERIES[:1], k=2, epochs=epochs, steps=steps)
    paths = write_report(reports, tmp_path, header=ROWS_HEADER, source="s.zarr")
    md = paths["markdown"].read_text()
    assert _table(md, "**Top (most helpful)**") == [
        ["1", "+0.9000", "10", "0", "3", TEXTS[10]],
        ["2", "+0.7000", "10", "1", "7", TEXTS[10]],  # the same example, a later epoch
    ]
    settings = md.split("## Settings", 1)[1].split("##", 1)[0]
    for line in (
        "- **scores**: s.zarr",
        "- **store**: runs/g.zarr",
        "- **method**: gradient_cosine",
        "- **sign convention**: influence: positive = training on the example lowers",
        "- **preconditioner**: TrackStar (damping 0.1)",
        "- **reduction**: rows: one score per stored row",
        "- **scored**: 4 rows of 3 training examples, per query",
    ):
        assert line in settings, line
    assert "No known-relevant documents were given" in md
    assert "appears once per epoch" in md.split("## How to read this", 1)[1]
    page = paths["html"].read_text()
    assert "<th>epoch</th><th>step</th>" in page and "4 rows of 3 training examples" in page


def test_examples_report_says_examples_and_reduction(tmp_path):
    header = ScoreHeader(
        "gradient_cosine", "influence", ScoreSettings(columns="examples", example_reduce="mean")
    )
    reports = query_reports(SCORES, list(TEXTS), TEXTS, QUERIES, k=1)
    md = write_report(reports, tmp_path, header=header)["markdown"].read_text()
    assert "- **reduction**: examples: the mean of each example's rows" in md
    assert "- **scored**: 4 training examples, per query" in md
    assert "| # | score | example | text |" in md and "epoch" not in md.split("## Query 0")[1]


def test_metagradient_settings_say_the_sign_is_flipped(tmp_path):
    header = ScoreHeader("magic", "metagradient")
    reports = query_reports(-SCORES, list(TEXTS), TEXTS, QUERIES, k=1, convention="metagradient")
    md = write_report(reports, tmp_path, header=header, histograms=False)["markdown"].read_text()
    assert "- **sign convention**: metagradient: d L_query / d w_i" in md
    assert "flip the sign" in md and not list(tmp_path.glob("*.png"))


def test_report_from_streamed_search():
    top = SearchResult(torch.tensor([[0.9]]), torch.tensor([[10]]), torch.tensor([[2]]))
    low = SearchResult(torch.tensor([[-0.5]]), torch.tensor([[11]]), torch.tensor([[1]]))
    ids, epochs = np.array([10, 11, 10]), np.array([0, 0, 1])
    (rep,) = from_search(top, low, TEXTS, QUERIES[:1], relevant=[{10}], epochs=epochs,
                         steps=epochs * 5, example_ids=ids)  # fmt: skip
    assert (rep.top[0].text, rep.top[0].relevant) == (TEXTS[10], True)
    assert (rep.top[0].epoch, rep.top[0].step) == (1, 5)  # store row 2
    assert rep.bottom[0].example_id == 11 and rep.scores is None
    assert (rep.num_scores, rep.num_examples) == (3, 2)


@pytest.mark.parametrize("signed", [True, False])
def test_histogram_bins_are_uniform_on_a_log_or_symlog_axis(signed):
    rng = np.random.default_rng(0)
    scores = rng.standard_cauchy(500) if signed else np.exp(rng.normal(size=500) * 3)
    edges, scale, t = bin_edges(scores, 20)
    assert scale == ("symlog" if signed else "log")
    coords = (
        SymmetricalLogScale(None, linthresh=t).get_transform().transform(edges)
        if signed
        else np.log(edges)
    )
    np.testing.assert_allclose(np.diff(coords), np.diff(coords)[0], rtol=1e-6)
    assert np.histogram(scores, edges)[0].sum() == len(scores)  # every score in a bin


def test_histogram_marks_the_top_k_and_the_relevant_documents():
    scores = np.array([-3.0, -0.01, 0.0, 0.02, 0.5, 4.0, 40.0])
    fig = histogram_figure(scores, "q", top=[40.0, 4.0], relevant=[0.5], unit="rows")
    (ax,) = fig.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("symlog", "log")
    lines = {(ln.get_color(), ln.get_xdata()[0]) for ln in ax.get_lines()}
    assert {("#1a7f37", 40.0), ("#1a7f37", 4.0), ("#d4760a", 0.5)} <= lines
    assert sum(p.get_height() for p in ax.patches) == len(scores)
    assert ax.get_ylabel() == "rows (log)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["top-k", "known relevant"]
