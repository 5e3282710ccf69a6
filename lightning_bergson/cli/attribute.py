"""The ``attribute`` and ``score`` commands: query a gradient store from the command line.

Both take the same query options (:class:`QueryOptions`) and scoring options
(:class:`ScoringOptions`), defined once here with the same defaults; lists are given as
JSON (``--fact "[0, 1, 2]"``)::

    python -m lightning_bergson attribute --store runs/quickstart/grads.zarr \\
        --model runs/quickstart --query "Alice Moreau was born in" --top_k 5
    python -m lightning_bergson score --store ... --model ... --fact all --out scores.zarr

The model is a Lightning checkpoint (or a directory holding one: the newest is used), whose
saved data module gives the tokenizer, the training texts and, for the embedded biography
corpus, the facts; or a Hugging Face model (then pass ``--tokenizer`` and ``--texts``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor

from ..attribution.attributor import Attributor
from ..attribution.queries import query_batch
from ..attribution.score_writer import score_header, write_score_array
from ..data import load_text_data
from ..networks import load_model
from ..scores.report import format_text, from_search, query_reports, write_report
from .report import read_texts
from .tokens import add_token_scores

__all__ = ["QueryOptions", "ScoringOptions", "attribute", "attribute_main", "score", "score_main"]

PROG = "python -m lightning_bergson"
Fact = int | list[int] | Literal["all"] | None


@dataclass
class QueryOptions:
    """What to attribute (at least one query or fact):

    Args:
        query: Query text(s); JSON list for several.
        answer: Answer(s) continuing each ``query``; only their tokens are scored.
        fact: Fact id(s) of the embedded biography corpus, or ``all`` (query + answer; the
            documents stating the fact are marked with ``*``).
        tokenizer: Tokenizer name or directory (default: the checkpoint's data module).
        texts: Training texts file (JSON list or one per line; default: the data module's).
    """

    query: str | list[str] | None = None
    answer: str | list[str] | None = None
    fact: Fact = None
    tokenizer: str | None = None
    texts: str | None = None


@dataclass
class ScoringOptions:
    """How stored rows are compared with the queries:

    Args:
        unit_norm: Cosine similarity (True) or inner product.
        preconditioner: ``fit`` (TrackStar: fit on the stored rows, or load the one saved in
            ``<store>/preconditioners``), a preconditioner file, or ``none``.
        damping: Preconditioner damping ``c`` (``1 / (lambda + c * mean lambda)``).
        example_reduce: Reduce an example's rows (one per epoch) to one score; ``none``
            ranks rows (and lets ``score`` stream a store larger than memory).
        modules: Score only these module blocks (names, parents or globs).
        device: Scoring device.
    """

    unit_norm: bool = True
    preconditioner: Literal["fit", "none"] | str = "fit"
    damping: float = 0.1
    example_reduce: Literal["none", "sum", "mean", "max"] = "mean"
    modules: list[str] | None = None
    device: str = "cpu"


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


def _context(model: str, opts: QueryOptions) -> _Context:
    tokenizer, texts = opts.tokenizer, opts.texts
    module, data_hp = load_model(model)
    dm = load_text_data(data_hp)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    elif dm is not None:
        tok = dm.tokenizer
    else:
        raise ValueError(f"--model {model} records no data module: pass --tokenizer <name or dir>")
    train_texts = read_texts(texts) if texts else (dm.texts if dm is not None else None)
    max_length = dm.max_length if dm is not None else 1024
    ctx = _Context(module, tok, train_texts, max_length, data_hp)
    queries, answers = _listify(opts.query), _listify(opts.answer)
    if answers and len(answers) != len(queries):
        raise ValueError(f"got {len(queries)} --query but {len(answers)} --answer values")
    ctx.queries, ctx.answers = queries, answers or [None] * len(queries)
    ctx.relevant = [set() for _ in queries]
    facts = _listify(opts.fact)
    if facts:
        corpus = dm.corpus if dm is not None else None
        if corpus is None:
            raise ValueError("--fact needs a model trained on the embedded corpus (dataset 'bios')")
        ids = range(len(corpus.facts)) if facts == ["all"] else [int(f) for f in facts]
        if bad := [i for i in ids if not 0 <= i < len(corpus.facts)]:
            raise ValueError(
                f"--fact {bad} out of range: the corpus has facts 0-{len(corpus.facts) - 1}"
            )
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
    store: str, opts: ScoringOptions, storage_options: dict[str, Any] | None = None
) -> Attributor:
    """The Attributor both commands build; ``preconditioner="none"`` turns it off."""
    return Attributor(
        store,
        storage_options=storage_options,
        device=opts.device,
        unit_norm=opts.unit_norm,
        preconditioner=None if opts.preconditioner == "none" else opts.preconditioner,
        damping=opts.damping,
        example_reduce=opts.example_reduce,  # type: ignore[arg-type]
    )


def _labels(ctx: _Context) -> list[str]:
    pairs = zip(ctx.queries, ctx.answers, strict=True)
    return [f"{q} [answer: {a.strip()}]" if a else q for q, a in pairs]


def _settings(attr: Attributor, opts: ScoringOptions) -> str:
    kind = "cosine" if opts.unit_norm else "inner product"
    kind += ", preconditioned" if attr.preconditioner is not None else ""
    rows = "rows" if opts.example_reduce == "none" else f"examples ({opts.example_reduce} of rows)"
    return f"{kind}, {rows}"


def attribute(
    store: str,
    model: str,
    queries: QueryOptions | None = None,
    scoring: ScoringOptions | None = None,
    *,
    top_k: int = 5,
    bottom: bool = False,
    report: str | None = None,
    tokens: bool = False,
    span_tokens: int = 8,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Print the training texts whose gradients best match each query's (and optionally worst).

    Args:
        store: Gradient store (``*.zarr``) captured while training ``model``.
        model: Lightning checkpoint, a directory holding one, or a Hugging Face model.
        queries: What to attribute.
        scoring: How rows are compared with queries.
        top_k: Training examples shown per query and side.
        bottom: Also show the lowest-scoring (most harmful) examples.
        report: Directory to write ``report.md``, ``report.html`` and score histograms.
        tokens: Per-token attribution of the shown documents: each token's share of the
            document's score, the ``span_tokens`` consecutive tokens with the largest share
            highlighted, and the query's tokens' shares (:mod:`lightning_bergson.cli.tokens`).
        span_tokens: Tokens in a highlighted span.
        storage_options: JSON options of the store URL's filesystem (``endpoint_url``,
            ...); default: the usual environment variables (``AWS_ACCESS_KEY_ID``, ...).
    """
    queries, scoring = queries or QueryOptions(), scoring or ScoringOptions()
    ctx = _context(model, queries)
    attr = _attributor(store, scoring, storage_options)
    q = _query_rows(attr, ctx)
    shown = ctx.texts if ctx.texts is not None else {}
    labels = _labels(ctx)
    rows = {"epochs": attr.store.epochs, "steps": attr.store.steps}  # per stored row
    if len(q) * len(attr.store) <= FULL_SCORES_LIMIT:
        scores, ids = attr.scores(q, modules=scoring.modules)
        per_row = rows if scoring.example_reduce == "none" else {}
        reports = query_reports(
            scores.numpy(), ids, shown, labels, k=top_k, relevant=ctx.relevant, **per_row
        )
    else:  # too many to keep: one streaming pass for both ends, no histograms
        top, low = attr.extremes(q, k=top_k, modules=scoring.modules)
        ids = attr.store.example_ids
        reports = from_search(
            top, low, shown, labels, relevant=ctx.relevant, example_ids=ids, **rows
        )
    kind = _settings(attr, scoring)
    print(f"Scores: {kind}, of query gradients with the {len(attr.store)} rows of {store}\n")
    if tokens:
        add_token_scores(attr, ctx, q, reports, bottom=bottom, width=span_tokens,
                         modules=scoring.modules)  # fmt: skip
    print(format_text(reports, bottom=bottom, color=tokens and sys.stdout.isatty()))
    if report:
        paths = write_report(
            reports, report, title=f"Attribution ({kind})", header=score_header(attr)
        )
        print(f"report: {paths['html']} and {paths['markdown']}")


def score(
    store: str,
    model: str,
    out: str,
    queries: QueryOptions | None = None,
    scoring: ScoringOptions | None = None,
    *,
    query_reduce: Literal["none", "mean", "max"] = "none",
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    accelerator: str = "cpu",
) -> None:
    """Score queries against every stored row into a Zarr score array (``ScoreArray``).

    Args:
        store: Gradient store (``*.zarr``).
        model: Lightning checkpoint, a directory holding one, or a Hugging Face model.
        out: Output score array (``*.zarr``).
        queries: What to score.
        scoring: How rows are compared with queries.
        query_reduce: ``mean``/``max`` over queries gives one score per training example
            (LESS-style data selection); ``none`` keeps ``[Q, N]``.
        overwrite: Replace an existing ``out``.
        storage_options: JSON options of the filesystem of the URLs ``store`` and ``out``
            (``endpoint_url``, ...); default: the usual environment variables.
        devices: Processes per node: more than one (or ``num_nodes`` > 1, or a
            ``strategy``) scores as a Lightning loop, each rank scoring and writing its own
            whole chunks of the array (needs ``--example_reduce none``).
        num_nodes: Machines (Lightning's launchers: ``NODE_RANK``, ``MASTER_ADDR``, ...).
        strategy: Lightning strategy of the loop (``ddp``).
        accelerator: Lightning accelerator of the loop (``cpu``, ``gpu``).
    """
    queries, scoring = queries or QueryOptions(), scoring or ScoringOptions()
    loop = {"devices": devices, "num_nodes": num_nodes, "strategy": strategy}
    if loop != {"devices": 1, "num_nodes": 1, "strategy": "auto"}:
        loop["accelerator"] = accelerator
        scoring = dataclasses.replace(scoring, device=_rank_device(scoring.device))
    ctx = _context(model, queries)
    attr = _attributor(store, scoring, storage_options)
    meta = {
        "queries": _labels(ctx),
        "relevant": [sorted(r) for r in ctx.relevant],
        "model": str(model),
        "data": ctx.data,
    }
    q = _query_rows(attr, ctx)
    if "accelerator" in loop:
        import lightning.pytorch as L  # only here: the command's help stays light

        from ..attribution.score_loop import score_with_lightning

        trainer = L.Trainer(
            **loop, logger=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False,
        )  # fmt: skip
        path = score_with_lightning(
            attr, q, out, query_reduce=query_reduce, modules=scoring.modules, metadata=meta,
            overwrite=overwrite, storage_options=storage_options, trainer=trainer,
        ).path  # fmt: skip
        if trainer.global_rank:
            return
    else:
        path = write_score_array(
            attr, q, out, query_reduce=query_reduce, modules=scoring.modules, metadata=meta,
            overwrite=overwrite, storage_options=storage_options,
        )  # fmt: skip
    print(f"scores [{len(q) if query_reduce == 'none' else 1}, ...] written to {path}")


def _rank_device(device: str) -> str:
    """``cuda`` as this process's own GPU (``LOCAL_RANK``) under a multi-process loop."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


# ---------------------------------------------------------------------------- parsing

_OWN = {"queries", "scoring"}


def _parser(command: Callable[..., None], summary: str) -> ArgumentParser:
    """``command``'s own arguments, then the shared query and scoring groups (flat flags)."""
    parser = ArgumentParser(
        prog=f"{PROG} {command.__name__}", description=summary, exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(command, skip=_OWN)
    parser.add_class_arguments(QueryOptions, nested_key=None, as_group=True)
    parser.add_class_arguments(ScoringOptions, nested_key=None, as_group=True)
    return parser


def _run(command: Callable[..., None], summary: str, argv: list[str]) -> None:
    ns = _parser(command, summary).parse_args(argv).as_dict()
    ns.pop("config", None)
    groups = {}
    for name, cls in (("queries", QueryOptions), ("scoring", ScoringOptions)):
        groups[name] = cls(**{f.name: ns.pop(f.name) for f in dataclasses.fields(cls)})
    command(**ns, **groups)


def attribute_main(argv: list[str]) -> None:
    """``python -m lightning_bergson attribute ...``"""
    _run(attribute, "Print the training examples whose gradients best (and worst) match "
         "each query's.", argv)  # fmt: skip


def score_main(argv: list[str]) -> None:
    """``python -m lightning_bergson score ...``"""
    _run(score, "Score queries against every stored row (or example) into a Zarr score "
         "array that report and lds read.", argv)  # fmt: skip
