"""The ``attribute``, ``score``, ``report`` and ``index`` commands of ``lightning_bergson``.

Each command is a typed function parsed by jsonargparse (``--help``, ``--print_config``,
``--config``); lists are given as JSON (``--fact "[0, 1, 2]"``)::

    python -m lightning_bergson attribute --store runs/quickstart/grads.zarr \\
        --model runs/quickstart --query "Alice Moreau was born in" --top_k 5
    python -m lightning_bergson score --store ... --model ... --fact all --out scores.zarr
    python -m lightning_bergson report --scores scores.zarr --out report/
    python -m lightning_bergson index --model <dir or name> --dataset <texts>   # Bergson build

The model is a Lightning checkpoint (or a directory holding one: the newest is used), whose
saved data module gives the tokenizer, the training texts and, for the embedded biography
corpus, the facts; or a Hugging Face model (then pass ``--tokenizer`` and ``--texts``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI
from torch import Tensor

from ..scores import ScoreArray
from .attributor import Attributor
from .loading import load_model, load_text_data
from .queries import query_batch
from .report import format_text, from_search, query_reports, write_report
from .score_writer import write_score_array

__all__ = ["attribute", "index_main", "report", "score"]

FULL_SCORES_LIMIT = 20_000_000  # Q * N at most this many scores are kept for histograms


@dataclass
class _Context:
    """What a command needs besides the store: the model, tokenizer, texts and queries."""

    module: torch.nn.Module
    tokenizer: Any
    texts: list[str] | None
    max_length: int
    data: dict[str, Any] | None
    queries: list[str] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    relevant: list[set[int]] = field(default_factory=list)


def _listify(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _read_texts(path: str) -> list[str] | dict[int, str]:
    """Texts by example id: a JSON list (index = id), a JSON object {id: text}, or lines."""
    p = Path(path)
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return {int(k): str(v) for k, v in data.items()}
        return [str(t) for t in data]
    return p.read_text(encoding="utf-8").splitlines()


def _context(
    model: str,
    tokenizer: str | None,
    texts: str | None,
    query: str | list[str] | None,
    answer: str | list[str] | None,
    fact: int | list[int] | Literal["all"] | None,
) -> _Context:
    module, data_hp = load_model(model)
    dm = load_text_data(data_hp)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    elif dm is not None:
        tok = dm.tokenizer
    else:
        raise ValueError(f"--model {model} records no data module: pass --tokenizer <name or dir>")
    train_texts = _read_texts(texts) if texts else (dm.texts if dm is not None else None)
    max_length = dm.max_length if dm is not None else 1024
    ctx = _Context(module, tok, train_texts, max_length, data_hp)
    queries, answers = _listify(query), _listify(answer)
    if answers and len(answers) != len(queries):
        raise ValueError(f"got {len(queries)} --query but {len(answers)} --answer values")
    ctx.queries, ctx.answers = queries, answers or [None] * len(queries)
    ctx.relevant = [set() for _ in queries]
    facts = _listify(fact)
    if facts:
        corpus = dm.corpus if dm is not None else None
        if corpus is None:
            raise ValueError("--fact needs a model trained on the embedded corpus (dataset 'bios')")
        ids = range(len(corpus.facts)) if facts == ["all"] else [int(f) for f in facts]
        for i in ids:
            f = corpus.facts[i]
            ctx.queries.append(f.query)
            ctx.answers.append(f.answer)
            ctx.relevant.append(set(f.doc_ids))
    if not ctx.queries:
        raise ValueError("nothing to attribute: pass --query <text> and/or --fact <id>")
    return ctx


def _query_rows(attr: Attributor, ctx: _Context) -> Tensor:
    """Query rows ``[Q, D]``; with an answer only its tokens are scored (TrackStar)."""
    rows = []
    for text, ans in zip(ctx.queries, ctx.answers, strict=True):
        answers = [ans] if ans else None
        batch = query_batch(ctx.tokenizer, [text], answers=answers, max_length=ctx.max_length)
        rows.append(attr.query_gradients(ctx.module, batch))
    return torch.cat(rows)  # (Q, D)


def _attributor(
    store: str,
    device: str,
    unit_norm: bool,
    preconditioner: str,
    damping: float,
    example_reduce: str,
) -> Attributor:
    """The Attributor both commands build; ``preconditioner="none"`` turns it off."""
    return Attributor(
        store,
        device=device,
        unit_norm=unit_norm,
        preconditioner=None if preconditioner == "none" else preconditioner,
        damping=damping,
        example_reduce=example_reduce,  # type: ignore[arg-type]
    )


def _labels(ctx: _Context) -> list[str]:
    pairs = zip(ctx.queries, ctx.answers, strict=True)
    return [f"{q} [answer: {a.strip()}]" if a else q for q, a in pairs]


def attribute(
    store: str,
    model: str,
    query: str | list[str] | None = None,
    answer: str | list[str] | None = None,
    fact: int | list[int] | None = None,
    top_k: int = 5,
    bottom: bool = False,
    unit_norm: bool = True,
    preconditioner: Literal["fit", "none"] | str = "fit",
    damping: float = 0.1,
    example_reduce: Literal["none", "sum", "mean", "max"] = "mean",
    report: str | None = None,
    tokenizer: str | None = None,
    texts: str | None = None,
    device: str = "cpu",
) -> None:
    """Print the training texts whose gradients best match each query's (and optionally worst).

    Args:
        store: Gradient store (``*.zarr``) captured while training ``model``.
        model: Lightning checkpoint, a directory holding one, or a Hugging Face model.
        query: Query text(s); JSON list for several.
        answer: Answer(s) continuing each ``query``; only their tokens are scored.
        fact: Fact id(s) of the embedded biography corpus (query + answer; the documents
            stating the fact are marked with ``*``).
        top_k: Training examples shown per query and side.
        bottom: Also show the lowest-scoring (most harmful) examples.
        unit_norm: Cosine similarity (True) or inner product.
        preconditioner: ``fit`` (TrackStar: fit on the stored rows, or load the one saved in
            ``<store>/preconditioners``), a preconditioner file, or ``none``.
        damping: Preconditioner damping ``c`` (``1 / (lambda + c * mean lambda)``).
        example_reduce: Reduce an example's rows (one per epoch) to one score.
        report: Directory to write ``report.md``, ``report.html`` and score histograms.
        tokenizer: Tokenizer name or directory (default: the checkpoint's data module).
        texts: Training texts file (JSON list or one per line; default: the data module's).
        device: Scoring device.
    """
    ctx = _context(model, tokenizer, texts, query, answer, fact)
    attr = _attributor(store, device, unit_norm, preconditioner, damping, example_reduce)
    q = _query_rows(attr, ctx)
    shown = ctx.texts if ctx.texts is not None else {}
    labels = _labels(ctx)
    if len(q) * len(attr.store) <= FULL_SCORES_LIMIT:
        scores, ids = attr.scores(q)
        reports = query_reports(scores.numpy(), ids, shown, labels, k=top_k, relevant=ctx.relevant)
    else:  # too many to keep: one streaming pass for both ends, no histograms
        top, low = attr.extremes(q, k=top_k)
        reports = from_search(top, low, shown, labels, relevant=ctx.relevant)
    kind = "cosine" if unit_norm else "inner product"
    kind += ", preconditioned" if attr.preconditioner is not None else ""
    print(f"Scores: {kind} of query gradients with the {len(attr.store)} rows of {store}\n")
    print(format_text(reports, bottom=bottom))
    if report:
        paths = write_report(reports, report, title=f"Attribution ({kind}) over {store}")
        print(f"report: {paths['html']} and {paths['markdown']}")


def score(
    store: str,
    model: str,
    out: str,
    query: str | list[str] | None = None,
    answer: str | list[str] | None = None,
    fact: int | list[int] | Literal["all"] | None = None,
    query_reduce: Literal["none", "mean", "max"] = "none",
    unit_norm: bool = True,
    preconditioner: Literal["fit", "none"] | str = "fit",
    damping: float = 0.1,
    example_reduce: Literal["none", "sum", "mean", "max"] = "none",
    modules: list[str] | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> None:
    """Score queries against every stored row into a Zarr score array (``ScoreArray``).

    Args:
        store: Gradient store (``*.zarr``).
        model: Lightning checkpoint, a directory holding one, or a Hugging Face model.
        out: Output score array (``*.zarr``).
        query: Query text(s); JSON list for several.
        answer: Answer(s) continuing each ``query``; only their tokens are scored.
        fact: Fact id(s) of the embedded biography corpus, or ``all``.
        query_reduce: ``mean``/``max`` over queries gives one score per training example
            (LESS-style data selection); ``none`` keeps ``[Q, N]``.
        unit_norm: Cosine similarity (True) or inner product.
        preconditioner: ``fit``, a preconditioner file, or ``none``.
        damping: Preconditioner damping ``c``.
        example_reduce: Reduce an example's rows (one per epoch) to one score.
        modules: Score only these module blocks (names, parents or globs).
        tokenizer: Tokenizer name or directory (default: the checkpoint's data module).
        overwrite: Replace an existing ``out``.
        device: Scoring device.
    """
    ctx = _context(model, tokenizer, None, query, answer, fact)
    attr = _attributor(store, device, unit_norm, preconditioner, damping, example_reduce)
    meta = {
        "queries": _labels(ctx),
        "relevant": [sorted(r) for r in ctx.relevant],
        "model": str(model),
        "data": ctx.data,
    }
    q = _query_rows(attr, ctx)
    path = write_score_array(
        attr, q, out, query_reduce=query_reduce, modules=modules, metadata=meta, overwrite=overwrite
    )
    print(f"scores [{len(q) if query_reduce == 'none' else 1}, ...] written to {path}")


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
        title: Report title (default: the method and path).
    """
    arr = ScoreArray.open(scores)
    if arr.scores.ndim != 2:
        raise ValueError(f"{scores} holds per-token scores {arr.scores.shape}; report needs [Q, N]")
    shown: Sequence[str] | dict[int, str] = {}
    if texts:
        shown = _read_texts(texts)
    elif (dm := load_text_data(arr.metadata.get("data"))) is not None:
        shown = dm.texts
    labels = arr.metadata.get("queries") or [f"query {int(i)}" for i in arr.query_ids]
    if len(labels) != arr.scores.shape[0]:
        labels = [f"{arr.metadata.get('query_reduce', 'reduced')} over queries"]
    rel = arr.metadata.get("relevant")
    relevant = [set(r) for r in rel] if rel and len(rel) == len(labels) else None
    reports = query_reports(
        arr.scores, arr.example_ids, shown, labels, k=top_k, convention=arr.convention,
        relevant=relevant,
    )  # fmt: skip
    paths = write_report(reports, out, title=title or f"{arr.method} scores: {scores}")
    print(f"report: {paths['html']} and {paths['markdown']}")


def attribute_main(argv: list[str]) -> None:
    """``python -m lightning_bergson attribute ...``"""
    CLI(attribute, args=argv, as_positional=False)


def score_main(argv: list[str]) -> None:
    """``python -m lightning_bergson score ...``"""
    CLI(score, args=argv, as_positional=False)


def report_main(argv: list[str]) -> None:
    """``python -m lightning_bergson report ...``"""
    CLI(report, args=argv, as_positional=False)


def index_main(argv: list[str]) -> None:
    """``python -m lightning_bergson index``: ``fit`` with IndexModule and Bergson's flags.

    See :mod:`lightning_bergson.attribution.index_command`.
    """
    from .index_command import index_main as run

    run(argv)
