"""Ranking baselines and metrics: BM25 scores, recall@k and MRR of known-relevant documents.

Scores are ``[Q, N]`` arrays (higher = ranked first), whatever produced them: an attribution
method (in the ``"influence"`` convention of :mod:`lightning_bergson.scores`, positive =
helpful), BM25, or an embedding cosine. Ties are broken by document index (stable sort).

    >>> scores = np.array([[0.1, 0.9, 0.5, 0.2]])
    >>> recall_at_k(scores, [{2, 3}], k=2)
    0.5
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from .overlap import words

__all__ = [
    "bm25_scores",
    "class_recall_at_k",
    "r_precision",
    "ranks",
    "recall_at_k",
    "reciprocal_rank",
]


def bm25_scores(
    queries: Sequence[str], docs: Sequence[str], *, k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """Okapi BM25 ``[Q, N]`` over lowercase words, with Lucene's non-negative idf.

    ``score(q, d) = sum_{w in set(q)} idf(w) * f (k1 + 1) / (f + k1 (1 - b + b |d| / avgdl))``
    with ``f`` the count of ``w`` in ``d`` and ``idf(w) = ln(1 + (N - n_w + 0.5) / (n_w + 0.5))``.

    References:
        Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009.
    """
    if not docs:
        raise ValueError("bm25_scores needs at least one document")
    doc_words = [words(d) for d in docs]
    n = len(docs)
    avgdl = sum(map(len, doc_words)) / n
    df = Counter(w for ws in doc_words for w in set(ws))
    idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
    vocab = {w: i for i, w in enumerate(df)}
    tf = np.zeros((n, len(vocab)))  # (N, V)
    for j, ws in enumerate(doc_words):
        for w, f in Counter(ws).items():
            tf[j, vocab[w]] = f
    lengths = np.array([len(ws) for ws in doc_words], dtype=np.float64)[:, None]  # (N, 1)
    weight = tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avgdl))  # (N, V)
    idf_vec = np.array([idf[w] for w in vocab])  # (V,)
    out = np.zeros((len(queries), n))
    for q, text in enumerate(queries):
        cols = [vocab[w] for w in set(words(text)) if w in vocab]
        if cols:
            out[q] = weight[:, cols] @ idf_vec[cols]
    return out


def ranks(scores: np.ndarray) -> np.ndarray:
    """``[Q, N]`` rank of every document per query (0 = highest score; ties by index)."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")  # (Q, N)
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
    return out


def _check(scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]]) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(relevant) != len(scores):
        raise ValueError(
            f"scores must be [Q, N] with one relevant set per query; got shape {scores.shape} "
            f"and {len(relevant)} sets"
        )
    return ranks(scores)


def recall_at_k(scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]], k: int) -> float:
    """Mean over queries of ``|top k & relevant| / |relevant|``; queries with none are skipped.

    Returns NaN when no query has a relevant document.
    """
    r = _check(scores, relevant)
    vals = [float((r[q, list(rel)] < k).mean()) for q, rel in enumerate(relevant) if len(rel)]
    return float(np.mean(vals)) if vals else float("nan")


def r_precision(scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]]) -> float:
    """Mean over queries of the share of relevant documents among the top ``|relevant|``.

    Unlike recall@k it reaches 1 for any number of relevant documents (a query with 16
    exact duplicates has recall@10 at most 10/16); queries with none are skipped.
    """
    r = _check(scores, relevant)
    vals = [
        float((r[q, list(rel)] < len(rel)).mean()) for q, rel in enumerate(relevant) if len(rel)
    ]
    return float(np.mean(vals)) if vals else float("nan")


def reciprocal_rank(scores: np.ndarray, relevant: Sequence[set[int] | Sequence[int]]) -> float:
    """Mean over queries of ``1 / (1 + rank of the first relevant document)`` (MRR)."""
    r = _check(scores, relevant)
    vals = [1.0 / (1 + int(r[q, list(rel)].min())) for q, rel in enumerate(relevant) if len(rel)]
    return float(np.mean(vals)) if vals else float("nan")


def class_recall_at_k(
    scores: np.ndarray, classes: Mapping[str, Sequence[set[int] | Sequence[int]]], k: int
) -> dict[str, float]:
    """:func:`recall_at_k` of each class of documents (e.g. exact duplicates, paraphrases).

    Args:
        scores: ``[Q, N]``.
        classes: Class name -> one set of document indices per query.
        k: Cut-off.
    """
    return {name: recall_at_k(scores, rel, k) for name, rel in classes.items()}
