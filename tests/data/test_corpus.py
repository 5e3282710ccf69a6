"""The embedded biography corpus: determinism, clean fact -> document ground truth, JSON I/O."""

from __future__ import annotations

import json
import re

import pytest

from lightning_bergson.corpus import (
    DEFAULT_RELATIONS,
    FILLERS,
    RELATIONS,
    BiographyCorpus,
    make_biographies,
)


def _mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text) is not None


def _fact_sentence(text: str) -> str:
    """The document without its filler sentence (fillers are appended after a space)."""
    for filler in FILLERS:
        if text.endswith(" " + filler):
            return text[: -len(filler) - 1]
    return text


@pytest.fixture(scope="module")
def corpus() -> BiographyCorpus:
    return make_biographies(60, seed=3)


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a, b = make_biographies(30, seed=1), make_biographies(30, seed=1)
    assert a == b
    assert a.to_json() == b.to_json()
    c = make_biographies(30, seed=2)
    assert a.texts != c.texts
    assert {f.person for f in a.facts} != {f.person for f in c.facts}


def test_people_have_unique_names_and_one_fact_per_relation(corpus: BiographyCorpus) -> None:
    people = sorted({f.person for f in corpus.facts})
    assert len(people) == 60
    for person in people:
        relations = sorted(f.relation for f in corpus.facts if f.person == person)
        assert relations == sorted(DEFAULT_RELATIONS)
    assert [f.fact_id for f in corpus.facts] == list(range(len(corpus.facts)))


def test_every_document_states_exactly_its_fact(corpus: BiographyCorpus) -> None:
    people = {f.person for f in corpus.facts}
    values = {p: [f.value for f in corpus.facts if f.person == p] for p in people}
    for text, fact_id in zip(corpus.texts, corpus.doc_fact, strict=True):
        fact = corpus.facts[fact_id]
        assert _mentions(text, fact.person), text
        assert _mentions(text, fact.value), text
        assert [p for p in people if _mentions(text, p)] == [fact.person], text
        stated = [v for v in values[fact.person] if _mentions(text, v)]
        assert stated == [fact.value], text


def test_fact_doc_ids_are_exactly_the_mapped_documents(corpus: BiographyCorpus) -> None:
    assert len(corpus.doc_fact) == len(corpus.texts) == len(corpus)
    for fact in corpus.facts:
        expected = tuple(i for i, f in enumerate(corpus.doc_fact) if f == fact.fact_id)
        assert fact.doc_ids == expected
        assert 2 <= len(fact.doc_ids) <= 4
        sentences = [_fact_sentence(corpus.texts[i]) for i in fact.doc_ids]
        assert len(set(sentences)) == len(sentences), "each document uses its own template"
    assert sum(len(f.doc_ids) for f in corpus.facts) == len(corpus.texts)


def test_document_order_is_shuffled(corpus: BiographyCorpus) -> None:
    assert corpus.doc_fact != sorted(corpus.doc_fact)


@pytest.mark.parametrize("docs_per_fact", [(1, 1), (5, 5)])
def test_docs_per_fact_bounds(docs_per_fact: tuple[int, int]) -> None:
    corpus = make_biographies(10, docs_per_fact=docs_per_fact, seed=0)
    assert {len(f.doc_ids) for f in corpus.facts} == {docs_per_fact[0]}


def test_queries_and_answers_are_well_formed(corpus: BiographyCorpus) -> None:
    for fact in corpus.facts:
        assert fact.query.startswith(fact.person + " ")
        assert fact.query == fact.query.strip()
        assert fact.answer == " " + fact.value
        assert not _mentions(fact.query, fact.value)
    by_person: dict[str, list[str]] = {}
    for fact in corpus.facts:
        by_person.setdefault(fact.person, []).append(fact.query)
    assert all(len(set(qs)) == len(qs) for qs in by_person.values())
    # Some documents share the query's prefix form, most word the fact differently.
    shared = sum(
        text.startswith(corpus.facts[f].query + corpus.facts[f].answer)
        for text, f in zip(corpus.texts, corpus.doc_fact, strict=True)
    )
    assert 0 < shared < len(corpus.texts) / 2


def test_json_round_trip(corpus: BiographyCorpus, tmp_path) -> None:
    path = tmp_path / "bios.json"
    corpus.save(path)
    loaded = BiographyCorpus.load(path)
    assert loaded == corpus
    assert isinstance(loaded.facts[0].doc_ids, tuple)
    assert BiographyCorpus.from_json(json.loads(json.dumps(corpus.to_json()))) == corpus


def test_corrupt_json_is_rejected(corpus: BiographyCorpus) -> None:
    data = corpus.to_json()
    data["doc_fact"] = data["doc_fact"][::-1]
    with pytest.raises(ValueError, match="disagrees with doc_fact"):
        BiographyCorpus.from_json(data)
    with pytest.raises(ValueError, match="format"):
        BiographyCorpus.from_json({"texts": []})


def test_other_relations_and_no_filler() -> None:
    corpus = make_biographies(8, relations=("field",), filler_prob=0.0, seed=0)
    assert {f.relation for f in corpus.facts} == {"field"}
    assert "field" in RELATIONS
    assert all(text == _fact_sentence(text) and text.endswith(".") for text in corpus.texts)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="4096"):
        make_biographies(4097)
    with pytest.raises(ValueError, match="num_people=0"):
        make_biographies(0)
    for bad in [(0, 2), (3, 2), (1, 6)]:
        with pytest.raises(ValueError, match="docs_per_fact"):
            make_biographies(5, docs_per_fact=bad)
    with pytest.raises(ValueError, match="height"):
        make_biographies(5, relations=("height",))
    with pytest.raises(ValueError, match="filler_prob"):
        make_biographies(5, filler_prob=1.5)
