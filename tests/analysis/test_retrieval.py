"""BM25 and ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_bergson.analysis import (
    bm25_scores,
    class_recall_at_k,
    r_precision,
    ranks,
    recall_at_k,
    reciprocal_rank,
)


def test_bm25_by_hand():
    docs = ["a b", "a c c"]  # avgdl = 2.5
    k1, b = 1.5, 0.75
    got = bm25_scores(["c", "a c", "zzz"], docs, k1=k1, b=b)
    idf_c = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))  # c in 1 of 2 documents
    idf_a = math.log(1 + (2 - 2 + 0.5) / (2 + 0.5))  # a in both
    norm1 = 1 - b + b * 2 / 2.5  # length factor of "a b"
    norm2 = 1 - b + b * 3 / 2.5
    c_in_2 = idf_c * 2 * (k1 + 1) / (2 + k1 * norm2)
    a_in_1 = idf_a * 1 * (k1 + 1) / (1 + k1 * norm1)
    a_in_2 = idf_a * 1 * (k1 + 1) / (1 + k1 * norm2)
    want = np.array([[0.0, c_in_2], [a_in_1, a_in_2 + c_in_2], [0.0, 0.0]])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bm25_counts_a_repeated_query_word_once():
    docs = ["red fox", "blue fox jumps"]
    np.testing.assert_allclose(bm25_scores(["fox fox red"], docs), bm25_scores(["fox red"], docs))


def test_ranks_break_ties_by_index():
    assert ranks(np.array([[0.5, 0.9, 0.5, 0.1]])).tolist() == [[1, 0, 2, 3]]


def test_recall_and_mrr_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]])
    relevant = [{2, 3}, {3}]
    # query 0: order 1, 2, 3, 0 -> top 2 holds doc 2 of {2, 3}; query 1: doc 3 ranks last
    assert recall_at_k(scores, relevant, k=2) == pytest.approx((1 / 2 + 0) / 2)
    assert recall_at_k(scores, relevant, k=3) == pytest.approx((2 / 2 + 0) / 2)
    assert reciprocal_rank(scores, relevant) == pytest.approx((1 / 2 + 1 / 4) / 2)
    # top 2 of query 0 hold one of its 2; the top 1 of query 1 misses its 1
    assert r_precision(scores, relevant) == pytest.approx((1 / 2 + 0) / 2)
    assert r_precision(np.array([[5.0, 4.0, 3.0, 2.0, 1.0]]), [{0, 1, 2}]) == 1.0


def test_class_recall_skips_queries_without_the_class():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    got = class_recall_at_k(
        scores, {"exact": [{0}, {0}], "near": [set(), {2}], "none": [set(), set()]}, k=1
    )
    assert got["exact"] == 0.5  # first query finds doc 0 first, the second ranks it last
    assert got["near"] == 1.0  # only the second query has one, and ranks it first
    assert math.isnan(got["none"])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="one relevant set per query"):
        recall_at_k(np.zeros((2, 3)), [{0}], k=1)
