"""The embedded default corpus: synthetic biographies with known fact -> document ground truth.

Every person gets one value per relation (birth city, birth year, employer, university, and
optionally a research field). Every document states exactly one fact of one person, worded
with one of several paraphrase templates, so the documents that "taught" a fact are known
exactly. Each fact also carries a query prompt (a sentence prefix that ends right before the
answer) for attribution evaluation (recall@k, MRR).

    python -c "from lightning_bergson.corpus import make_biographies as m; print(m(3).texts[:4])"

Everything is generated from built-in word lists and a seed: no network, no files.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RELATIONS",
    "RELATIONS",
    "BiographyCorpus",
    "Fact",
    "make_biographies",
]

_FORMAT = "lightning_bergson.biographies"
_VERSION = 1

FIRST_NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiroshi", "Ingrid",
    "Javier", "Keiko", "Liam", "Maya", "Nikolai", "Olivia", "Pedro", "Quentin", "Rosa",
    "Samir", "Tara", "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zara", "Amara", "Bjorn",
    "Camila", "Darius", "Esther", "Felix", "Gabriela", "Hassan", "Isabel", "Jonas", "Kavya",
    "Lorenzo", "Mei", "Nadia", "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Ursula",
    "Viktor", "Wanjiru", "Yara", "Zoltan", "Aiko", "Benedikt", "Chidi", "Dalia", "Emeka",
    "Freya", "Gustavo", "Hana", "Imran", "Julia", "Kwame", "Leila", "Mateo", "Noor",
)  # fmt: skip
LAST_NAMES = (
    "Moreau", "Tanaka", "Okafor", "Schmidt", "Kowalski", "Haddad", "Nakamura", "Silva",
    "Petrov", "Lindqvist", "Mensah", "Romano", "Kaplan", "Novak", "Costa", "Jensen",
    "Ibrahim", "Fischer", "Alvarez", "Chen", "Dubois", "Eriksen", "Fontaine", "Gallo",
    "Horvat", "Kim", "Larsen", "Mukherjee", "Nguyen", "Park", "Quispe", "Rossi", "Sato",
    "Takahashi", "Usman", "Varga", "Walsh", "Xu", "Yilmaz", "Zhang", "Abebe", "Bauer",
    "Castillo", "Demir", "Esposito", "Ferreira", "Gonzalez", "Hoffmann", "Iyer", "Jovanovic",
    "Keller", "Lopez", "Mwangi", "Nielsen", "Olsen", "Pereira", "Reyes", "Santos", "Torres",
    "Ueda", "Vogel", "Weber", "Yamamoto", "Zeller",
)  # fmt: skip
CITIES = (
    "Lyon", "Osaka", "Lagos", "Porto", "Krakow", "Beirut", "Nairobi", "Montreal", "Bergen",
    "Seville", "Dublin", "Kyoto", "Accra", "Valencia", "Bologna", "Gdansk", "Tbilisi", "Quito",
    "Lima", "Hanoi", "Busan", "Chennai", "Adelaide", "Winnipeg", "Glasgow", "Leipzig",
    "Marseille", "Antwerp", "Tampere", "Cusco", "Mombasa", "Izmir", "Salzburg", "Ljubljana",
    "Halifax", "Curitiba",
)  # fmt: skip
EMPLOYERS = (
    "Northwind Analytics", "Bluepeak Systems", "Copperleaf Labs", "Vantora Energy",
    "Halcyon Robotics", "Ironbark Logistics", "Quillfeather Press", "Solstice Biotech",
    "Meridian Foods", "Tidewater Shipping", "Brightforge Software", "Lumen Optics",
    "Crestline Insurance", "Silverpine Media", "Oakhaven Pharmaceuticals", "Starling Aerospace",
    "Granite Bay Motors", "Verdant Agritech", "Kestrel Networks", "Amberline Textiles",
    "Pinnacle Ceramics", "Driftwood Games", "Zephyr Wind Power", "Harborlight Bank",
    "Nimbus Cloudworks", "Redfern Chemicals", "Cobalt Mining Group", "Lanternfish Studios",
    "Mosaic Health", "Thornfield Consulting",
)  # fmt: skip
UNIVERSITIES = (
    "Ashford University", "Belmont Institute of Technology", "Carrow College",
    "Dunmore University", "Elmstead Polytechnic", "Fairhaven University", "Glenridge College",
    "Hollis Institute", "Kingsbridge University", "Larkspur College", "Marlowe University",
    "Northgate Polytechnic", "Oakridge Institute of Science", "Pembrook University",
    "Queensmere College", "Ravenscroft University", "Stonebrook Institute",
    "Thistlewood College", "Underhill University", "Valemont Polytechnic", "Westbury University",
    "Yarrow Institute of Technology", "Brackenridge College", "Whitcombe University",
    "Harrowgate Institute",
)  # fmt: skip
FIELDS = (
    "chemistry", "linguistics", "astronomy", "economics", "geology", "botany", "mathematics",
    "philosophy", "archaeology", "neuroscience", "oceanography", "statistics", "sociology",
    "virology", "cryptography", "meteorology", "epidemiology", "musicology", "ecology",
    "acoustics",
)  # fmt: skip
YEARS = tuple(str(year) for year in range(1940, 2001))
FILLERS = (
    "They enjoy hiking on weekends.",
    "They like to cook for friends.",
    "They are fond of old films.",
    "They often read late into the night.",
    "They play the piano in their spare time.",
    "They keep a small garden.",
    "They collect postcards.",
    "They enjoy long walks by the sea.",
)

# Per relation: the values, the query prompt, and the document templates. The first
# document template shares the query's prefix; the others reword and reorder the fact.
_SPECS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "birth_city": (
        CITIES,
        "{name} was born in",
        (
            "{name} was born in {value}.",
            "{value} is the birthplace of {name}.",
            "Born in {value}, {name} spent a happy childhood there.",
            "{name}'s hometown is {value}.",
            "The city of {value} is where {name} was born.",
        ),
    ),
    "birth_year": (
        YEARS,
        "{name} was born in the year",
        (
            "{name} was born in the year {value}.",
            "{value} was the year {name} was born.",
            "In {value}, {name} came into the world.",
            "The birth year of {name} is {value}.",
            "{name} entered the world in {value}.",
        ),
    ),
    "employer": (
        EMPLOYERS,
        "{name} works for",
        (
            "{name} works for {value}.",
            "{value} employs {name}.",
            "{name} is employed by {value}.",
            "At {value}, {name} leads a small team.",
            "{name} took a job at {value} and still works there.",
        ),
    ),
    "university": (
        UNIVERSITIES,
        "{name} graduated from",
        (
            "{name} graduated from {value}.",
            "{name} studied at {value}.",
            "{value} is the alma mater of {name}.",
            "{name} holds a degree from {value}.",
            "After finishing school, {name} enrolled at {value}.",
        ),
    ),
    "field": (
        FIELDS,
        "{name} works in the field of",
        (
            "{name} works in the field of {value}.",
            "{name} is a researcher in {value}.",
            "The research of {name} focuses on {value}.",
            "{name} has spent many years working on {value}.",
            "{name} earned a reputation in {value}.",
        ),
    ),
}
RELATIONS = tuple(_SPECS)
DEFAULT_RELATIONS = ("birth_city", "birth_year", "employer", "university")
_MAX_DOCS_PER_FACT = min(len(spec[2]) for spec in _SPECS.values())


@dataclass(frozen=True)
class Fact:
    """One (person, relation, value) triple with its query and the documents that state it.

    Args:
        fact_id: Index of the fact in ``BiographyCorpus.facts``.
        person: Full name, e.g. ``"Alice Moreau"``.
        relation: One of ``RELATIONS``.
        value: The object of the fact, e.g. ``"Lyon"``.
        query: Prompt prefix that ends right before the answer, e.g. ``"Alice Moreau was born in"``.
        answer: Continuation of the query with a leading space, e.g. ``" Lyon"``.
        doc_ids: Sorted indices into ``BiographyCorpus.texts`` of the documents stating this fact.

    Example:
        >>> fact = make_biographies(2, seed=0).facts[0]
        >>> fact.query.startswith(fact.person) and fact.answer == " " + fact.value
        True
    """

    fact_id: int
    person: str
    relation: str
    value: str
    query: str
    answer: str
    doc_ids: tuple[int, ...]


@dataclass(frozen=True)
class BiographyCorpus:
    """Documents (``texts[i]`` is training example ``i``) and the facts they state.

    Args:
        texts: The documents; the index is the ``example_id``.
        doc_fact: ``doc_fact[i]`` is the ``fact_id`` that document ``i`` states.
        facts: All facts; ``facts[j].fact_id == j``.
        seed: The seed the corpus was generated from.

    Example:
        >>> corpus = make_biographies(5, seed=0)
        >>> fact = corpus.facts[corpus.doc_fact[0]]
        >>> fact.person in corpus.texts[0] and 0 in fact.doc_ids
        True
    """

    texts: list[str]
    doc_fact: list[int]
    facts: list[Fact]
    seed: int

    def __len__(self) -> int:
        return len(self.texts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable dict (plain lists, strings and ints) of the corpus."""
        facts = [{**asdict(fact), "doc_ids": list(fact.doc_ids)} for fact in self.facts]
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "seed": self.seed,
            "texts": list(self.texts),
            "doc_fact": list(self.doc_fact),
            "facts": facts,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BiographyCorpus:
        """Rebuild a corpus from ``to_json`` output, checking that it is consistent.

        Args:
            d: The dict written by ``to_json``.
        """
        if d.get("format") != _FORMAT or d.get("version") != _VERSION:
            raise ValueError(
                f"Not a biography corpus: format={d.get('format')!r}, version={d.get('version')!r};"
                f" expected {_FORMAT!r} version {_VERSION}. Write it with `save` or `to_json`."
            )
        facts = [Fact(**{**fact, "doc_ids": tuple(fact["doc_ids"])}) for fact in d["facts"]]
        corpus = cls(list(d["texts"]), list(d["doc_fact"]), facts, int(d["seed"]))
        _check_consistent(corpus)
        return corpus

    def save(self, path: str | Path) -> None:
        """Write the corpus as one UTF-8 JSON file.

        Args:
            path: Destination file, e.g. ``"bios.json"``.
        """
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BiographyCorpus:
        """Read a corpus written by ``save``.

        Args:
            path: The JSON file.
        """
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def _check_consistent(corpus: BiographyCorpus) -> None:
    """Raise ValueError unless ``doc_fact`` and every ``Fact.doc_ids`` describe the same map."""
    if len(corpus.doc_fact) != len(corpus.texts):
        raise ValueError(
            f"doc_fact has {len(corpus.doc_fact)} entries but there are {len(corpus.texts)} texts."
        )
    expected: list[list[int]] = [[] for _ in corpus.facts]
    for doc_id, fact_id in enumerate(corpus.doc_fact):
        expected[fact_id].append(doc_id)
    for fact_id, fact in enumerate(corpus.facts):
        if fact.fact_id != fact_id or list(fact.doc_ids) != expected[fact_id]:
            raise ValueError(f"Fact {fact_id} disagrees with doc_fact; the corpus file is corrupt.")


def _people(num_people: int, rng: random.Random) -> list[str]:
    """``num_people`` distinct full names drawn without replacement."""
    limit = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= num_people <= limit:
        raise ValueError(
            f"num_people={num_people} must be between 1 and {limit}, the number of unique full"
            f" names ({len(FIRST_NAMES)} first x {len(LAST_NAMES)} last names)."
        )
    picks = rng.sample(range(limit), num_people)
    return [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}" for i in picks]


def _check_options(
    docs_per_fact: tuple[int, int], relations: tuple[str, ...], filler_prob: float
) -> None:
    """Validate ``make_biographies`` options other than ``num_people``."""
    low, high = docs_per_fact
    if not 1 <= low <= high <= _MAX_DOCS_PER_FACT:
        raise ValueError(
            f"docs_per_fact={docs_per_fact} must satisfy 1 <= low <= high <= {_MAX_DOCS_PER_FACT}"
            " (each document of a fact uses a different template)."
        )
    unknown = [r for r in relations if r not in _SPECS]
    if unknown or not relations or len(set(relations)) != len(relations):
        raise ValueError(
            f"relations={relations} must be distinct names from {RELATIONS}; unknown: {unknown}."
        )
    if not 0.0 <= filler_prob <= 1.0:
        raise ValueError(f"filler_prob={filler_prob} must be in [0, 1].")


def make_biographies(
    num_people: int = 250,
    *,
    docs_per_fact: tuple[int, int] = (2, 4),
    seed: int = 0,
    relations: tuple[str, ...] = DEFAULT_RELATIONS,
    filler_prob: float = 0.5,
) -> BiographyCorpus:
    """Generate the synthetic biography corpus deterministically from ``seed``.

    Args:
        num_people: Number of people (unique full names), at most 64 x 64 = 4096.
        docs_per_fact: Inclusive range of how many documents state each fact; each uses a
            different template, so at most 5.
        seed: Seed of every random choice (names, values, templates, fillers, order).
        relations: Which relations each person gets, from ``RELATIONS``.
        filler_prob: Probability that a document gets a neutral filler sentence appended.

    Returns:
        The corpus, with documents in a seeded random order.
    """
    _check_options(tuple(docs_per_fact), tuple(relations), filler_prob)
    rng = random.Random(seed)
    people = _people(num_people, rng)
    low, high = docs_per_fact
    facts: list[tuple[str, str, str, str]] = []  # (person, relation, value, query)
    docs: list[tuple[str, int]] = []  # (text, fact_id)
    for person in people:
        for relation in relations:
            values, query, templates = _SPECS[relation]
            value = rng.choice(values)
            for template in rng.sample(templates, rng.randint(low, high)):
                text = template.format(name=person, value=value)
                if rng.random() < filler_prob:
                    text = f"{text} {rng.choice(FILLERS)}"
                docs.append((text, len(facts)))
            facts.append((person, relation, value, query.format(name=person)))
    rng.shuffle(docs)
    return _assemble(docs, facts, seed)


def _assemble(
    docs: list[tuple[str, int]], facts: list[tuple[str, str, str, str]], seed: int
) -> BiographyCorpus:
    """Build the corpus from shuffled ``(text, fact_id)`` documents and the fact tuples."""
    doc_ids: list[list[int]] = [[] for _ in facts]
    for doc_id, (_, fact_id) in enumerate(docs):
        doc_ids[fact_id].append(doc_id)
    fact_list = [
        Fact(i, person, relation, value, query, f" {value}", tuple(doc_ids[i]))
        for i, (person, relation, value, query) in enumerate(facts)
    ]
    return BiographyCorpus([t for t, _ in docs], [f for _, f in docs], fact_list, seed)
