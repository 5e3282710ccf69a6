"""Near-duplicate measures between texts or token sequences: n-gram Jaccard, MinHash, edits.

Every function takes either a string (split into lowercase words by :func:`words`) or a
sequence of hashable tokens (token ids, words), so the same measure runs on text and on
what the model saw::

    >>> ngram_jaccard("the cat sat on the mat", "the cat sat on a mat", n=2)
    0.42857142857142855
    >>> edit_distance("the cat sat".split(), "the dog sat".split())
    1

Exact Jaccard needs nothing but Python; :func:`minhash_jaccard_matrix` estimates the same
matrix with ``datasketch`` (``pip install lightning-bergson[analysis]``), for corpora too
large for exact pairwise sets.

References:
    - Broder, "On the resemblance and containment of documents", 1997 (MinHash).
    - Lee et al., "Deduplicating Training Data Makes Language Models Better",
      arXiv:2107.06499 (n-gram near-duplicates of training data).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "edit_distance",
    "minhash_jaccard_matrix",
    "ngram_jaccard",
    "ngram_jaccard_matrix",
    "ngrams",
    "token_overlap",
    "words",
]

Tokens = str | Sequence[Hashable]
"""A text (split into lowercase words) or a sequence of tokens."""

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercase word tokens (``\\w+`` runs) of ``text``.

    Example:
        >>> words("Born in Lyon, she left.")
        ['born', 'in', 'lyon', 'she', 'left']
    """
    return _WORD.findall(text.lower())


def _tokens(x: Tokens) -> list[Hashable]:
    if isinstance(x, str):
        return list(words(x))
    if hasattr(x, "tolist"):  # a tensor or an array of token ids
        return list(x.tolist())  # type: ignore[union-attr]
    return list(x)


def ngrams(x: Tokens, n: int) -> set[tuple[Hashable, ...]]:
    """The set of contiguous ``n``-grams of ``x``.

    Raises:
        ValueError: ``n < 1``, or ``x`` has fewer than ``n`` tokens (its set would be
            empty, and every Jaccard with it undefined).

    Example:
        >>> sorted(ngrams([1, 2, 3, 2, 3], 2))
        [(1, 2), (2, 3), (3, 2)]
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (e.g. n=3 for word trigrams)")
    toks = _tokens(x)
    if len(toks) < n:
        raise ValueError(
            f"a sequence of {len(toks)} tokens has no {n}-grams ({toks[:8]!r}); pass n <= "
            f"{max(1, len(toks))} or leave such short sequences out"
        )
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def ngram_jaccard(a: Tokens, b: Tokens, n: int = 3) -> float:
    """Jaccard similarity ``|A & B| / |A | B|`` of the ``n``-gram sets of ``a`` and ``b``.

    1 for sequences with the same n-grams, 0 for sequences that share none.
    """
    return _jaccard(ngrams(a, n), ngrams(b, n))


def ngram_jaccard_matrix(
    queries: Sequence[Tokens], docs: Sequence[Tokens], n: int = 3
) -> np.ndarray:
    """``[Q, N]`` exact n-gram Jaccard of every query with every document.

    Runs through an inverted index of the documents' n-grams, so the cost is the number of
    shared n-grams, not ``Q * N`` set operations.
    """
    doc_sets = [ngrams(d, n) for d in docs]
    index: dict[tuple, list[int]] = {}
    for j, s in enumerate(doc_sets):
        for g in s:
            index.setdefault(g, []).append(j)
    sizes = np.array([len(s) for s in doc_sets], dtype=np.float64)  # (N,)
    out = np.zeros((len(queries), len(docs)))
    for q, query in enumerate(queries):
        qs = ngrams(query, n)
        shared = np.zeros(len(docs))
        for g in qs:
            for j in index.get(g, ()):
                shared[j] += 1
        out[q] = shared / (len(qs) + sizes - shared)  # |A & B| / |A | B|
    return out


def minhash_jaccard_matrix(
    queries: Sequence[Tokens],
    docs: Sequence[Tokens],
    n: int = 3,
    *,
    num_perm: int = 128,
    seed: int = 1,
) -> np.ndarray:
    """``[Q, N]`` MinHash estimate of :func:`ngram_jaccard_matrix` (``datasketch``).

    The estimate is unbiased with standard deviation about ``sqrt(J (1 - J) / num_perm)``.

    Raises:
        ImportError: ``datasketch`` is not installed (it names the extra that brings it).
    """
    try:
        from datasketch import MinHash
    except ImportError as err:
        raise ImportError(
            "minhash_jaccard_matrix needs datasketch: pip install 'lightning-bergson[analysis]' "
            "(or pip install datasketch); ngram_jaccard_matrix computes the exact values "
            "without it"
        ) from err

    def signature(x: Tokens) -> MinHash:
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([repr(g).encode() for g in sorted(ngrams(x, n), key=repr)])
        return m

    doc_sigs = [signature(d) for d in docs]
    out = np.zeros((len(queries), len(docs)))
    for q, query in enumerate(queries):
        sig = signature(query)
        out[q] = [sig.jaccard(d) for d in doc_sigs]
    return out


def edit_distance(a: Tokens, b: Tokens) -> int:
    """Levenshtein distance: fewest insertions, deletions and substitutions turning a into b.

    Example:
        >>> edit_distance("kitten", "sitting")  # one word each: one substitution
        1
        >>> edit_distance(list("kitten"), list("sitting"))
        3
    """
    x, y = _tokens(a), _tokens(b)
    prev = list(range(len(y) + 1))  # distances of x[:0] to every prefix of y
    for i, xi in enumerate(x, start=1):
        cur = [i]
        for j, yj in enumerate(y, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (xi != yj)))
        prev = cur
    return prev[-1]


def token_overlap(a: Tokens, b: Tokens) -> float:
    """Shared tokens, counted with multiplicity, over the longer sequence's length.

    1 exactly when both hold the same tokens the same number of times (any order);
    order-blind, unlike :func:`ngram_jaccard` and :func:`edit_distance`.

    Example:
        >>> token_overlap("a b b c", "b a b d")
        0.75
    """
    x, y = _tokens(a), _tokens(b)
    if not x and not y:
        raise ValueError("token_overlap of two empty sequences is undefined")
    shared = sum((Counter(x) & Counter(y)).values())
    return shared / max(len(x), len(y))
