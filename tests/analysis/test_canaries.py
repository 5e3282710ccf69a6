"""The memorization corpus has the structure it promises, checked with the overlap measures."""

from __future__ import annotations

import pytest

from lightning_bergson.analysis import (
    edit_distance,
    make_memorization_corpus,
    ngram_jaccard,
    token_overlap,
    words,
)
from lightning_bergson.analysis.canaries import TOPICS


@pytest.fixture(scope="module")
def corpus():
    return make_memorization_corpus(num_people=3, copies=(1, 4), canaries_per_level=2, seed=5)


def test_classes_and_counts(corpus):
    assert [c.copies for c in corpus.canaries] == [1, 1, 4, 4]
    for c in corpus.canaries:
        docs = corpus.class_docs(c.canary_id)
        assert len(docs["exact"]) == c.copies
        assert all(corpus.texts[i] == c.text for i in docs["exact"])
        assert len(docs["near_duplicate"]) == 2 and len(docs["paraphrase"]) == 1
        assert len(docs["related"]) == 16
        assert all(corpus.topic_of[i] == c.topic for i in docs["related"])
        assert (
            not set().union(*(docs[k] for k in ("exact", "near_duplicate", "paraphrase")))
            & docs["related"]
        )


def test_near_duplicates_have_the_requested_edits(corpus):
    for c in corpus.canaries:
        for i in corpus.class_docs(c.canary_id)["near_duplicate"]:
            e = corpus.edits[i]
            canary, near = words(c.text), words(corpus.texts[i])
            assert e in (2, 5)
            assert sum(a != b for a, b in zip(canary, near, strict=True)) == e  # substitutions
            assert edit_distance(canary, near) <= e
            assert token_overlap(canary, near) >= 1 - e / len(canary)


def test_paraphrases_share_no_word_and_keep_the_order(corpus):
    for c in corpus.canaries:
        (i,) = corpus.class_docs(c.canary_id)["paraphrase"]
        synonym = dict(TOPICS[c.topic])
        assert words(corpus.texts[i]) == [synonym[w] for w in words(c.text)]
        assert token_overlap(c.text, corpus.texts[i]) == 0.0


def test_related_documents_share_the_topic_not_the_sequence(corpus):
    for c in corpus.canaries:
        vocab = {w for pair in TOPICS[c.topic] for w in pair}
        for i in corpus.class_docs(c.canary_id)["related"]:
            assert set(words(corpus.texts[i])) <= vocab
            assert ngram_jaccard(c.text, corpus.texts[i], n=3) < 0.2


def test_facts_styles_and_determinism(corpus):
    for fact in corpus.facts:
        for i in fact.doc_ids:
            assert corpus.kinds[i] == "biography" and fact.person in corpus.texts[i]
            assert fact.value in corpus.texts[i]
    style = [corpus.texts[i] for i in corpus.docs_of_kind("style")]
    assert len(style) == 48 and all(t.endswith(" STOP") for t in style)
    assert not set(corpus.style_queries) & set(corpus.texts)
    again = make_memorization_corpus(num_people=3, copies=(1, 4), canaries_per_level=2, seed=5)
    assert again.texts == corpus.texts


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="near_edits"):
        make_memorization_corpus(num_people=1, near_edits=(30,))
    with pytest.raises(ValueError, match="copies"):
        make_memorization_corpus(num_people=1, copies=(0,))
