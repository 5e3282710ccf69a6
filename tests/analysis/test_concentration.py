"""Concentration measures against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_bergson.analysis import near_duplicate_share, normalized_entropy, top_k_share


def test_top_k_share_by_hand():
    scores = np.array([[4.0, 3.0, 2.0, 1.0, -5.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(top_k_share(scores, k=2), [7 / 10, 2 / 4])
    np.testing.assert_allclose(top_k_share(scores, k=5), [1.0, 1.0])


def test_normalized_entropy_by_hand():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, -1.0, 0.0], [2.0, 2.0, 0.0, -3.0]])
    # uniform -> 1; all mass on one -> 0; two halves of four -> log 2 / log 4
    np.testing.assert_allclose(normalized_entropy(scores), [1.0, 0.0, math.log(2) / math.log(4)])


def test_no_helpful_mass_is_an_error():
    with pytest.raises(ValueError, match=r"queries \[1\] have no positive score"):
        top_k_share(np.array([[1.0, 0.0], [-1.0, -2.0]]), k=1)


def test_near_duplicate_share_by_hand():
    scores = np.array([[0.9, 0.1, 0.5, 0.7]])  # top 2: docs 0 and 3
    similarity = np.array([[0.8, 0.9, 0.0, 0.3]])
    assert near_duplicate_share(scores, similarity, k=2, threshold=0.5).tolist() == [0.5]
    assert near_duplicate_share(scores, similarity, k=4, threshold=0.5).tolist() == [0.5]
    assert near_duplicate_share(scores, similarity, k=2, threshold=0.2).tolist() == [1.0]
