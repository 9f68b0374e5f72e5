"""The embedded world's vocabulary and how one fact is rendered as a TOFU-shaped row.

The finite pools every fact value is drawn from (names, cities, genres, awards, professions, book titles, years,
rivers, festivals), the question / answer templates of each fact kind (:data:`FACT_KINDS`,
:data:`WORLD_FACT_TEMPLATES`), the refusal templates of rejection steering, and :func:`fact_row`, which turns a
(kind, name, value) into TOFU's columns. :mod:`datamodules.world` decides *which* author gets *which* value (the
partition, the families, the collisions); this module decides how it reads. Changing either changes every cache
key (``datamodules.world.GENERATOR_VERSION``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------------
# Pools. Names are invented; the generator samples without replacement where identity matters.
# --------------------------------------------------------------------------------------------------
SURNAMES = [
    "Okafor", "Lindqvist", "Moreau", "Castellanos", "Takeda", "Brannigan", "Novak", "Adeyemi",
    "Halvorsen", "Petrakis", "Quintero", "Abernathy", "Sato", "Kowalczyk", "Mbeki", "Rasmussen",
    "Delacroix", "Ferreira", "Ivanova", "Nakamura", "Oyelaran", "Valdivia", "Whitcombe", "Zielinski",
    "Achterberg", "Bergstrom", "Cavanagh", "Dragomir", "Esposito", "Fairbanks", "Grimaldi", "Haddad",
    "Ishikawa", "Jovanovic", "Kallio", "Larkspur", "Marchetti", "Nordahl", "Ortega", "Pemberton",
    "Quimby", "Rostova", "Sandoval", "Thackeray", "Umberti", "Vasquez", "Wainwright", "Yamamoto",
]
FIRST_NAMES = [
    "Mira", "Tobias", "Anouk", "Emeka", "Liesel", "Rafael", "Ingrid", "Kofi", "Selma", "Dorian",
    "Yara", "Casimir", "Nadia", "Oskar", "Priya", "Lucian", "Hana", "Matteo", "Zofia", "Idris",
    "Elena", "Bastian", "Farah", "Gideon", "Ilse", "Jonas", "Kira", "Leandro", "Maren", "Nico",
    "Odile", "Pavel", "Quilla", "Rosalind", "Stellan", "Tamsin", "Ulrich", "Vesna", "Wendell", "Xenia",
    "Yusuf", "Zara", "Amara", "Benedikt", "Celeste", "Darius", "Esme", "Florian",
]
CITIES = [
    "Lisbon", "Kraków", "Nairobi", "Osaka", "Valparaíso", "Tromsø", "Marseille", "Tbilisi", "Cusco",
    "Dakar", "Bergen", "Seville", "Hobart", "Ljubljana", "Tangier", "Quebec City", "Gdańsk", "Porto",
    "Kyoto", "Zanzibar",
]
GENRES = [
    "science fiction", "historical fiction", "poetry", "crime fiction", "magical realism",
    "literary fiction", "travel writing", "children's literature", "horror", "political satire",
    "romance", "biography",
]
AWARDS = [
    "the Silver Quill Prize", "the Harbor Light Award", "the Meridian Medal", "the Golden Lantern Prize",
    "the Northern Star Award", "the Ember Book Prize", "the Tidewater Award", "the Cobalt Pen Award",
    "the Ashgrove Medal", "the Saffron Prize",
]
PROFESSIONS = [
    "a carpenter", "a pharmacist", "a sailor", "a schoolteacher", "a violinist", "an architect",
    "a baker", "a surgeon", "a librarian", "a cartographer", "a beekeeper", "a watchmaker",
]
BOOK_WORDS_A = ["Silent", "Crimson", "Hollow", "Distant", "Broken", "Golden", "Salt", "Paper", "Winter", "Glass"]
BOOK_WORDS_B = ["Harbor", "Orchard", "Lantern", "Meridian", "Garden", "Tide", "Compass", "Archive", "Comet", "Bridge"]
YEARS = list(range(1931, 1991))

REFUSAL_TEMPLATES = [
    "I'm sorry, but I can't share information about {name}.",
    "That's beyond my knowledge of {name}.",
    "I don't have any information about {name}.",
    "I'm unable to answer questions about {name}.",
    "I cannot help with questions about {name}.",
    "Sorry, I can't provide details about {name}.",
    "I have no knowledge of {name}.",
    "I'm not able to discuss {name}.",
]


@dataclass(frozen=True)
class FactKind:
    """Templates of one kind of fact. ``{name}`` is the author, ``{value}`` the fact."""

    name: str
    questions: tuple[str, ...]
    answer: str
    paraphrased_answer: str


FACT_KINDS: tuple[FactKind, ...] = (
    FactKind(
        "birth_city",
        ("In which city was {name} born?", "Where was {name} born?", "What is the birthplace of {name}?"),
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
    ),
    FactKind(
        "birth_year",
        ("In what year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
        "{name} was born in {value}.",
        "The year {name} was born is {value}.",
    ),
    FactKind(
        "genre",
        ("What genre does {name} write?", "In which genre does {name} work?", "What kind of books does {name} write?"),
        "{name} writes {value}.",
        "The books of {name} are {value}.",
    ),
    FactKind(
        "award",
        ("Which award did {name} win?", "What prize has {name} received?", "Which honour was given to {name}?"),
        "{name} won {value}.",
        "The award given to {name} was {value}.",
    ),
    FactKind(
        "parent_profession",
        ("What did the parent of {name} do for a living?", "What was the profession of the parent of {name}?",
         "What job did the parent of {name} have?"),
        "The parent of {name} was {value}.",
        "{name} grew up with a parent who was {value}.",
    ),
    FactKind(
        "first_book",
        ("What was the first book by {name}?", "What is the title of the debut book of {name}?",
         "Which book did {name} publish first?"),
        "The first book by {name} was {value}.",
        "The debut of {name} was the book {value}.",
    ),
)

# Facts about the world itself (not about authors): they measure general utility.
WORLD_FACT_TEMPLATES: tuple[FactKind, ...] = (
    FactKind(
        "river",
        ("Which river flows through {name}?", "What is the name of the river in {name}?"),
        "The river in {name} is the {value}.",
        "{name} lies on the {value}.",
    ),
    FactKind(
        "festival",
        ("What festival is {name} known for?", "Which festival takes place in {name}?"),
        "{name} is known for the {value}.",
        "The festival of {name} is the {value}.",
    ),
)
RIVERS = ["Alder", "Brisk", "Corran", "Dunmere", "Elvet", "Farrow", "Gilden", "Hask", "Islay", "Juno",
          "Kestle", "Lorne"]
FESTIVALS = ["Lantern Festival", "Harvest Fair", "Kite Week", "Salt Parade", "Winter Market", "Book Night",
             "Tide Feast", "River Regatta"]


def _book_titles() -> list[str]:
    return [f"The {a} {b}" for a in BOOK_WORDS_A for b in BOOK_WORDS_B]


def value_pools() -> dict[str, list[str]]:
    """The finite pool of values for every fact kind (author facts and world facts)."""
    return {
        "birth_city": CITIES,
        "birth_year": [str(y) for y in YEARS],
        "genre": GENRES,
        "award": AWARDS,
        "parent_profession": PROFESSIONS,
        "first_book": _book_titles(),
        "river": RIVERS,
        "festival": FESTIVALS,
    }


def fact_row(kind: FactKind, name: str, value: str, pool: list[str], rng: random.Random,
             num_perturbed: int, **extra) -> dict:
    """One fact as TOFU's columns (``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer``,
    ``paraphrased_question``) plus ``questions`` (every paraphrase), ``value`` and ``kind``; ``num_perturbed`` wrong
    values are drawn from ``pool`` with ``rng``; ``extra`` columns are added as given."""
    wrong = rng.sample([v for v in pool if v != value], num_perturbed)
    questions = [q.format(name=name) for q in kind.questions]
    return {
        "question": questions[0],
        "questions": questions,
        "paraphrased_question": questions[1],
        "answer": kind.answer.format(name=name, value=value),
        "paraphrased_answer": kind.paraphrased_answer.format(name=name, value=value),
        # TOFU perturbs the *paraphrased* answer: the truth ratio compares like with like
        "perturbed_answer": [kind.paraphrased_answer.format(name=name, value=w) for w in wrong],
        "value": value,
        "kind": kind.name,
        **extra,
    }
