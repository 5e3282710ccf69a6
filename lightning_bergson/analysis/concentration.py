"""How concentrated an attribution is: a few decisive documents, or many small contributions?

Both measures read the helpful mass of each query's scores, ``p_j = max(s_j, 0) / sum
max(s, 0)`` (scores in the ``"influence"`` convention: positive = helpful; convert other
conventions with :func:`lightning_bergson.scores.helpfulness` first):

* :func:`top_k_share`: the share of the helpful mass held by the ``k`` highest scores;
* :func:`normalized_entropy`: ``-sum p log p / log N``, 0 when one document holds all the
  mass and 1 when every document holds the same.

    >>> top_k_share(np.array([[4.0, 3.0, 2.0, 1.0, -5.0]]), k=2)
    array([0.7])
"""

from __future__ import annotations

import numpy as np

__all__ = ["helpful_mass", "near_duplicate_share", "normalized_entropy", "top_k_share"]


def helpful_mass(scores: np.ndarray) -> np.ndarray:
    """``[Q, N]`` positive parts of the scores, normalized to sum 1 per query.

    Raises:
        ValueError: A query has no positive score (its helpful mass is undefined).
    """
    pos = np.clip(np.asarray(scores, dtype=np.float64), 0, None)
    if pos.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {pos.shape}")
    total = pos.sum(1, keepdims=True)  # (Q, 1)
    empty = np.flatnonzero(total[:, 0] <= 0)
    if len(empty):
        raise ValueError(
            f"queries {empty[:5].tolist()} have no positive score, so their helpful mass is "
            "undefined; check the sign convention (helpfulness(scores, convention))"
        )
    return pos / total


def top_k_share(scores: np.ndarray, k: int = 10) -> np.ndarray:
    """``[Q]`` share of each query's helpful mass held by its ``k`` highest scores."""
    p = helpful_mass(scores)
    if not 1 <= k <= p.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the {p.shape[1]} documents")
    return -np.sort(-p, axis=1)[:, :k].sum(1)


def normalized_entropy(scores: np.ndarray) -> np.ndarray:
    """``[Q]`` entropy of each query's helpful mass divided by ``log N`` (in [0, 1])."""
    p = helpful_mass(scores)
    if p.shape[1] < 2:
        raise ValueError("normalized_entropy needs at least 2 documents (log 1 = 0)")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(1) / np.log(p.shape[1])


def near_duplicate_share(
    scores: np.ndarray, similarity: np.ndarray, k: int, threshold: float
) -> np.ndarray:
    """``[Q]`` share of each query's top ``k`` documents whose similarity to it is >= threshold.

    Args:
        scores: ``[Q, N]`` attribution scores (higher first; ties by index).
        similarity: ``[Q, N]`` e.g. :func:`~lightning_bergson.analysis.ngram_jaccard_matrix`
            of the query texts and the documents.
        k: Top documents looked at.
        threshold: Similarity from which a document counts as a near-duplicate.
    """
    scores, similarity = np.asarray(scores), np.asarray(similarity)
    if scores.shape != similarity.shape:
        raise ValueError(f"scores {scores.shape} and similarity {similarity.shape} differ in shape")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return (np.take_along_axis(similarity, top, axis=1) >= threshold).mean(1)
