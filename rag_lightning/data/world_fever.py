"""`world_fever`: fact verification on the world set, written in the KILT layout (so the KILT reader is its one path).

Each fact that a QA split asks becomes one claim in the same split, so the splits, the held-out entities and
the both-directions rule of ``world.make_splits`` hold for this task too. Half the claims of each split state
the fact (SUPPORTS); the other half swap the object for a plausible wrong one: another entity's value of the
same relation, which neither the fact's answers nor its gold passages contain (REFUTES). The gold passages
are the provenance of both: ``{"wikipedia_id": <entity id>, "start_paragraph_id": n}`` names passage
``<entity id>-<n>`` of the world corpus (passage ids are ``<page>-<paragraph>``, as KILT pages split by
``data/kilt.py``).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Any

from rag_lightning.data.readers import Passage
from rag_lightning.data.world_sources import fold
from rag_lightning.data.world_templates import Entity, Fact, capitalize, the

LABELS = ("SUPPORTS", "REFUTES")
FILES = {split: f"fever/{split}.jsonl" for split in ("train", "val", "test", "test_seen")}

# one declarative claim per relation: the fact's slots and {answer}, the object a false claim swaps
CLAIMS: dict[str, str] = {
    "capital": "The capital of {name} is {answer}.",
    "capital_of": "{capital} is the capital of {answer}.",
    "region": "{name} lies in the world region {answer}.",
    "subregion": "{name} lies in the subregion {answer}.",
    "population": "{name} has a population of {answer}.",
    "area": "{name} covers an area of {answer} square kilometres.",
    "currency": "The {answer} is a currency of {name}.",
    "language": "{answer} is a language of {name}.",
    "demonym": "People from {name} are called {answer}.",
    "borders": "{name} shares a land border with {answer}.",
    "calling_code": "The international calling code of {name} is {answer}.",
    "tld": "The internet country code of {name} is {answer}.",
    "largest_city": "The largest city of {name} is {answer}.",
    "division_of": "{division} is an administrative division of {answer}.",
    "symbol": "The chemical symbol of {name} is {answer}.",
    "element_by_symbol": "The chemical symbol {symbol} stands for {answer}.",
    "atomic_number": "The atomic number of {name} is {answer}.",
    "element_by_number": "The element with atomic number {number} is {answer}.",
    "atomic_weight": "The standard atomic weight of {name} is {answer}.",
    "period": "{name} is in period {answer} of the periodic table.",
    "group": "{name} is in group {answer} of the periodic table.",
    "block": "{name} is in the {answer} of the periodic table.",
    "series": "{name} belongs to the {answer}.",
    "discovery_year": "{name} was discovered in the year {answer}.",
    "discoverers": "{name} was discovered by {answer}.",
    "discovery_location": "{name} was first discovered in the country {answer}.",
    "city_country": "{name} is a city in {answer}.",
    "city_population": "The city of {name} has a population of {answer}.",
    "city_timezone": "The city of {name} lies in the {answer} time zone.",
}
_COUNTRY_OBJECTS = {"capital_of", "borders", "division_of", "city_country", "discovery_location"}


def _contains(folded_text: str, folded_value: str) -> bool:
    """Whether ``folded_value`` occurs in ``folded_text`` as whole words (both already passed through `fold`,
    so the test is case- and accent-insensitive); the substring test first keeps it fast."""
    return folded_value in folded_text and (
        re.search(rf"(?<!\w){re.escape(folded_value)}(?!\w)", folded_text) is not None
    )


def _claim(fact: Fact, answer: str) -> str:
    value = the(answer) if fact.relation in _COUNTRY_OBJECTS else answer
    return capitalize(CLAIMS[fact.relation].format(answer=value, **fact.slots))


def _provenance(gold: tuple[str, ...], titles: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for pid in gold:
        page, paragraph = pid.rsplit("-", 1)
        out.append({"wikipedia_id": page, "title": titles[pid], "start_paragraph_id": int(paragraph),
                    "end_paragraph_id": int(paragraph)})  # fmt: skip
    return out


def build_claims(
    entities: list[Entity], passages: list[Passage], splits: dict[str, list[Any]], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """KILT rows per split: one claim per fact the split's questions ask, half SUPPORTS, half REFUTES."""
    facts: dict[str, Fact] = {}
    for entity in entities:
        index: dict[str, int] = defaultdict(int)
        for fact in entity.facts:
            facts[f"{entity.id}.{fact.relation}.{index[fact.relation]}"] = fact
            index[fact.relation] += 1
    pool: dict[str, list[str]] = defaultdict(list)  # the plausible wrong objects: values of the same relation
    for fact in facts.values():
        if fact.answers[0] not in pool[fact.relation]:
            pool[fact.relation].append(fact.answers[0])
    folded_pool = {relation: [(v, fold(v)) for v in values] for relation, values in pool.items()}
    texts = {p.id: p.text for p in passages}
    titles = {p.id: p.title for p in passages}
    out: dict[str, list[dict[str, Any]]] = {}
    for split, questions in splits.items():
        rng = random.Random(f"{seed}-fever-{split}")
        chosen, seen = [], set()
        for q in questions:
            key = q.id.rsplit(".", 1)[0]
            if key not in seen:
                seen.add(key)
                chosen.append((key, q))
        order = list(range(len(chosen)))
        rng.shuffle(order)
        refuted = set(order[: len(order) // 2])
        rows = []
        for i, (key, q) in enumerate(chosen):
            fact = facts[key]
            label = "SUPPORTS"
            answer = fact.answers[0]
            if i in refuted:
                gold_text = fold(" ".join(texts[p] for p in q.gold_passage_ids))
                answers = {fold(a) for a in fact.answers}
                wrong = [
                    v for v, folded in folded_pool[fact.relation]
                    if folded not in answers and not _contains(gold_text, folded)
                ]  # fmt: skip
                if not wrong:
                    continue  # a relation with one value: no false claim to make, drop the fact
                label, answer = "REFUTES", rng.choice(wrong)
            rows.append({
                "id": f"{key}.claim",
                "input": _claim(fact, answer),
                "output": [{"answer": label, "provenance": _provenance(q.gold_passage_ids, titles)}],
                "meta": {"relation": fact.relation, "subject": q.subject, "objects": list(q.objects),
                         "claimed": answer, "question_id": q.id},
            })  # fmt: skip
        out[split] = rows
    return out
