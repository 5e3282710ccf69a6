"""``attribute --tokens true``: per-token scores of the documents and queries a report shows.

For each query, the documents shown for it are tokenized as training tokenized them
(:func:`~lightning_bergson.attribution.queries.query_batch`, with the data module's
``append_eos``) and scored token by token against the query's row
(:meth:`Attributor.token_scores`: one forward-mode pass per query over its shown
documents); the query's own tokens are scored against the shown documents' stored rows
(:meth:`Attributor.query_token_scores`: one backward per scored query token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..attribution.attributor import Attributor
from ..attribution.queries import query_batch
from ..scores.report import Match, QueryReport
from ..scores.spans import TokenScores

__all__ = ["add_token_scores"]

DOC_NOTE = "document tokens scored with the model given"


def _pieces(tokenizer: Any, ids: Tensor) -> list[str]:
    """Each token as the tokenizer decodes it alone."""
    return [tokenizer.decode([int(i)]) for i in ids]


def _append_eos(data: dict[str, Any] | None) -> bool:
    """Whether training appended eos to each document (``TextDataModule``'s default)."""
    return bool(data.get("append_eos", True)) if data else False


def add_token_scores(
    attr: Attributor,
    ctx: Any,
    rows: Tensor,
    reports: Sequence[QueryReport],
    *,
    bottom: bool = False,
    width: int = 8,
    modules: Sequence[str] | None = None,
) -> None:
    """Fill ``tokens`` and ``query_tokens`` of each shown match (those with a known text).

    Args:
        attr: The Attributor the reports were scored with.
        ctx: The command's context (model, tokenizer, texts, queries and answers).
        rows: Query rows ``[Q, D]`` the reports were scored with.
        reports: One per query, in order.
        bottom: Also the bottom matches.
        width: Tokens in the highlighted span.
        modules: The scored module blocks.
    """
    for q, rep in enumerate(reports):
        shown = [m for m in rep.top + (rep.bottom if bottom else []) if _has_text(ctx, m)]
        if not shown:
            continue
        _document_tokens(attr, ctx, rows[q : q + 1], shown, width, modules)
        if attr.example_reduce == "max":
            rep.notes.append("query tokens not shown: a maximum over an example's rows does "
                             "not split over tokens (use --example_reduce mean)")  # fmt: skip
            continue
        _query_tokens(attr, ctx, q, shown, modules)


def _has_text(ctx: Any, m: Match) -> bool:
    texts = ctx.texts
    return texts is not None and 0 <= m.example_id < len(texts) and texts[m.example_id] == m.text


def _document_tokens(attr, ctx, row: Tensor, shown: list[Match], width: int, modules) -> None:
    docs = query_batch(ctx.tokenizer, [m.text for m in shown], max_length=ctx.max_length,
                       append_eos=_append_eos(ctx.data))  # fmt: skip
    scores = attr.token_scores(row, ctx.module, docs, modules=modules)[0]  # (n, S)
    for j, m in enumerate(shown):
        size = int(docs["attention_mask"][j].sum())
        pieces = _pieces(ctx.tokenizer, docs["input_ids"][j, :size])
        m.tokens = TokenScores.make(pieces, scores[j, :size].tolist(), width=width, note=DOC_NOTE)


def _query_tokens(attr, ctx, q: int, shown: list[Match], modules) -> None:
    answer = ctx.answers[q]
    batch = query_batch(ctx.tokenizer, [ctx.queries[q]], max_length=ctx.max_length,
                        answers=[answer] if answer else None)  # fmt: skip
    ids = sorted({m.example_id for m in shown})
    scores, cols = attr.query_token_scores(ctx.module, batch, example_ids=ids, modules=modules)
    pieces = _pieces(ctx.tokenizer, batch["input_ids"][0])
    for m in shown:
        j = _column(attr, cols, ids, m)
        m.query_tokens = TokenScores(pieces, scores[0, :, j].tolist())


def _column(attr: Attributor, cols: np.ndarray, ids: list[int], m: Match) -> int:
    """The score column of match ``m``: its example, or (rows) its example's row at its step."""
    if attr.example_reduce != "none":
        return int(np.flatnonzero(cols == m.example_id)[0])
    store = attr.store
    keep = np.isin(store.example_ids, ids)
    same = (cols == m.example_id) & (np.asarray(store.steps)[keep] == m.step)
    same &= np.asarray(store.epochs)[keep] == m.epoch
    return int(np.flatnonzero(same)[0])
