"""A counterfactual copy of the world set, for the index hot-swap of the paper's §4.5.

RAG's knowledge sits in its index, so replacing the index should change what a trained model answers without
retraining it. To show this offline, ``rag-prepare data=world_counterfactual`` copies a built world set and
changes the facts of its held-out countries (the subjects of the test split, never seen in training), so that
the changed world still agrees with itself (no passage contradicts another):

- population, area, calling code, internet domain and demonym: along one seeded cycle through the held-out countries, each country takes
  another's value (a different step of the cycle per relation). Only the country's own passage states them.
- capital: a country's capital moves to another city of the same country, its largest city with a passage in
  the corpus that is not its capital now, whose name no other city, country or capital shares (its passage
  title is its bare name). Taking another country's capital would contradict the world: "The capital of
  Slovakia is Algiers." beside "Algiers is a city in Algeria." and "The largest city of Algeria is Algiers".
  The new capital's own city passage already names the country. A country with no such city keeps its capital.
  The change's ``donor`` is the country itself: the value comes from its own cities.

Every sentence that states a changed fact is rewritten with the world's own template
(``world_templates.country_entity`` run on the changed record), in every passage that holds it; no other passage
changes and passage ids stay the same. The QA files get the new gold answers:

- ``test.jsonl``: the world's test questions with the counterfactual answers; a question whose answer changed
  also carries ``old_answers``. "X is the capital of which country?" about a country whose capital moved from X
  to Y would ask about a city that is no capital any more: it asks about Y instead (same id, same answer, gold:
  the passages stating the new capital sentence) and keeps the old text in ``rewritten_from``;
- ``test_changed.jsonl``: only the questions whose answer changed, with the new answers;
- ``test_changed_original.jsonl``: the same questions as the real world answers them (for the original index);
- ``changes.jsonl``: every changed fact (country, relation, old value, new value, donor, passages rewritten).

The corpus is a new file with its own name (``data.name``), so its corpus store and index get cache
directories of their own and the real world's are never rebuilt over. The generator tokenizer is the source
world's: a trained model reads the swapped passages with the tokenizer it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rag_lightning.config import CounterfactualOptions, DataConfig
from rag_lightning.data.prepare_data import (
    WORLD_FILE_KEYS,
    WORLD_MANIFEST,
    PrepareError,
    _check_world_paths,
    _ensure_world,
    _is_current,
    build_directory_atomically,
    read_manifest,
)
from rag_lightning.files import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: a capital moves to another city of its own country (1: another country's capital)
BUILDER = __name__
# a relation that can change -> the Country field holding it; the sentence key and question relation share its name
RELATIONS = {
    "capital": "capital",
    "population": "population",
    "area": "area",
    "calling_code": "calling_code",
    "tld": "tld",
    "demonym": "demonym",
}
FILES = {
    "corpus": "corpus.jsonl",
    "test": "test.jsonl",
    "changed": "test_changed.jsonl",
    "original": "test_changed_original.jsonl",
    "changes": "changes.jsonl",
}


@dataclass(frozen=True)
class Change:
    """One changed fact: ``entity`` now states ``new`` (``donor``'s value) where it stated ``old``. For a capital
    the donor is ``entity`` itself: the new capital is another of its own cities."""

    entity: str
    title: str
    relation: str
    old: str
    new: str
    donor: str
    old_sentence: str
    new_sentence: str
    passage_ids: tuple[str, ...] = ()


def check_options(options: CounterfactualOptions, prefix: str = "data.counterfactual") -> None:
    unknown = [r for r in options.relations if r not in RELATIONS]
    if unknown or not options.relations:
        raise PrepareError(
            f"{prefix}.relations={list(options.relations)}: "
            + (f"{', '.join(map(repr, unknown))} cannot be changed" if unknown else "empty")
            + f". Fix: choose from {', '.join(RELATIONS)}"
        )


def build_key(options: CounterfactualOptions, source_key: str) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "source_build_key": source_key,
        "seed": options.seed,
        "relations": list(options.relations),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- the cities a capital can move to

_CITY_PASSAGE_ID = re.compile(r"^(city-\d+)-(\d+)$")
# a city's passage opens with its country and population sentences (world_templates.city_entity)
_CITY_OPENING = re.compile(
    r"(?P<name>.+?) is a city in (?P<country>.+?)\. (?P=name) has a population of (?P<population>\d{1,3}(?:,\d{3})*)\."
)


@dataclass(frozen=True)
class CorpusCity:
    """A city with a passage in the corpus, as its passage states it."""

    entity: str  # city-<geonameid>
    name: str
    title: str  # its bare name unless another city or a country shares the name
    country: str  # as the passage writes it (world_templates.the of the country's name)
    population: int


def corpus_cities(passages: list[dict[str, Any]]) -> dict[str, list[CorpusCity]]:
    """The corpus's cities by country (as their passages write it), largest first (ties by GeoNames id, as the
    world orders them)."""
    chunks: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for p in passages:
        m = _CITY_PASSAGE_ID.match(p["id"])
        if m:
            chunks[m[1]].append((int(m[2]), p["title"], p["text"]))
    by_country: dict[str, list[CorpusCity]] = defaultdict(list)
    for entity, parts in chunks.items():
        parts.sort()
        m = _CITY_OPENING.match(" ".join(text for _, _, text in parts))
        if m is None:
            raise PrepareError(
                f"counterfactual world: the passage of {entity} does not open with its country and population "
                "sentences. Fix: rebuild the source world (rag-prepare data=world)"
            )
        population = int(m["population"].replace(",", ""))
        by_country[m["country"]].append(CorpusCity(entity, m["name"], parts[0][1], m["country"], population))
    for cities in by_country.values():
        cities.sort(key=lambda c: (-c.population, int(c.entity.removeprefix("city-"))))
    return dict(by_country)


def new_capital(
    country: Any, cities: Mapping[str, Sequence[CorpusCity]], capitals: set[str]
) -> CorpusCity | None:
    """The city ``country``'s capital moves to: its largest city in the corpus that is not its capital, whose name
    nothing else in the world uses (its passage title is its bare name: no other city and no country is called
    so; ``capitals``, the folded capitals of all countries, does not hold it), so that no passage ties it to
    another country. None: no such city; the country keeps its capital."""
    from rag_lightning.data.world_sources import fold
    from rag_lightning.data.world_templates import the

    for city in cities.get(the(country.name), ()):
        unshared = city.title == city.name and fold(city.name) not in capitals
        if unshared and fold(city.name) != fold(country.capital):
            return city
    return None


# ----------------------------------------------------------------------------- the changes


def _value(country: Any, relation: str) -> str | None:
    """The fact as the world writes it in passages and answers (None: the country does not state it)."""
    from rag_lightning.data.world_templates import country_entity

    for fact in country_entity(country).facts:
        if fact.relation == relation:
            return fact.answers[0]
    return None


def _sentence(country: Any, key: str) -> str:
    from rag_lightning.data.world_templates import country_entity

    return next(s.text for s in country_entity(country).sentences if key in s.keys)


def _change(country: Any, relation: str, new_value: Any, donor: str) -> Change | None:
    """``country``'s fact ``relation`` set to ``new_value``; None where it would not change."""
    field_name = RELATIONS[relation]
    moved = replace(country, **{field_name: new_value})
    old, new = _value(country, relation), _value(moved, relation)
    if old is None or new is None or old == new:
        return None
    return Change(
        entity=f"country-{country.alpha3.lower()}",
        title=country.name,
        relation=relation,
        old=old,
        new=new,
        donor=donor,
        old_sentence=_sentence(country, relation),
        new_sentence=_sentence(moved, relation),
    )


def plan_changes(
    countries: list[Any],
    held_out: set[str],
    options: CounterfactualOptions,
    cities: Mapping[str, Sequence[CorpusCity]] | None = None,
) -> tuple[list[Change], dict[str, Any]]:
    """The changes for the held-out countries (entity ids ``country-<alpha3>``), and the changed records.

    Capital: each country's capital moves to another of its own cities (``new_capital``; ``cities`` is
    ``corpus_cities`` of the source corpus, required when capital is among ``options.relations``); the change's
    donor is the country itself. Every other relation: the held-out countries are shuffled (``options.seed``)
    into one cycle; for the i-th relation of ``options.relations`` each country takes the value of the country
    i+1 steps on, so a country does not simply trade all its facts with one other (capital keeps its step number,
    unused, so the other relations take the same donors whether capital is listed before them or not). Facts
    equal to the donor's (two countries dialled with +1) do not change.
    """
    from rag_lightning.data.world_sources import fold

    by_id = {f"country-{c.alpha3.lower()}": c for c in countries}
    cycle = sorted(e for e in held_out if e in by_id)
    random.Random(f"{options.seed}-counterfactual").shuffle(cycle)
    changed = {e: by_id[e] for e in cycle}
    capitals = {fold(c.capital) for c in countries}
    changes: list[Change] = []
    for step, relation in enumerate(options.relations, start=1):
        field_name = RELATIONS[relation]
        if relation == "capital":
            if cities is None:
                raise ValueError("plan_changes: a capital change needs the corpus's cities (corpus_cities)")
            moves = [(e, new_capital(by_id[e], cities, capitals), e) for e in cycle]
            planned = [(e, city.name, donor) for e, city, donor in moves if city is not None]
        elif len(cycle) < 2:
            continue
        else:
            shift = 1 + (step - 1) % (len(cycle) - 1)
            donors = [(e, cycle[(i + shift) % len(cycle)]) for i, e in enumerate(cycle)]
            planned = [(e, getattr(by_id[donor], field_name), donor) for e, donor in donors]
        for entity, new_value, donor in planned:
            change = _change(by_id[entity], relation, new_value, donor)
            if change is None:
                continue
            changed[entity] = replace(changed[entity], **{field_name: new_value})
            changes.append(change)
    return changes, changed


def rewrite_corpus(passages: list[dict[str, Any]], changes: list[Change]) -> tuple[list[dict[str, Any]], list[Change]]:
    """The corpus with every sentence that states a changed fact rewritten (in each passage holding it); the
    changes with the passages they rewrote. A changed fact no passage states is a build error, not a silent
    no-op. Passages are looked up in the source corpus, not in the text rewritten so far: a sentence that does not
    name its country ("Its internet country code top-level domain is .tw.") written into one country's passage
    must not be taken for the next country's old sentence along the cycle."""
    out = [dict(p) for p in passages]
    located = []
    for change in changes:
        rows = [i for i, p in enumerate(passages) if change.old_sentence in p["text"]]
        if not rows:
            raise PrepareError(
                f"counterfactual world: no passage states {change.old_sentence!r} ({change.entity}, "
                f"{change.relation}). Fix: rebuild the source world (rag-prepare data=world)"
            )
        for i in rows:
            out[i]["text"] = out[i]["text"].replace(change.old_sentence, change.new_sentence)
        located.append(replace(change, passage_ids=tuple(out[i]["id"] for i in rows)))
    return out, located


def capital_ties(texts: Sequence[str], city: str) -> set[str]:
    """The countries (as passages write them) that passages tie ``city`` to: as its capital, as its largest
    city, or in the city's own passage."""
    name = re.escape(city)
    patterns = (
        rf"The capital of (.+?) is {name}\.",
        rf"The largest city of (.+?) is {name}, with",
        rf"(?:^|\. ){name} is a city in (.+?)\. {name} has a population",
    )
    return {m[1] for text in texts for pattern in patterns for m in re.finditer(pattern, text)}


def check_consistent(corpus: list[dict[str, Any]], changes: list[Change]) -> None:
    """Every passage agrees with a moved capital: it is tied to its country only (a builder bug fails here)."""
    from rag_lightning.data.world_templates import the

    texts = [p["text"] for p in corpus]
    for change in (c for c in changes if c.relation == "capital"):
        ties = capital_ties(texts, change.new)
        if ties != {the(change.title)}:
            raise AssertionError(
                f"counterfactual world: {change.new!r}, the new capital of {change.title}, is "
                f"tied to {sorted(ties)} in the corpus"
            )


def _ask_about(question: str, old: str, new: str, question_id: str) -> str:
    """``question`` asking about ``new`` where its template put ``old`` (capitalised at the start)."""
    from rag_lightning.data.world_templates import capitalize

    if question.count(old) == 1:
        text = question.replace(old, new)
    elif old not in question and question.startswith(capitalize(old)):
        text = capitalize(new) + question[len(old) :]
    else:
        raise AssertionError(f"{question_id}: {question!r} does not name {old!r} exactly once")
    if new not in text and not text.startswith(capitalize(new)):
        raise AssertionError(f"{question_id}: {text!r} does not name {new!r}")
    return text


def rewrite_questions(
    questions: list[dict[str, Any]], changes: list[Change], cities: Mapping[str, Sequence[CorpusCity]]
) -> list[dict[str, Any]]:
    """The questions of the counterfactual world; one whose answer changed also carries ``old_answers``.

    Direct questions on a changed fact take the new value. "X is the capital of which country?" about a country
    whose capital moved from X to Y asks about Y instead (X is no capital any more): same id and answer, the
    passages stating the new capital sentence as gold, Y's city as object, the old text in ``rewritten_from``.
    """
    new_of = {(c.entity, c.relation): c for c in changes}
    city_ids = {c.name: c.entity for by_country in cities.values() for c in by_country if c.title == c.name}
    out = []
    for q in questions:
        row = dict(q)
        change = new_of.get((q.get("subject"), q.get("relation")))
        moved = new_of.get((q.get("subject"), "capital"))
        if change is not None:
            row["answers"] = [change.new]
        elif q.get("relation") == "capital_of" and moved is not None:
            row["question"] = _ask_about(q["question"], moved.old, moved.new, q["id"])
            row["gold_passage_ids"] = list(moved.passage_ids)
            if "objects" in q:
                kept = {o for o in q["objects"] if o != city_ids.get(moved.old)}
                row["objects"] = sorted(kept | {city_ids[moved.new]})
            row["rewritten_from"] = q["question"]
        if row["answers"] != q["answers"]:
            row["old_answers"] = list(q["answers"])
        out.append(row)
    return out


def check_answers(questions: list[dict[str, Any]], texts: dict[str, str], path: str) -> None:
    """Every answer is readable in a gold passage of the counterfactual corpus (a builder bug fails here)."""
    for q in questions:
        gold = q.get("gold_passage_ids") or []
        if gold and not all(any(a in texts.get(p, "") for p in gold) for a in q["answers"]):
            raise AssertionError(f"{path}: {q['id']}: answers {q['answers']} not all in gold passages {gold}")


# ----------------------------------------------------------------------------- files


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_counterfactual(source_dir: Path, out_dir: Path, options: CounterfactualOptions) -> dict[str, Any]:
    """Write the counterfactual corpus and QA files of the world set in ``source_dir`` into ``out_dir``."""
    from rag_lightning.data.world_sources import load_countries

    source = read_manifest(source_dir) or {}
    passages = _read_jsonl(source_dir / WORLD_FILE_KEYS["corpus_file"])
    test = _read_jsonl(source_dir / WORLD_FILE_KEYS["test_file"])
    countries = load_countries()
    held_out = {q["subject"] for q in test if q["subject"].startswith("country-")}
    cities = corpus_cities(passages)
    changes, _ = plan_changes(countries, held_out, options, cities)
    corpus, changes = rewrite_corpus(passages, changes)
    check_consistent(corpus, changes)
    new_test = rewrite_questions(test, changes, cities)
    texts = {p["id"]: p["text"] for p in corpus}
    check_answers(new_test, texts, str(out_dir / FILES["test"]))
    changed_rows = [q for q in new_test if "old_answers" in q]
    originals = {q["id"]: q for q in test}
    original_rows = [originals[q["id"]] for q in changed_rows]

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / FILES["corpus"], corpus)
    _write_jsonl(out_dir / FILES["test"], new_test)
    _write_jsonl(out_dir / FILES["changed"], changed_rows)
    _write_jsonl(out_dir / FILES["original"], original_rows)
    _write_jsonl(out_dir / FILES["changes"], [asdict(c) for c in changes])
    by_relation: dict[str, int] = defaultdict(int)
    for q in changed_rows:
        by_relation[q["relation"]] += 1
    kept: dict[str, int] = {}
    if "capital" in options.relations:  # held-out countries with no other city their capital could move to
        countries_held = {f"country-{c.alpha3.lower()}" for c in countries} & held_out
        moved = {c.entity for c in changes if c.relation == "capital"}
        kept = {"capital_unchanged_no_other_city": len(countries_held - moved)}
    manifest = {
        "builder": BUILDER,
        "format_version": FORMAT_VERSION,
        "build_key": build_key(options, str(source.get("build_key"))),
        "source_dir": str(source_dir.resolve()),
        "source_build_key": source.get("build_key"),
        "options": asdict(options),
        "counts": {
            "passages": len(corpus),
            "passages_changed": sum(a["text"] != b["text"] for a, b in zip(passages, corpus, strict=True)),
            "facts_changed": {r: sum(c.relation == r for c in changes) for r in options.relations},
            "entities": {"country (changed)": len({c.entity for c in changes})},
            "questions": {"test": len(new_test), "test_changed": len(changed_rows)},
            "questions_changed_by_relation": dict(sorted(by_relation.items())),
            "questions_rewritten": sum("rewritten_from" in q for q in new_test),
            **kept,
        },
        "files": {
            name: {"sha256": sha256_file(out_dir / name), "bytes": (out_dir / name).stat().st_size}
            for name in sorted(FILES.values())
        },
    }
    (out_dir / WORLD_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def source_config(data: DataConfig) -> DataConfig:
    """The `data` section of the real world the counterfactual copy is made from."""
    src = data.counterfactual.source_dir
    if not src:
        raise PrepareError(
            "data.counterfactual.source_dir is not set. Fix: point it at the world set to change "
            "(data=world_counterfactual sets ${paths.cache_dir}/data/world)"
        )
    files = {key: str(Path(src) / name) for key, name in WORLD_FILE_KEYS.items()}
    return DataConfig(name="world", build="world", dir=src, **files, world=data.world)


def ensure_counterfactual(data: DataConfig) -> dict[str, Any]:
    """Build (or reuse) the source world, then the counterfactual copy in ``data.dir``; returns its manifest."""
    check_options(data.counterfactual)
    source = _ensure_world(source_config(data))
    out_dir = Path(data.dir)
    key = build_key(data.counterfactual, str(source.get("build_key")))
    manifest = read_manifest(out_dir)
    status = "reused"
    if not _is_current(manifest, key, out_dir):
        if out_dir.exists() and any(out_dir.iterdir()) and (manifest or {}).get("builder") != BUILDER:
            raise PrepareError(
                f"data.dir={out_dir} is not empty and holds no counterfactual world manifest. "
                "Fix: point data.dir at a new or empty directory"
            )
        log.info("building the counterfactual world into %s from %s", out_dir, source["dir"])
        manifest = build_directory_atomically(
            out_dir, lambda tmp: build_counterfactual(Path(source["dir"]), tmp, data.counterfactual)
        )
        status = "built"
    _check_world_paths(data, out_dir)
    return {**manifest, "dir": str(out_dir.resolve()), "status": status}
