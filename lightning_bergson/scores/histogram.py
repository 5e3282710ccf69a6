"""Score histograms for reports: log counts, a log or symlog score axis, marked documents.

Most scores sit near zero and the documents that matter are in the tails, so the count
axis is logarithmic (a bin of one document stays visible beside a bin of thousands) and
the score axis is symmetric-log where scores take both signs (log where all are positive),
with the bins uniform on that axis. Vertical lines mark the top-k and the known-relevant
documents, so a reader sees where they fall in the whole distribution.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["bin_edges", "histogram_figure", "histogram_png"]

TOP_COLOR, RELEVANT_COLOR, BAR_COLOR = "#1a7f37", "#d4760a", "#4c72b0"


def _linthresh(finite: np.ndarray) -> float:
    """The linear range of a symlog axis: the 10th percentile of the nonzero magnitudes."""
    mags = np.abs(finite[finite != 0])
    return float(np.quantile(mags, 0.1)) if len(mags) else 1.0


def bin_edges(finite: np.ndarray, bins: int) -> tuple[np.ndarray, str, float]:
    """``(edges [bins + 1], scale, linthresh)``: bins uniform on the axis they are drawn on.

    ``scale`` is ``"log"`` when every score is positive, else ``"symlog"`` (linear within
    ``linthresh`` of zero, logarithmic beyond).

    Example:
        >>> edges, scale, _ = bin_edges(np.array([1.0, 10.0, 100.0]), 2)
        >>> scale, edges.round(6).tolist()
        ('log', [1.0, 10.0, 100.0])
    """
    from matplotlib.scale import SymmetricalLogScale

    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0:
        if hi == lo:
            lo, hi = lo / 1.1, hi * 1.1
        return np.geomspace(lo, hi, bins + 1), "log", 0.0
    t = _linthresh(finite)
    transform = SymmetricalLogScale(None, linthresh=t).get_transform()
    if hi == lo:
        lo, hi = lo - t, hi + t
    ends = transform.transform(np.array([lo, hi]))
    edges = transform.inverted().transform(np.linspace(ends[0], ends[1], bins + 1))
    edges[0], edges[-1] = lo, hi  # exact ends: no score falls outside through rounding
    return edges, "symlog", t


def histogram_png(
    scores: np.ndarray,
    title: str,
    *,
    top: Sequence[float] = (),
    relevant: Sequence[float] = (),
    unit: str = "training examples",
) -> bytes:
    """:func:`histogram_figure` as PNG bytes."""
    fig = histogram_figure(scores, title, top=top, relevant=relevant, unit=unit)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram_figure(
    scores: np.ndarray,
    title: str,
    *,
    top: Sequence[float] = (),
    relevant: Sequence[float] = (),
    unit: str = "training examples",
) -> Figure:
    """A histogram of one query's helpfulness ``scores`` ``[N]`` (a pyplot-free Figure).

    Args:
        scores: Every score of the query (higher = more helpful); non-finite ones skipped.
        title: Plot title (cut at 70 characters).
        top: Scores of the top-k documents (dashed green lines).
        relevant: Scores of the known-relevant documents (orange lines).
        unit: What is counted (``"rows"`` or ``"training examples"``).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    finite = scores[np.isfinite(scores)]
    edges, scale, linthresh = bin_edges(finite, min(50, max(5, len(finite) // 4)))
    fig = Figure(figsize=(6, 2.8), dpi=100)
    ax = fig.add_subplot()
    ax.hist(finite, bins=edges, color=BAR_COLOR)
    if scale == "log":
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.7)  # a bin of one stays visible
    for i, s in enumerate(top):
        ax.axvline(s, color=TOP_COLOR, ls="--", lw=1, label="top-k" if i == 0 else None)
    for i, s in enumerate(relevant):
        ax.axvline(s, color=RELEVANT_COLOR, lw=1.2, label="known relevant" if i == 0 else None)
    if len(top) or len(relevant):
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title[:70], fontsize=9)
    axis = "log" if scale == "log" else f"symlog, linear within ±{linthresh:.2g}"
    ax.set_xlabel(f"score (higher = more helpful; {axis})", fontsize=8)
    ax.set_ylabel(f"{unit} (log)", fontsize=8)
    fig.tight_layout()
    return fig
