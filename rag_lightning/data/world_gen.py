"""Generation tasks on the world set, written in the KILT layout like ``world_fever`` (so the KILT reader is their
one path): Jeopardy question generation, abstractive (full-sentence) answers, multi-turn dialogue and
multi-passage summaries.

Every row is built from facts that one QA split asks (``world.make_splits``), and lands in that split: a held-out
row states only held-out facts, and since the QA splits drop every train question about a pair of entities that
a val/test question is about (both directions), no train row of any of these tasks shares a pair, or a gold
passage on that pair, with a held-out row. Gold passages are the provenance (``world_fever``'s layout:
``{"wikipedia_id": <entity id>, "start_paragraph_id": n}`` names passage ``<entity id>-<n>``), and ``meta`` keeps
the subject, the entities the facts link it to (``objects``) and the facts (``facts``: ``<entity>.<relation>.<n>``).

- ``jeopardy``: input the entity's name (the answer); outputs the clue sentences of its facts in the split, each
  stating one fact without naming it ("This country's capital is N'Djamena."). Train has one row per fact (its
  clue first, so it is the target), val/test one row per entity (scored against all its clues).
- ``abstractive``: input a QA question; outputs the full sentence stating the fact, one per accepted answer
  ("The capital of Chad is N'Djamena.").
- ``dialogue``: one conversation per QA question, ending in it: 1-3 user turns about one entity with the answers
  between, one turn per line; later turns refer back ("And what is the population of that country?"); outputs
  the last question's answers. ``meta.turns`` says how many user turns (the 1-turn ones are the single-turn
  baseline of the same relations).
- ``summary``: input "Summarise <entity>: its <aspect>, <aspect> and <aspect>."; output the two or three
  sentences stating those facts, which stand in at least two different passages of the entity, so the model
  must combine passages.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rag_lightning.data.readers import Passage
from rag_lightning.data.world_fever import _claim, _provenance
from rag_lightning.data.world_sources import fold
from rag_lightning.data.world_templates import QUESTIONS, Entity, Fact, capitalize, join_words, the

TASKS = ("jeopardy", "abstractive", "dialogue", "summary")
# test_seen (train entities, the phrasing train never uses) only where the input is a question
TASK_SPLITS = {
    "jeopardy": ("train", "val", "test"),
    "abstractive": ("train", "val", "test", "test_seen"),
    "dialogue": ("train", "val", "test", "test_seen"),
    "summary": ("train", "val", "test"),
}
FILES = {task: {split: f"{task}/{split}.jsonl" for split in splits} for task, splits in TASK_SPLITS.items()}
KIND_WORD = {"country": "country", "element": "element", "city": "city"}

# Jeopardy clues: one fact of the entity, which is "this country" / "this element" / "this city", never named.
# Relations whose answer is the entity itself (capital_of, element_by_symbol, element_by_number) have none.
CLUES: dict[str, str] = {
    "capital": "{This}'s capital is {answer}.",
    "region": "{This} lies in the world region {answer}.",
    "subregion": "{This} lies in the subregion {answer}.",
    "population": "{This} has a population of {answer}.",
    "area": "{This} covers an area of {answer} square kilometres.",
    "currency": "The {answer} is a currency of {this}.",
    "language": "{answer} is a language of {this}.",
    "demonym": "People from {this} are called {answer}.",
    "borders": "{This} shares a land border with {answer}.",
    "calling_code": "The international calling code of {this} is {answer}.",
    "tld": "The internet country code of {this} is {answer}.",
    "largest_city": "The largest city of {this} is {answer}.",
    "division_of": "{This} has an administrative division called {division}.",
    "symbol": "The chemical symbol of {this} is {answer}.",
    "atomic_number": "The atomic number of {this} is {answer}.",
    "atomic_weight": "The standard atomic weight of {this} is {answer}.",
    "period": "{This} is in period {answer} of the periodic table.",
    "group": "{This} is in group {answer} of the periodic table.",
    "block": "{This} is in the {answer} of the periodic table.",
    "series": "{This} belongs to the {answer}.",
    "discovery_year": "{This} was discovered in the year {answer}.",
    "discoverers": "{This} was discovered by {answer}.",
    "discovery_location": "{This} was first discovered in {answer}.",
    "city_country": "{This} lies in {answer}.",
    "city_population": "{This} has a population of {answer}.",
    "city_timezone": "{This} lies in the {answer} time zone.",
}
_COUNTRY_OBJECTS = {"borders", "discovery_location", "city_country"}

# summaries: the facts one sentence states unambiguously (one value, or the discoverers' full credit first),
# named in the input by these aspects
ASPECTS: dict[str, str] = {
    "capital": "capital",
    "region": "world region",
    "subregion": "subregion",
    "population": "population",
    "area": "area",
    "currency": "currency",
    "language": "language",
    "demonym": "demonym",
    "calling_code": "calling code",
    "tld": "internet domain",
    "largest_city": "largest city",
    "symbol": "chemical symbol",
    "atomic_number": "atomic number",
    "atomic_weight": "atomic weight",
    "period": "period",
    "group": "group",
    "block": "block",
    "series": "series",
    "discovery_year": "year of discovery",
    "discoverers": "discoverers",
    "discovery_location": "place of discovery",
    "city_country": "country",
    "city_population": "population",
    "city_timezone": "time zone",
}
SUMMARIES_PER_ENTITY = {"train": 8, "val": 25, "test": 25}
MAX_EVAL_ROWS = 300  # val/test rows per task at most, as the QA splits


def fact_table(entities: Sequence[Entity]) -> dict[str, tuple[Entity, Fact]]:
    """Fact key (``<entity id>.<relation>.<n>``, a QA question id without its phrasing) -> entity and fact."""
    out: dict[str, tuple[Entity, Fact]] = {}
    for entity in entities:
        index: dict[str, int] = defaultdict(int)
        for fact in entity.facts:
            out[f"{entity.id}.{fact.relation}.{index[fact.relation]}"] = (entity, fact)
            index[fact.relation] += 1
    return out


def _fact_key(question_id: str) -> str:
    return question_id.rsplit(".", 1)[0]


def _names(entity: Entity) -> set[str]:
    return {fold(entity.name), fold(entity.title)}


def names_entity(text: str, entity: Entity) -> bool:
    """Whether ``text`` names the entity (case- and accent-insensitive, as whole words)."""
    folded = fold(text)
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", folded) for n in _names(entity))


def clue(entity: Entity, fact: Fact) -> str | None:
    """The fact as a Jeopardy clue about "this <kind>", or None where the relation has none or the clue would
    name the entity (Mexico's capital is Mexico City)."""
    template = CLUES.get(fact.relation)
    if template is None:
        return None
    answer = the(fact.answers[0]) if fact.relation in _COUNTRY_OBJECTS else fact.answers[0]
    this = f"this {KIND_WORD[entity.kind]}"
    slots = {k: v for k, v in fact.slots.items() if k != "name"}
    text = capitalize(template.format(answer=answer, this=this, This=capitalize(this), **slots))
    return None if names_entity(text, entity) else text


def sentence(fact: Fact, answer: str | None = None) -> str:
    """The fact as one declarative sentence (``world_fever``'s true claim)."""
    return _claim(fact, fact.answers[0] if answer is None else answer)


def _row(
    row_id: str, text: str, answers: Sequence[str], gold: Sequence[str], titles: dict[str, str], meta: dict[str, Any]
) -> dict[str, Any]:
    provenance = _provenance(tuple(dict.fromkeys(gold)), titles)
    return {
        "id": row_id,
        "input": text,
        "output": [{"answer": a, "provenance": provenance} for a in dict.fromkeys(answers)],
        "meta": meta,
    }


def _meta(subject: str, questions: Sequence[Any], **extra: Any) -> dict[str, Any]:
    objects = sorted({o for q in questions for o in q.objects})
    return {"subject": subject, "objects": objects, "facts": [_fact_key(q.id) for q in questions], **extra}


def _by_fact(questions: Sequence[Any]) -> dict[str, Any]:
    """The split's first question of each fact, in order."""
    out: dict[str, Any] = {}
    for q in questions:
        out.setdefault(_fact_key(q.id), q)
    return out


def _cap(rows: list[dict[str, Any]], split: str, rng: random.Random) -> list[dict[str, Any]]:
    if split == "train" or len(rows) <= MAX_EVAL_ROWS:
        return rows
    return sorted(rng.sample(rows, MAX_EVAL_ROWS), key=lambda r: r["id"])


# ----------------------------------------------------------------------------- the four tasks


def build_jeopardy(
    facts: dict[str, tuple[Entity, Fact]], splits: dict[str, list[Any]], titles: dict[str, str], seed: int
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for split in TASK_SPLITS["jeopardy"]:
        clues: dict[str, list[tuple[Any, str]]] = defaultdict(list)  # subject -> (question, clue), in order
        for key, q in _by_fact(splits[split]).items():
            entity, fact = facts[key]
            text = clue(entity, fact)
            if text is not None:
                clues[entity.id].append((q, text))
        rows = []
        for subject, items in clues.items():
            entity = facts[_fact_key(items[0][0].id)][0]
            everything = [text for _, text in items]
            gold = [p for q, _ in items for p in q.gold_passage_ids]
            if split == "train":  # one row per clue, its own clue first: the target
                for q, text in items:
                    rows.append(_row(f"{_fact_key(q.id)}.jeopardy", entity.name,
                                     [text, *everything], gold, titles, _meta(subject, [q])))  # fmt: skip
            else:
                rows.append(_row(f"{subject}.jeopardy", entity.name, everything, gold, titles,
                                 _meta(subject, [q for q, _ in items])))  # fmt: skip
        out[split] = _cap(rows, split, random.Random(f"{seed}-jeopardy-{split}"))
    return out


def build_abstractive(
    facts: dict[str, tuple[Entity, Fact]], splits: dict[str, list[Any]], titles: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for split in TASK_SPLITS["abstractive"]:
        rows = []
        for q in splits[split]:
            _, fact = facts[_fact_key(q.id)]
            answers = [sentence(fact, a) for a in fact.answers]
            rows.append(_row(f"{q.id}.sentence", q.question, answers, q.gold_passage_ids, titles,
                             _meta(q.subject, [q], relation=q.relation)))  # fmt: skip
        out[split] = rows
    return out


def referring_question(entity: Entity, fact: Fact, phrasing: int) -> str | None:
    """A later turn: the fact's question with the entity replaced by "that <kind>", after "And"; None for the
    relations whose question does not name the entity (capital_of asks for it)."""
    template = QUESTIONS[fact.relation][phrasing]
    if "{name}" not in template:
        return None
    text = template.format(**{**fact.slots, "name": f"that {KIND_WORD[entity.kind]}"})
    return f"And {text}" if text.startswith("I ") else f"And {text[:1].lower()}{text[1:]}"


def _phrasing(question_id: str) -> int:
    return int(question_id.rsplit(".p", 1)[1])


def build_dialogue(
    facts: dict[str, tuple[Entity, Fact]], splits: dict[str, list[Any]], titles: dict[str, str], seed: int
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for split in TASK_SPLITS["dialogue"]:
        rng = random.Random(f"{seed}-dialogue-{split}")
        by_fact = _by_fact(splits[split])
        by_subject: dict[str, list[Any]] = defaultdict(list)
        for q in by_fact.values():
            by_subject[q.subject].append(q)
        rows = []
        for q in splits[split]:
            entity, fact = facts[_fact_key(q.id)]
            last = referring_question(entity, fact, _phrasing(q.id))
            others = [o for o in by_subject[q.subject] if _fact_key(o.id) != _fact_key(q.id)]
            # earlier turns: the first names the entity (any relation), the second refers back like the last
            referring = [o for o in others if referring_question(*facts[_fact_key(o.id)], _phrasing(o.id))]
            turns = rng.choice((1, 2, 3)) if last is not None and others else 1
            if turns == 3 and not (referring and len(others) >= 2):
                turns = 2
            history: list[Any] = []
            if turns >= 2:
                second = rng.choice(referring) if turns == 3 else None
                first = rng.choice([o for o in others if o is not second])
                history = [first] + ([second] if second is not None else [])
            lines = []
            for i, h in enumerate(history):
                h_entity, h_fact = facts[_fact_key(h.id)]
                lines.append(h.question if i == 0 else referring_question(h_entity, h_fact, _phrasing(h.id)))
                lines.append(f"{h_fact.answers[0]}.")
            lines.append(q.question if turns == 1 else last)
            rows.append(_row(f"{q.id}.dialogue", "\n".join(lines), fact.answers, q.gold_passage_ids, titles,
                             _meta(q.subject, [*history, q], relation=q.relation, turns=turns)))  # fmt: skip
        out[split] = rows
    return out


def summary_facts(entity: Entity, facts: dict[str, tuple[Entity, Fact]], questions: Sequence[Any]) -> list[Any]:
    """The split's questions on this entity whose fact a summary can state (one value, an aspect, and a gold
    passage of the entity itself)."""
    out = []
    for q in questions:
        _, fact = facts[_fact_key(q.id)]
        if fact.relation not in ASPECTS or (len(fact.answers) > 1 and fact.relation != "discoverers"):
            continue
        if any(p.rsplit("-", 1)[0] == entity.id for p in q.gold_passage_ids):
            out.append(q)
    return out


def _own_passage(q: Any) -> str:
    return next(p for p in q.gold_passage_ids if p.rsplit("-", 1)[0] == q.subject)


def summary_input(entity: Entity, aspects: Sequence[str]) -> str:
    return f"Summarise {the(entity.name)}: its {join_words(list(aspects))}."


def build_summary(
    facts: dict[str, tuple[Entity, Fact]], splits: dict[str, list[Any]], titles: dict[str, str], seed: int
) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for split in TASK_SPLITS["summary"]:
        rng = random.Random(f"{seed}-summary-{split}")
        by_subject: dict[str, list[Any]] = defaultdict(list)
        for q in _by_fact(splits[split]).values():
            by_subject[q.subject].append(q)
        rows = []
        for subject, questions in by_subject.items():
            entity = facts[_fact_key(questions[0].id)][0]
            usable = summary_facts(entity, facts, questions)
            if len({_own_passage(q) for q in usable}) < 2:
                continue  # every fact in one passage: nothing to combine
            seen: set[tuple[str, ...]] = set()
            for _ in range(SUMMARIES_PER_ENTITY[split] * 4):
                if len(seen) >= SUMMARIES_PER_ENTITY[split]:
                    break
                size = rng.choice((2, 3)) if len(usable) >= 3 else 2
                chosen = rng.sample(usable, size)
                if len({_own_passage(q) for q in chosen}) < 2:
                    continue
                chosen.sort(key=lambda q: (_own_passage(q), q.id))  # the entity's order: passage by passage
                key = tuple(_fact_key(q.id) for q in chosen)
                if key in seen:
                    continue
                seen.add(key)
                picked = [facts[_fact_key(q.id)][1] for q in chosen]
                target = " ".join(sentence(f) for f in picked)
                gold = [p for q in chosen for p in q.gold_passage_ids]
                text = summary_input(entity, [ASPECTS[f.relation] for f in picked])
                rows.append(_row(f"{subject}.summary.{len(seen) - 1}", text, [target], gold, titles,
                                 _meta(subject, chosen, sentences=len(chosen))))  # fmt: skip
        out[split] = _cap(rows, split, rng)
    return out


def build_generation_tasks(
    entities: Sequence[Entity], passages: Sequence[Passage], splits: dict[str, list[Any]], seed: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """KILT rows per task and split (see the module docstring)."""
    facts = fact_table(entities)
    titles = {p.id: p.title for p in passages}
    return {
        "jeopardy": build_jeopardy(facts, splits, titles, seed),
        "abstractive": build_abstractive(facts, splits, titles),
        "dialogue": build_dialogue(facts, splits, titles, seed),
        "summary": build_summary(facts, splits, titles, seed),
    }
