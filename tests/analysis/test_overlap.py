"""Near-duplicate measures against hand-computed cases and against each other."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lightning_bergson.analysis import (
    edit_distance,
    minhash_jaccard_matrix,
    ngram_jaccard,
    ngram_jaccard_matrix,
    ngrams,
    token_overlap,
    words,
)


def test_words_and_ngrams_by_hand():
    assert words("Born in Lyon, she LEFT.") == ["born", "in", "lyon", "she", "left"]
    assert ngrams("a b a b", 2) == {("a", "b"), ("b", "a")}
    assert ngrams([1, 2, 3], 3) == {(1, 2, 3)}
    assert ngrams([5, 6], 1) == {(5,), (6,)}


def test_ngram_jaccard_by_hand():
    # bigrams {ab, bc, cd} and {ab, bc, ce}: 2 shared of 4
    assert ngram_jaccard("a b c d", "a b c e", n=2) == 0.5
    # trigrams {abc, bcd} and {abc, bce}: 1 shared of 3
    assert ngram_jaccard("a b c d", "a b c e", n=3) == pytest.approx(1 / 3)
    assert ngram_jaccard([1, 2, 3, 4], [4, 3, 2, 1], n=2) == 0.0
    assert ngram_jaccard("x y z", "X, Y; z!", n=3) == 1.0  # words are case- and punctuation-blind


def test_ngram_jaccard_matrix_matches_pairwise_sets():
    docs = ["a b c d e", "a b c x y", "e d c b a", "a b a b a b", "q r s"]
    queries = ["a b c d", "b a b a", "q r s t"]
    want = np.array([[ngram_jaccard(q, d, n=2) for d in docs] for q in queries])
    np.testing.assert_allclose(ngram_jaccard_matrix(queries, docs, n=2), want)
    # by hand: "a b c d" {ab, bc, cd} vs "a b c x y" {ab, bc, cx, xy}: 2 / 5
    assert want[0, 1] == pytest.approx(2 / 5)
    # "b a b a" {ba, ab} vs "a b a b a b" {ab, ba}: identical sets
    assert want[1, 3] == 1.0


def test_too_short_sequences_are_refused():
    with pytest.raises(ValueError, match="has no 3-grams"):
        ngram_jaccard("a b", "a b c", n=3)
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        ngrams("a b", 0)


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        (list("kitten"), list("sitting"), 3),  # k->s, e->i, +g
        (list("flaw"), list("lawn"), 2),  # -f, +n
        ([], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 3], 0),
        ("the cat sat", "the dog sat", 1),  # words: one substitution
        ("a b c d", "b c d a", 2),  # one deletion, one insertion (4 substitutions aligned)
    ],
)
def test_edit_distance_by_hand(a, b, want):
    assert edit_distance(a, b) == want
    assert edit_distance(b, a) == want


def test_token_overlap_by_hand():
    assert token_overlap("a b b c", "b a b d") == 0.75  # a, b, b shared of 4
    assert token_overlap([1, 2, 3], [1, 2, 3, 4, 5]) == 0.6  # 3 of the longer 5
    assert token_overlap("a b", "b a") == 1.0  # order-blind
    assert token_overlap("a a a", "a") == pytest.approx(1 / 3)  # multiplicity counts
    with pytest.raises(ValueError, match="undefined"):
        token_overlap([], [])


def test_minhash_estimates_the_exact_jaccard():
    pytest.importorskip("datasketch")
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    base = [rng.choice(vocab) for _ in range(40)]
    docs = [base, *[[w if rng.random() > p else rng.choice(vocab) for w in base]
                    for p in (0.05, 0.2, 0.5, 1.0)]]  # fmt: skip
    exact = ngram_jaccard_matrix([base], docs, n=2)
    est = minhash_jaccard_matrix([base], docs, n=2, num_perm=512, seed=3)
    assert est[0, 0] == 1.0  # identical sets hash identically
    # standard deviation sqrt(J (1 - J) / 512) <= 0.023; 4 sd
    np.testing.assert_allclose(est, exact, atol=0.09)
    assert exact[0, 1] > exact[0, 2] > exact[0, 3]  # the edits lower the exact value
