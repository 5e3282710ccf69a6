"""Analysis tools for attribution studies: near-duplicates, memorization, rankings.

* :mod:`.overlap`: n-gram Jaccard (exact, or MinHash with ``datasketch``), edit distance and
  token overlap between texts or token sequences.
* :mod:`.extraction`: k-extractability (greedy decoding from a k-token prefix reproduces the
  next m tokens) and the step from which a sequence stays memorized.
* :mod:`.retrieval`: BM25 scores, recall@k (per class of documents) and MRR of any ``[Q, N]``
  scores.
* :mod:`.concentration`: how concentrated each query's attribution is (top-k share,
  normalized entropy, near-duplicates among the top documents).
* :mod:`.embedding`: the mean-hidden-state cosine baseline.
* :mod:`.canaries`: a corpus with canaries at known duplicate counts, near-duplicates,
  paraphrases, related documents, a style and biography facts.

Importing it loads neither Lightning nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "Canary": ".canaries",
    "MemorizationCorpus": ".canaries",
    "bm25_scores": ".retrieval",
    "class_recall_at_k": ".retrieval",
    "edit_distance": ".overlap",
    "extraction_lengths": ".extraction",
    "greedy_continuation": ".extraction",
    "hidden_state_cosine": ".embedding",
    "k_extractable": ".extraction",
    "make_memorization_corpus": ".canaries",
    "mean_hidden_states": ".embedding",
    "memorization_steps": ".extraction",
    "minhash_jaccard_matrix": ".overlap",
    "near_duplicate_share": ".concentration",
    "ngram_jaccard": ".overlap",
    "ngram_jaccard_matrix": ".overlap",
    "ngrams": ".overlap",
    "normalized_entropy": ".concentration",
    "r_precision": ".retrieval",
    "ranks": ".retrieval",
    "recall_at_k": ".retrieval",
    "reciprocal_rank": ".retrieval",
    "token_overlap": ".overlap",
    "top_k_share": ".concentration",
    "words": ".overlap",
}
__all__ = [
    "Canary",
    "MemorizationCorpus",
    "bm25_scores",
    "class_recall_at_k",
    "edit_distance",
    "extraction_lengths",
    "greedy_continuation",
    "hidden_state_cosine",
    "k_extractable",
    "make_memorization_corpus",
    "mean_hidden_states",
    "memorization_steps",
    "minhash_jaccard_matrix",
    "near_duplicate_share",
    "ngram_jaccard",
    "ngram_jaccard_matrix",
    "ngrams",
    "normalized_entropy",
    "r_precision",
    "ranks",
    "recall_at_k",
    "reciprocal_rank",
    "token_overlap",
    "top_k_share",
    "words",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from .canaries import Canary, MemorizationCorpus, make_memorization_corpus
    from .concentration import near_duplicate_share, normalized_entropy, top_k_share
    from .embedding import hidden_state_cosine, mean_hidden_states
    from .extraction import (
        extraction_lengths,
        greedy_continuation,
        k_extractable,
        memorization_steps,
    )
    from .overlap import (
        edit_distance,
        minhash_jaccard_matrix,
        ngram_jaccard,
        ngram_jaccard_matrix,
        ngrams,
        token_overlap,
        words,
    )
    from .retrieval import (
        bm25_scores,
        class_recall_at_k,
        r_precision,
        ranks,
        recall_at_k,
        reciprocal_rank,
    )
