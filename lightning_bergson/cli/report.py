"""The ``report`` command: Markdown + self-contained HTML of any score array.

Light on purpose: it reads a score array and writes a report without importing Lightning
or transformers, unless the training texts have to be rebuilt from a recorded data module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import CLI

__all__ = ["read_texts", "report", "report_main"]

PROG = "python -m lightning_bergson report"


def read_texts(path: str) -> list[str] | dict[int, str]:
    """Texts by example id: a JSON list (index = id), a JSON object {id: text}, or lines."""
    p = Path(path)
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return {int(k): str(v) for k, v in data.items()}
        return [str(t) for t in data]
    return p.read_text(encoding="utf-8").splitlines()


def report(
    scores: str,
    out: str,
    top_k: int = 5,
    texts: str | None = None,
    title: str | None = None,
) -> None:
    """Markdown + self-contained HTML report (and histograms) of any score array.

    Args:
        scores: A score array (``*.zarr``) of any method (gradients, EK-FAC, MAGIC).
        out: Output directory.
        top_k: Examples per side and query.
        texts: Training texts file (JSON list or one per line); default: rebuilt from the
            data module recorded in the score array's metadata.
        title: Report title (default: the method; the path is in the settings header).
    """
    from ..scores import ScoreArray
    from ..scores.report import query_reports, write_report

    arr = ScoreArray.open(scores)
    if arr.scores.ndim != 2:
        raise ValueError(f"{scores} holds per-token scores {arr.scores.shape}; report needs [Q, N]")
    labels = arr.metadata.get("queries") or [f"query {int(i)}" for i in arr.query_ids]
    if len(labels) != arr.scores.shape[0]:
        labels = [f"{arr.header.settings.query_reduce} over queries"]
    rel = arr.metadata.get("relevant")
    relevant = [set(r) for r in rel] if rel and len(rel) == len(labels) else None
    reports = query_reports(
        arr.scores, arr.example_ids, _texts(arr.metadata, texts), labels, k=top_k,
        convention=arr.convention, relevant=relevant, epochs=arr.epochs, steps=arr.steps,
    )  # fmt: skip
    paths = write_report(
        reports, out, title=title or f"{arr.method} scores", header=arr.header, source=scores
    )
    print(f"report: {paths['html']} and {paths['markdown']}")


def _texts(metadata: dict, texts: str | None) -> Sequence[str] | dict[int, str]:
    """The training texts: ``texts`` if given, else rebuilt from the recorded data module."""
    if texts:
        return read_texts(texts)
    if metadata.get("data"):
        from ..attribution.loading import load_text_data

        if (dm := load_text_data(metadata["data"])) is not None:
            return dm.texts
    return {}


def report_main(argv: list[str]) -> None:
    """``python -m lightning_bergson report ...``"""
    CLI(report, args=argv, as_positional=False, prog=PROG, exit_on_error=False)
