"""The world set's question phrasings (world_templates.QUESTIONS): fast checks without a build.

Train asks each fact in a sample of its relation's training phrasings, so every phrasing must fill the slots
its facts have, ask one relation only, never name an entity in its own words (the builder would drop it from
train whenever that entity is held out) and keep the held-out last phrasing unseen.
"""

from __future__ import annotations

import string
from collections import defaultdict

import pytest

from rag_lightning.config import WorldOptions
from rag_lightning.data import world
from rag_lightning.data.world import _words, load_entities, mentions
from rag_lightning.data.world_gen import referring_question
from rag_lightning.data.world_sources import fold
from rag_lightning.data.world_templates import ORIGINAL_PHRASINGS, QUESTIONS, Entity


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _words_outside_slots(template: str) -> str:
    return " ".join(literal for literal, _, _, _ in string.Formatter().parse(template))


@pytest.fixture(scope="module")
def entities() -> list[Entity]:
    """Every entity of the default world set (about 3 s: no passages, no splits)."""
    return load_entities(WorldOptions())


def test_every_relation_has_eleven_to_sixteen_training_phrasings_and_its_held_out_one() -> None:
    """Nine were written per relation, and seven more in format 6; those too close to a test_paraphrase
    phrasing were taken out of training (tests/test_world_paraphrase.py checks that none is left), leaving
    eleven to sixteen."""
    for relation, phrasings in QUESTIONS.items():
        assert 12 <= len(phrasings) <= 17, relation
        assert len({fold(p) for p in phrasings}) == len(phrasings), f"{relation}: a phrasing repeats"
        assert all(p[-1] in "?." and p == p.strip() for p in phrasings), relation
    assert ORIGINAL_PHRASINGS == (0, 1, -1)


def test_every_phrasing_fills_exactly_the_slots_of_its_relations_facts(entities: list[Entity]) -> None:
    slots_of: dict[str, set[frozenset[str]]] = defaultdict(set)
    for entity in entities:
        for fact in entity.facts:
            slots_of[fact.relation].add(frozenset(fact.slots))
    assert set(slots_of) == set(QUESTIONS)  # every relation is asked, no phrasing is for nothing
    for relation, phrasings in QUESTIONS.items():
        for template in phrasings:
            for slots in slots_of[relation]:
                assert _slots(template) <= slots, (relation, template)
                # the question names its subject: the one slot that is not the answer's
                assert _slots(template) == _slots(phrasings[0]), (relation, template)


def test_no_two_relations_ask_the_same_question_about_one_entity() -> None:
    """Every slot filled with the same name: a text that two relations produce would ask two facts at once."""
    asked: dict[str, set[str]] = defaultdict(set)
    for relation, phrasings in QUESTIONS.items():
        for template in phrasings:
            text = template.format(**{slot: "Xanadu" for slot in _slots(template)})
            asked[fold(text)].add(relation)
    assert {text: rels for text, rels in asked.items() if len(rels) > 1} == {}


def test_no_phrasing_names_an_entity_in_its_own_words(entities: list[Entity]) -> None:
    """A phrasing's words outside its slots must not be an entity's name ("Split", "Nice", "Batman" are
    cities): train would lose every question in that phrasing when the entity is held out."""
    names = {_words(e.name) for e in entities} | {_words(e.title) for e in entities}
    longest = max(len(n) for n in names)
    naming = [
        (relation, template)
        for relation, phrasings in QUESTIONS.items()
        for template in phrasings
        if mentions(_words_outside_slots(template), names, longest)
    ]
    assert naming == []


def test_city_questions_say_city_so_they_never_read_as_country_questions() -> None:
    for relation in ("city_country", "city_population", "city_timezone"):
        assert all("city" in p.casefold().split() for p in QUESTIONS[relation]), relation


def test_the_dialogue_refers_back_in_every_phrasing(entities: list[Entity]) -> None:
    """world_gen's later turns replace the name by "that <kind>" after "And": every phrasing that names the
    subject reads so, "I wonder ..." keeping its capital I."""
    by_relation = {}
    for entity in entities:
        for fact in entity.facts:
            by_relation.setdefault(fact.relation, (entity, fact))
    for relation, (entity, fact) in by_relation.items():
        for k, template in enumerate(QUESTIONS[relation]):
            text = referring_question(entity, fact, k)
            if "{name}" not in template:
                assert text is None
                continue
            assert text is not None and text.startswith("And ") and "that " in text, (relation, template)
            assert " i " not in f" {text} ", text


def test_train_phrasings_are_drawn_per_fact_and_cover_every_training_phrasing(
    entities: list[Entity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder's draw on the real entities (no passages: the answer check is the build's, tested in
    test_world.py): each train fact asked in ``k`` different training phrasings, never the held-out one;
    across a relation's facts all its training phrasings are used; the same seed gives the same draw, another seed another."""
    monkeypatch.setattr(world, "_check_answers", lambda q, texts: None)
    sample = [e for e in entities if e.kind != "city"] + [e for e in entities if e.kind == "city"][:200]
    split_of = {e.id: "train" for e in sample}

    def draw(k: int, seed: int = 0) -> dict[str, list]:
        return world._candidates(sample, split_of, {}, {}, seed=seed, train_phrasings=k)

    two = draw(2)
    per_fact: dict[str, set[int]] = defaultdict(set)
    relation_of: dict[str, str] = {}
    for c in two["train"]:
        fact, phrasing = c.question.id.rsplit(".p", 1)
        per_fact[fact].add(int(phrasing))
        relation_of[fact] = c.question.relation
    held = {fact: len(QUESTIONS[relation_of[fact]]) - 1 for fact in per_fact}
    assert per_fact and all(len(ks) == 2 and held[f] not in ks for f, ks in per_fact.items())
    used: dict[str, set[int]] = defaultdict(set)
    for fact, ks in per_fact.items():
        used[relation_of[fact]] |= ks
    assert set(used) == set(QUESTIONS), set(QUESTIONS) - set(used)
    assert all(ks == set(range(len(QUESTIONS[r]) - 1)) for r, ks in used.items()), used
    assert {c.question.id for c in two["test_seen"]} == {f"{f}.p{held[f]}" for f in per_fact}
    assert [c.question for c in draw(2)["train"]] == [c.question for c in two["train"]]
    assert [c.question for c in draw(2, seed=1)["train"]] != [c.question for c in two["train"]]
    assert len(draw(6)["train"]) == 6 * len(per_fact)
