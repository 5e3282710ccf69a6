"""A training corpus with known memorization structure: canaries and their relatives.

Every document has a known kind, so a study can ask which kind of document an attribution
method ranks first for a memorized sequence:

* ``canary``: a random sequence of ``canary_words`` words of one topic's vocabulary,
  inserted as exact duplicates (``copies`` of them: 1, 2, 4, 8, 16 by default);
* ``near_duplicate``: a canary with ``e`` words substituted at random positions by other
  words of its topic (one document per ``e`` in ``near_edits``: word edit distance ``<= e``);
* ``paraphrase``: the canary with every word replaced by its synonym (same order, no
  shared word);
* ``related``: random sequences of the same topic's words (primary words and synonyms):
  thematically related, sharing no sequence with any canary by construction beyond chance;
* ``style``: telegrams ("ARRIVED LYON STOP ...") written in a style no other document has;
* ``biography``: the fact corpus of :func:`lightning_bergson.corpus.make_biographies`.

    >>> c = make_memorization_corpus(num_people=2, copies=(1, 2), canaries_per_level=1)
    >>> [len(c.class_docs(i)["exact"]) for i in range(len(c.canaries))]
    [1, 2]

Everything is generated from built-in word lists and a seed: no network, no files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..corpus import CITIES, Fact, make_biographies

__all__ = ["KINDS", "TOPICS", "Canary", "MemorizationCorpus", "make_memorization_corpus"]

KINDS = ("canary", "near_duplicate", "paraphrase", "related", "style", "biography")

# topic -> (word, synonym) pairs; no word occurs twice anywhere, nor in the biographies
TOPICS: dict[str, tuple[tuple[str, str], ...]] = {
    "sea": (
        ("ship", "vessel"), ("wave", "swell"), ("harbor", "port"), ("sailor", "mariner"),
        ("anchor", "mooring"), ("tide", "current"), ("shore", "coast"), ("storm", "gale"),
        ("island", "isle"), ("captain", "skipper"), ("net", "trawl"), ("gull", "tern"),
        ("lighthouse", "beacon"), ("deck", "planking"), ("reef", "shoal"), ("sail", "canvas"),
    ),
    "forest": (
        ("oak", "acorn"), ("pine", "fir"), ("moss", "lichen"), ("fox", "vixen"),
        ("owl", "hooter"), ("fern", "bracken"), ("stream", "brook"), ("trail", "path"),
        ("bark", "rind"), ("mushroom", "toadstool"), ("deer", "stag"), ("branch", "bough"),
        ("root", "taproot"), ("leaf", "frond"), ("thicket", "copse"), ("badger", "brock"),
    ),
    "kitchen": (
        ("kettle", "teapot"), ("flour", "meal"), ("oven", "stove"), ("ladle", "scoop"),
        ("butter", "ghee"), ("pepper", "peppercorn"), ("onion", "shallot"), ("knife", "blade"),
        ("bread", "loaf"), ("soup", "broth"), ("spoon", "teaspoon"), ("honey", "nectar"),
        ("apron", "pinafore"), ("pantry", "larder"), ("garlic", "clove"), ("plate", "dish"),
    ),
    "sky": (
        ("cloud", "cumulus"), ("star", "sun"), ("comet", "meteor"), ("moon", "crescent"),
        ("rain", "drizzle"), ("thunder", "rumble"), ("gust", "breeze"), ("dawn", "daybreak"),
        ("dusk", "twilight"), ("rainbow", "arc"), ("frost", "rime"), ("orbit", "circuit"),
        ("planet", "globe"), ("eclipse", "occultation"), ("snow", "sleet"), ("kite", "glider"),
    ),
}  # fmt: skip

_PHRASES = (
    "TRAIN LATE", "WEATHER FINE", "SEND MONEY", "ALL WELL", "LETTER FOLLOWS",
    "MEETING POSTPONED", "RETURNING MONDAY", "HOTEL FULL", "WIRE ANSWER", "MOTHER SENDS LOVE",
    "CONTRACT SIGNED", "BAGGAGE LOST", "DELAYED BY FLOODS", "PRICES RISING", "NEED TICKETS",
    "AWAIT INSTRUCTIONS", "BRIDGE CLOSED", "GOODS SHIPPED", "DOCTOR SAYS REST", "CALL TONIGHT",
)  # fmt: skip
_OPENERS = ("ARRIVED", "LEAVING", "STAYING IN", "REACHED", "STRANDED IN", "DEPARTING")


@dataclass(frozen=True)
class Canary:
    """One inserted sequence and the documents built from it.

    Args:
        canary_id: Index in ``MemorizationCorpus.canaries``.
        topic: Key of :data:`TOPICS` whose words the canary uses.
        text: The canary.
        copies: Exact duplicates of it in the corpus.
    """

    canary_id: int
    topic: str
    text: str
    copies: int


@dataclass
class MemorizationCorpus:
    """Documents, the kind of each, and the canaries, facts and style queries of the corpus.

    Args:
        texts: Training documents; the index is the ``example_id``.
        kinds: Kind of every document (one of :data:`KINDS`).
        canary_of: The canary a canary, near-duplicate or paraphrase document comes from
            (``-1`` for the other kinds).
        topic_of: Topic of canary-family and related documents (``""`` otherwise).
        edits: Words substituted in a near-duplicate (0 for the other kinds).
        canaries: Every canary.
        facts: The biography facts, ``doc_ids`` pointing into ``texts``.
        style_queries: Telegrams in the training style that are not in ``texts``.
    """

    texts: list[str]
    kinds: list[str]
    canary_of: list[int]
    topic_of: list[str]
    edits: list[int]
    canaries: list[Canary]
    facts: list[Fact]
    style_queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def docs_of_kind(self, kind: str) -> set[int]:
        """Indices of every document of ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        return {i for i, k in enumerate(self.kinds) if k == kind}

    def class_docs(self, canary_id: int) -> dict[str, set[int]]:
        """Documents of canary ``canary_id`` by class: ``exact`` (its copies),
        ``near_duplicate``, ``paraphrase`` and ``related`` (same topic, not from it)."""
        topic = self.canaries[canary_id].topic
        out: dict[str, set[int]] = {"exact": set(), "near_duplicate": set(), "paraphrase": set()}
        out["related"] = set()
        for i, (kind, c, t) in enumerate(
            zip(self.kinds, self.canary_of, self.topic_of, strict=True)
        ):
            if c == canary_id:
                out["exact" if kind == "canary" else kind].add(i)
            elif kind == "related" and t == topic:
                out["related"].add(i)
        return out


def _check(copies: tuple[int, ...], near_edits: tuple[int, ...], canary_words: int) -> None:
    if not copies or min(copies) < 1:
        raise ValueError(f"copies={copies} must be positive counts, e.g. (1, 2, 4, 8, 16)")
    if any(not 0 < e <= canary_words for e in near_edits):
        raise ValueError(
            f"near_edits={near_edits} must be word substitutions in 1..canary_words={canary_words}"
        )
    if canary_words < 2:
        raise ValueError(f"canary_words={canary_words} must be >= 2")


def _substitute(seq: list[str], edits: int, vocab: list[str], rng: random.Random) -> list[str]:
    """``seq`` with ``edits`` positions replaced by a different word of ``vocab``."""
    out = list(seq)
    for pos in rng.sample(range(len(seq)), edits):
        out[pos] = rng.choice([w for w in vocab if w != seq[pos]])
    return out


def _telegram(rng: random.Random) -> str:
    city = rng.choice(CITIES).upper()
    parts = [f"{rng.choice(_OPENERS)} {city}", *rng.sample(_PHRASES, 3)]
    return " STOP ".join(parts) + " STOP"


def _telegrams(num: int, num_queries: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """``num`` distinct training telegrams and ``num_queries`` held-out ones."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < num + num_queries:
        text = _telegram(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out[:num], out[num:]


def make_memorization_corpus(
    num_people: int = 40,
    *,
    copies: tuple[int, ...] = (1, 2, 4, 8, 16),
    canaries_per_level: int = 4,
    canary_words: int = 20,
    near_edits: tuple[int, ...] = (2, 5),
    paraphrases: bool = True,
    related_per_topic: int = 16,
    style_docs: int = 48,
    style_queries: int = 8,
    seed: int = 0,
) -> MemorizationCorpus:
    """Generate the corpus deterministically from ``seed``.

    Args:
        num_people: People of the biography background (4 facts each, 2-4 documents each).
        copies: Exact-duplicate counts; ``canaries_per_level`` canaries get each count.
        canaries_per_level: Canaries per duplicate count (their topics cycle through
            :data:`TOPICS`).
        canary_words: Words per canary (and per related document).
        near_edits: One near-duplicate per canary for each number of substituted words.
        paraphrases: Add one synonym paraphrase per canary.
        related_per_topic: Related documents per topic.
        style_docs: Telegram-style documents.
        style_queries: Held-out telegrams (``style_queries`` of the result).
        seed: Seed of every random choice.
    """
    _check(tuple(copies), tuple(near_edits), canary_words)
    rng = random.Random(seed)
    bios = make_biographies(num_people, seed=seed)
    docs: list[tuple[str, str, int, str, int]] = [  # (text, kind, canary, topic, edits)
        (t, "biography", -1, "", 0) for t in bios.texts
    ]
    canaries: list[Canary] = []
    for level in copies:
        for _ in range(canaries_per_level):
            topic = list(TOPICS)[len(canaries) % len(TOPICS)]
            seq = [rng.choice([w for w, _ in TOPICS[topic]]) for _ in range(canary_words)]
            canaries.append(Canary(len(canaries), topic, " ".join(seq), level))
            docs += _family(canaries[-1], seq, near_edits, paraphrases, rng)
    for topic, pairs in TOPICS.items():
        vocab = [w for pair in pairs for w in pair]
        for _ in range(related_per_topic):
            text = " ".join(rng.choice(vocab) for _ in range(canary_words))
            docs.append((text, "related", -1, topic, 0))
    train, held_out = _telegrams(style_docs, style_queries, rng)
    docs += [(t, "style", -1, "", 0) for t in train]
    return _assemble(docs, bios.doc_fact, bios.facts, canaries, held_out, rng)


def _family(canary: Canary, seq: list[str], near_edits, paraphrases: bool, rng: random.Random):
    """The canary's copies, near-duplicates and paraphrase as ``(text, kind, id, topic, edits)``."""
    primary = [w for w, _ in TOPICS[canary.topic]]
    cid, topic = canary.canary_id, canary.topic
    docs = [(canary.text, "canary", cid, topic, 0)] * canary.copies
    for e in near_edits:
        docs.append((" ".join(_substitute(seq, e, primary, rng)), "near_duplicate", cid, topic, e))
    if paraphrases:
        synonym = dict(TOPICS[topic])
        docs.append((" ".join(synonym[w] for w in seq), "paraphrase", cid, topic, 0))
    return docs


def _assemble(docs, doc_fact, facts, canaries, held_out, rng) -> MemorizationCorpus:
    """Shuffle the documents and point the facts' ``doc_ids`` at their new positions."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    new_pos = {old: new for new, old in enumerate(order)}
    shuffled = [docs[i] for i in order]
    fact_docs: list[list[int]] = [[] for _ in facts]
    for old, fact_id in enumerate(doc_fact):  # biographies come first in ``docs``
        fact_docs[fact_id].append(new_pos[old])
    facts = [
        Fact(f.fact_id, f.person, f.relation, f.value, f.query, f.answer, tuple(sorted(d)))
        for f, d in zip(facts, fact_docs, strict=True)
    ]
    return MemorizationCorpus(
        texts=[d[0] for d in shuffled],
        kinds=[d[1] for d in shuffled],
        canary_of=[d[2] for d in shuffled],
        topic_of=[d[3] for d in shuffled],
        edits=[d[4] for d in shuffled],
        canaries=canaries,
        facts=facts,
        style_queries=held_out,
    )
