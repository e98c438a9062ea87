"""``dataset=tagging_corpus``: the built-in, generated tagging corpus (no download).

Sentences come from a small probabilistic grammar of English-like clauses, and every
word carries three related tag layers, the CoNLL-2003 trio:

- ``pos``: part of speech (Penn-style tags: DT, JJ, NN, NNS, NNP, VBD, VBZ, IN, CC, ...);
  token accuracy.
- ``chunk``: phrase chunks in BIO (``B-NP``, ``I-NP``, ``B-VP``, ``B-PP``, ``O``);
  chunk F1.
- ``ner``: named entities in BIO (``PER``, ``LOC``, ``ORG``); entity F1.
- ``tense`` (sentence-level, not selected by default): ``past`` or ``present``, read from
  the verbs; a sequence-classification task on the pooled ``[CLS]`` position.

The layers share structure (an entity is a proper-noun noun phrase, a phrase's head
decides its chunk) and context decides what the words alone do not: some names are
people or places (``Jordan``, ``Austin``, ``Lincoln``), told apart by the preposition or
verb around them; some words are nouns or verbs (``report``, ``plans``); a name followed
by ``Corp`` or ``Bank`` is an organisation. So the tasks help each other and none is
solved by a lookup. Each split has its own seed stream, so ``num_train`` does not change
the validation or test sentences.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mtl_runner.data.base import TaskSet
from mtl_runner.data.text import Example, text_taskset, tokenizer_for
from mtl_runner.errors import ConfigError
from mtl_runner.tasks import Task

FIRST_NAMES = ("Anna", "Ben", "Clara", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas")
SURNAMES = ("Berg", "Okafor", "Silva", "Novak", "Tanaka", "Moreau", "Larsen", "Haddad")
PLACES = ("Paris", "Oslo", "Lagos", "Lima", "Kyoto", "Quebec", "Madrid", "Cairo")
TWO_WORD_PLACES = (("New", "York"), ("San", "Diego"), ("Hong", "Kong"), ("Buenos", "Aires"))
#: Names that are a person or a place; the context decides.
AMBIGUOUS_NAMES = ("Jordan", "Austin", "Lincoln", "Florence", "Victoria", "Chester")
ORG_STEMS = ("Acme", "Northwind", "Globex", "Initech", "Vortex", "Summit")
ORG_SUFFIXES = ("Corp", "Bank", "Group", "Labs")
DETERMINERS = ("the", "a", "this", "every")
ADJECTIVES = ("small", "old", "red", "quiet", "famous", "new", "local")
NOUNS = ("report", "market", "dog", "bridge", "team", "plan", "letter", "museum", "river", "song")
PLURALS = ("reports", "markets", "dogs", "bridges", "teams", "plans", "letters", "songs")
#: (past, present 3rd person) forms; "reports" and "plans" are also plural nouns.
VERBS = (("visited", "visits"), ("praised", "praises"), ("reported", "reports"), ("planned", "plans"),
         ("sold", "sells"), ("met", "meets"), ("left", "leaves"), ("joined", "joins"))
SPEECH_VERBS = (("said", "says"), ("announced", "announces"))
PLACE_PREPOSITIONS = ("in", "near", "from", "to")
OTHER_PREPOSITIONS = ("with", "for", "about")

#: Every tag the grammar writes, so a task's outputs do not depend on the sample drawn.
TAGS = {
    "pos": (",", ".", "DT", "IN", "JJ", "NN", "NNP", "NNS", "VBD", "VBZ"),
    "chunk": ("B-NP", "I-NP", "B-PP", "B-VP", "O"),
    "ner": ("B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER", "O"),
}
TASKS = ("pos", "chunk", "ner", "tense")
DEFAULT_TASKS = ("pos", "chunk", "ner")

Word = tuple[str, str, str, str]  # word, pos, chunk, ner


def tagging_corpus(
    tasks: Sequence[str] = DEFAULT_TASKS,
    num_train: int = 2000,
    num_val: int = 400,
    num_test: int = 400,
    seed: int = 0,
    max_length: int = 64,
    truncation: str = "truncate",
    tokenizer: str = "words",
) -> TaskSet:
    """Generate the three splits and encode them with the word vocabulary of the training
    split (``tokenizer=words``) or a HuggingFace model's tokenizer (its name)."""
    for key, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if value < 1:
            raise ConfigError(f"dataset.{key} must be >= 1, got {value}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"dataset.tasks: unknown task {unknown[0] if unknown else '(none)'}; allowed: {', '.join(TASKS)}")
    splits = {
        name: [_sentence(rng) for _ in range(n)]
        for offset, (name, n) in enumerate((("train", num_train), ("val", num_val), ("test", num_test)))
        for rng in [random.Random(seed * 3 + offset)]
    }
    chosen = [_task(name) for name in tasks]
    return text_taskset("tagging_corpus", chosen, splits, tokenizer_for(tokenizer, splits["train"]), max_length, truncation)


def _task(name: str) -> Task:
    if name == "tense":
        return Task("tense", "classification", 2, class_names=("past", "present"))
    return Task(name, "tagging" if name == "pos" else "spans", len(TAGS[name]), class_names=TAGS[name])


def _sentence(rng: random.Random) -> Example:
    """``[PP ,] NP VP [PP] .`` or ``NP said NP VP .``; the tense is drawn per sentence."""
    past = rng.random() < 0.5
    words: list[Word] = []
    if rng.random() < 0.2:
        words += _place_phrase(rng) + [(",", ",", "O", "O")]
    words += _noun_phrase(rng, subject=True)
    if rng.random() < 0.25:
        words += _verb(rng, SPEECH_VERBS, past) + _noun_phrase(rng, subject=True)
    words += _verb(rng, VERBS, past) + _noun_phrase(rng, subject=False)
    if rng.random() < 0.6:
        words += _place_phrase(rng) if rng.random() < 0.6 else _other_phrase(rng)
    words.append((".", ".", "O", "O"))
    return Example(
        words=[w for w, *_ in words],
        tags={"pos": [p for _, p, _, _ in words], "chunk": [c for *_, c, _ in words], "ner": [n for *_, n in words]},
        labels={"tense": "past" if past else "present"},
    )


def _phrase(words: Sequence[tuple[str, str]], chunk: str, entity: str | None = None) -> list[Word]:
    """Words with their POS tags as one chunk (and one entity, when ``entity`` is given)."""
    return [
        (w, pos, f"{'B' if i == 0 else 'I'}-{chunk}", f"{'B' if i == 0 else 'I'}-{entity}" if entity else "O")
        for i, (w, pos) in enumerate(words)
    ]


def _person(rng: random.Random) -> list[Word]:
    choice = rng.random()
    if choice < 0.4:
        names = [rng.choice(FIRST_NAMES), rng.choice(SURNAMES)]
    elif choice < 0.7:
        names = [rng.choice(SURNAMES)]
    else:
        names = [rng.choice(AMBIGUOUS_NAMES)]
    return _phrase([(n, "NNP") for n in names], "NP", "PER")


def _place(rng: random.Random) -> list[Word]:
    choice = rng.random()
    if choice < 0.4:
        names: Sequence[str] = [rng.choice(PLACES)]
    elif choice < 0.65:
        names = rng.choice(TWO_WORD_PLACES)
    else:
        names = [rng.choice(AMBIGUOUS_NAMES)]
    return _phrase([(n, "NNP") for n in names], "NP", "LOC")


def _organisation(rng: random.Random) -> list[Word]:
    stem = rng.choice(ORG_STEMS + AMBIGUOUS_NAMES[:2])
    determiner = [("the", "DT")] if rng.random() < 0.3 else []
    words = [(stem, "NNP"), (rng.choice(ORG_SUFFIXES), "NNP")]
    tagged = _phrase(determiner + words, "NP")
    return [(w, p, c, "O") for w, p, c, _ in tagged[: len(determiner)]] + [
        (w, p, c, f"{'B' if i == 0 else 'I'}-ORG") for i, (w, p, c, _) in enumerate(tagged[len(determiner) :])
    ]


def _common(rng: random.Random) -> list[Word]:
    plural = rng.random() < 0.3
    words = [] if plural and rng.random() < 0.5 else [("the", "DT") if plural else (rng.choice(DETERMINERS), "DT")]
    words += [(rng.choice(ADJECTIVES), "JJ") for _ in range(rng.choice((0, 0, 1, 2)))]
    words.append((rng.choice(PLURALS), "NNS") if plural else (rng.choice(NOUNS), "NN"))
    return _phrase(words, "NP")


def _noun_phrase(rng: random.Random, *, subject: bool) -> list[Word]:
    draw = rng.random()
    if draw < (0.35 if subject else 0.25):
        return _person(rng)
    if draw < 0.55:
        return _organisation(rng)
    if not subject and draw < 0.7:
        return _place(rng)
    return _common(rng)


def _verb(rng: random.Random, verbs: Sequence[tuple[str, str]], past: bool) -> list[Word]:
    form = rng.choice(verbs)
    return _phrase([(form[0], "VBD") if past else (form[1], "VBZ")], "VP")


def _place_phrase(rng: random.Random) -> list[Word]:
    return _phrase([(rng.choice(PLACE_PREPOSITIONS), "IN")], "PP") + _place(rng)


def _other_phrase(rng: random.Random) -> list[Word]:
    return _phrase([(rng.choice(OTHER_PREPOSITIONS), "IN")], "PP") + (_person(rng) if rng.random() < 0.5 else _common(rng))
