"""The HTML report as a real browser shows it: headless Chromium renders it to a PNG and a DOM.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``; ``.ci/run`` installs it);
without one the test is skipped and says so.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from lightning_bergson.scores import ScoreHeader, ScoreSettings
from lightning_bergson.scores.histogram import BAR_COLOR
from lightning_bergson.scores.report import query_reports, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no Chromium binary ({', '.join(BROWSERS)}) on PATH; "
    "install one with `apt-get install -y chromium`",
)  # fmt: skip
HIGHLIGHT = (0xFF, 0xF8, 0xC5)  # the .rel background of a known-relevant row


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class _Tables(HTMLParser):
    """Example-id cells of each ``table.matches`` and the settings labels, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[str]]] = []
        self.settings: list[str] = []
        self._table, self._cell = "", ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        if tag == "table":
            self._table = cls
            if "matches" in cls:
                self.tables.append((cls, []))
        elif (tag, cls) == ("td", "eid") or (tag == "th" and self._table == "settings"):
            self._cell = tag

    def handle_data(self, data: str) -> None:
        if self._cell == "td":
            self.tables[-1][1].append(data.strip())
        elif self._cell == "th":
            self.settings.append(data.strip())
        self._cell = ""


def _report(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    rng = np.random.default_rng(0)
    ids = np.arange(100, 160)  # (N,)
    scores = rng.standard_cauchy((1, 60)) * 0.01  # (Q, N), signed with long tails
    texts = {int(i): f"Training document {i} about person {i % 7}." for i in ids}
    reports = query_reports(scores, ids, texts, ["Who was born in Lyon?"], k=4,
                            relevant=[{int(ids[np.argmax(scores[0])])}])  # fmt: skip
    header = ScoreHeader("gradient_cosine", "influence", ScoreSettings(store="grads.zarr"))
    paths = write_report(reports, tmp_path / "report", header=header, source="scores.zarr")
    order = np.argsort(-scores[0], kind="stable")  # the oracle: best first, worst last
    top = [str(i) for i in ids[order[:4]]]
    bottom = [str(i) for i in ids[order[::-1][:4]]]
    top[0] += " *"  # the known-relevant document is the best one
    return paths["html"], top, bottom


def test_headless_chromium_renders_the_report_with_its_tables(tmp_path):
    page, top, bottom = _report(tmp_path)
    png = tmp_path / "page.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1000,1600", page.as_uri())
    pixels = (imread(png)[..., :3] * 255).round().astype(int)  # (H, W, 3)
    assert pixels.shape[:2] == (1600, 1000) and pixels.std() > 20  # not a blank page
    colors = {tuple(c) for c in pixels.reshape(-1, 3)[::3]}
    assert HIGHLIGHT in colors  # the relevant row is highlighted as rendered
    bar = tuple(int(BAR_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert bar in colors  # the embedded histogram PNG was decoded and drawn
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    tables = _Tables()
    tables.feed(dom)
    assert tables.tables == [("matches top", top), ("matches bottom", bottom)]
    assert tables.settings[:4] == ["scores", "store", "method", "sign convention"]


class _Spans(HTMLParser):
    """The text inside ``mark.span`` and each token's ``title`` (its score), in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[str] = []
        self.titles: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "mark" and a.get("class") == "span":
            self.spans.append("")
            self._depth = 1
        if tag == "span" and a.get("class") == "tok" and a.get("title"):
            self.titles.append(str(a["title"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "mark":
            self._depth = 0

    def handle_data(self, data: str) -> None:
        if self._depth:
            self.spans[-1] += data


def test_headless_chromium_renders_token_spans_shaded(tmp_path):
    """A document whose tokens 4-7 carry the largest scores: the outlined span is those
    tokens, the strongest token is drawn in the full green shade, a harmful one in red."""
    from lightning_bergson.scores.spans import TokenScores

    ids = np.arange(3)
    reports = query_reports(np.array([[3.0, 1.0, -1.0]]), ids, {i: f"doc {i}" for i in ids},
                            ["Who was born in Lyon?"], k=1)  # fmt: skip
    pieces = [f" word{i}" for i in range(12)]
    scores = [0.1, -0.2, 0.0, 0.1, 0.9, 1.0, 0.8, 0.7, -1.0, 0.1, 0.0, 0.2]
    reports[0].top[0].tokens = TokenScores.make(pieces, scores, width=4)
    reports[0].top[0].query_tokens = TokenScores([" Lyon", "."], [0.5, 0.0])
    page = write_report(reports, tmp_path / "report", histograms=False)["html"]
    png = tmp_path / "page.png"
    _chromium(tmp_path, f"--screenshot={png}", "--window-size=1000,1600", page.as_uri())
    pixels = (imread(png)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    # a token's shade: alpha 0.6 |score| / max |score| over white (the legend's swatches are
    # drawn at 0.6, so check the shades of the 0.9 and -0.2 tokens, which only tokens have)
    for rgb, share in (((26, 127, 55), 0.9), ((207, 34, 46), 0.2)):
        alpha = 0.6 * share
        want = np.array([255 * (1 - alpha) + alpha * c for c in rgb])
        assert (np.abs(pixels - want).max(1) <= 2).sum() > 50, (rgb, share)
    dom = _Spans()
    dom.feed(_chromium(tmp_path, "--dump-dom", page.as_uri()).stdout)
    assert dom.spans == ["the span", "".join(pieces[4:8])]  # the legend's, then the page's
    assert dom.titles[:12] == [f"{s:+.3f}" for s in scores]  # 4 digits of the largest
