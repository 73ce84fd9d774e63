"""Build the embedded "world" data set: a passage corpus, QA splits, a generator tokenizer and a manifest.

Facts come from installed packages (see ``world_sources``), text from our templates (``world_templates``).
The build is deterministic: the same package versions, options and seed give byte-identical files.

Split rules, so that val/test measure generalisation to unseen entities:

- entities (countries, elements, cities) are split, not questions: a val/test question's subject is
  never the subject of a train question;
- a train question that mentions the name of any val/test subject (e.g. "Which country has Paris as
  its capital?" while the city Paris is a test subject) is dropped from train;
- a fact can be asked from either end: a train question about the same pair of entities as a val/test
  question (train "In which country is the city of Tokyo?" while val asks "What is the largest city of
  Japan?") is dropped from train, so a held-out fact is never learnt through its inverse;
- a question text produced by two different facts (two cities called Kingston) is dropped everywhere;
- ``test_seen`` asks about train entities with the one phrasing per relation that train never uses;
- train asks each fact in ``train_phrasings`` of its relation's 11 to 16 training phrasings, drawn per fact;
  val and test ask with one of the relation's three original phrasings (world_templates.ORIGINAL_PHRASINGS);
- ``test_paraphrase`` asks the ``test`` split's facts again, each in one phrasing of ``world_paraphrases``
  (written apart from the templates, never trained on), drawn with a seeded rng of its own, so the other
  splits, the corpus and the tokenizer are the same as without it; a paraphrase text that two facts (or a
  template question) produce is dropped like an ambiguous template question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from rag_lightning.config import WorldOptions
from rag_lightning.data.gen_tokenizer import train_generator_tokenizer
from rag_lightning.data.prepare_data import WORLD_FILE_KEYS, WORLD_MANIFEST
from rag_lightning.data.readers import Passage
from rag_lightning.data.world_fever import FILES as FEVER_FILES
from rag_lightning.data.world_fever import build_claims
from rag_lightning.data.world_gen import FILES as GEN_FILES
from rag_lightning.data.world_gen import build_generation_tasks
from rag_lightning.data.world_paraphrases import PARAPHRASES
from rag_lightning.data.world_sources import (
    City,
    fold,
    load_cities,
    load_countries,
    load_elements,
    source_versions,
)
from rag_lightning.data.world_templates import (
    ORIGINAL_PHRASINGS,
    ORIGINAL_TRAINING_PHRASINGS,
    QUESTIONS,
    Entity,
    Fact,
    capitalize,
    city_entity,
    country_entity,
    element_entity,
)
from rag_lightning.files import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 6  # bump when templates or split rules change, so cached builds are rebuilt
SPLITS = ("train", "val", "test", "test_seen", "test_paraphrase")
FEVER_SPLITS = ("train", "val", "test", "test_seen")  # claims are made from these splits' facts
CORPUS_FILE = WORLD_FILE_KEYS["corpus_file"]
TOKENIZER_DIR = WORLD_FILE_KEYS["generator_tokenizer"]
MANIFEST_FILE = WORLD_MANIFEST
KINDS = ("country", "element", "city")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...]
    relation: str
    subject: str  # entity id
    # the other entities the fact links the subject to (answers or slots naming an entity): the fact's pairs
    objects: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answers": list(self.answers),
            "gold_passage_ids": list(self.gold_passage_ids),
            "relation": self.relation,
            "subject": self.subject,
            "objects": list(self.objects),
        }

    def pairs(self) -> set[frozenset[str]]:
        """The pairs of entities this question is about, in either direction."""
        return {frozenset((self.subject, o)) for o in self.objects}


@dataclass
class World:
    """Everything a build produces, before it is written."""

    passages: list[Passage]
    splits: dict[str, list[Question]]
    entities: dict[str, int]  # kind -> count
    dropped: dict[str, int] = field(default_factory=dict)
    fever: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # world_fever's KILT rows per split
    # the generation tasks' KILT rows (world_gen.py): task -> split -> rows
    generation: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def build_key(options: WorldOptions) -> str:
    """What decides the output: format, options and the versions of every package that feeds it."""
    payload = {
        "format_version": FORMAT_VERSION,
        "options": asdict(options),
        "sources": source_versions(),
        "tokenizers": metadata.version("tokenizers"),
        "transformers": metadata.version("transformers"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- entities and passages


def _city_entities(cities: list[City], country_names: set[str]) -> list[Entity]:
    """Titles are disambiguated where names collide; colliding cities get passages but no questions."""
    by_name = Counter(fold(c.name) for c in cities)
    by_name_country = Counter((fold(c.name), c.country) for c in cities)
    rank: Counter[str] = Counter()
    entities = []
    for city in cities:  # largest first, so the running count is the rank within the country
        rank[city.country] += 1
        unique = by_name[fold(city.name)] == 1 and fold(city.name) not in country_names
        if unique:
            title = city.name
        elif by_name_country[(fold(city.name), city.country)] == 1:
            title = f"{city.name}, {city.country}"
        else:
            title = f"{city.name}, {city.country} ({city.geonameid})"
        entities.append(city_entity(city, title, rank[city.country], askable=unique))
    return entities


def load_entities(options: WorldOptions) -> list[Entity]:
    countries = load_countries()
    cities = load_cities(countries, options.min_city_population)
    city_entities = _city_entities(cities, {fold(c.name) for c in countries})
    largest: dict[str, tuple[City, Entity]] = {}
    for city, entity in zip(cities, city_entities, strict=True):
        largest.setdefault(city.country, (city, entity))
    entities = []
    for country in countries:
        city, city_ent = largest.get(country.name, (None, None))
        entities.append(country_entity(country, city, city_ent.id if city_ent else None))
    entities.extend(element_entity(el) for el in load_elements())
    entities.extend(city_entities)
    return entities


def _split_long(text: str, max_words: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]


def chunk_entity(entity: Entity, max_words: int) -> list[tuple[Passage, frozenset[str]]]:
    """Pack whole sentences greedily into passages of at most ``max_words`` words (title excluded)."""
    chunks: list[tuple[list[str], set[str]]] = []
    words = 0
    for sentence in entity.sentences:
        for piece in _split_long(sentence.text, max_words):
            n = len(piece.split())
            if not chunks or words + n > max_words:
                chunks.append(([], set()))
                words = 0
            chunks[-1][0].append(piece)
            chunks[-1][1].update(sentence.keys)
            words += n
    return [
        (Passage(id=f"{entity.id}-{i}", title=entity.title, text=" ".join(texts)), frozenset(keys))
        for i, (texts, keys) in enumerate(chunks)
    ]


# ----------------------------------------------------------------------------- questions and splits


@dataclass(frozen=True)
class _Candidate:
    question: Question
    entity_name: str


def _assign_splits(entities: list[Entity], options: WorldOptions) -> dict[str, str]:
    """Entity id -> train/val/test, drawn per kind so each kind is held out in the same proportion."""
    split_of = {}
    for kind in KINDS:
        ids = sorted(e.id for e in entities if e.kind == kind)
        random.Random(f"{options.seed}-split-{kind}").shuffle(ids)
        n_val = round(len(ids) * options.val_fraction)
        n_test = round(len(ids) * options.test_fraction)
        for i, entity_id in enumerate(ids):
            split_of[entity_id] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return split_of


def _gold(fact: Fact, entity: Entity, located: dict[tuple[str, str], list[str]]) -> tuple[str, ...]:
    gold = list(located.get((entity.id, fact.key), []))
    for other in fact.also_in:
        gold.extend(p for p in located.get(other, []) if p not in gold)
    return tuple(gold)


def _check_answers(q: Question, texts: dict[str, str]) -> None:
    """Every answer must be readable in a gold passage: a template bug must fail the build, not the model."""
    for answer in q.answers:
        if not any(answer in texts[p] for p in q.gold_passage_ids):
            raise AssertionError(f"{q.id}: answer {answer!r} not found in gold passages {q.gold_passage_ids}")


def entity_names(entities: list[Entity]) -> dict[str, str]:
    """Folded name -> entity id, by title: a city whose name others share has a disambiguated title
    ("Armenia, Colombia"), so a bare name means the one entity titled so (the country Armenia)."""
    counts = Counter(fold(e.title) for e in entities)
    return {fold(e.title): e.id for e in entities if counts[fold(e.title)] == 1}


def fact_objects(fact: Fact, entity: Entity, names: dict[str, str]) -> tuple[str, ...]:
    """The entities a fact links its subject to: answers and slots that name one, and entities whose
    passages state the fact too (``also_in``)."""
    values = [*fact.answers, *(v for k, v in fact.slots.items() if k != "name")]
    found = [names[fold(v)] for v in values if fold(v) in names]
    found += [other for other, _ in fact.also_in]
    return tuple(sorted({o for o in found if o != entity.id}))


def _candidates(
    entities: list[Entity],
    split_of: dict[str, str],
    located: dict[tuple[str, str], list[str]],
    texts: dict[str, str],
    seed: int,
    train_phrasings: int = 1,
) -> dict[str, list[_Candidate]]:
    """One question per fact (``train_phrasings`` for train): train uses that many of the training phrasings
    (drawn per fact), test_seen the held-out one, val/test one of the three original phrasings."""
    rng = random.Random(f"{seed}-phrasing")
    names = entity_names(entities)
    out: dict[str, list[_Candidate]] = defaultdict(list)
    for entity in entities:
        split = split_of[entity.id]
        per_relation: Counter[str] = Counter()
        for fact in entity.facts:
            index = per_relation[fact.relation]
            per_relation[fact.relation] += 1
            phrasings = QUESTIONS[fact.relation]
            gold = _gold(fact, entity, located)
            objects = fact_objects(fact, entity, names)
            if split == "train":
                # the shared stream draws once per train fact over the phrasings every relation started with,
                # whatever train_phrasings is, so val and test stay the questions earlier results were measured
                # on; the fact's own stream picks its training phrasings
                rng.randrange(ORIGINAL_TRAINING_PHRASINGS)
                own = random.Random(f"{seed}-phrasing-{entity.id}.{fact.relation}.{index}")
                ks = sorted(own.sample(range(len(phrasings) - 1), train_phrasings))
                choices = [("train", k) for k in ks] + [("test_seen", len(phrasings) - 1)]
            else:
                original = ORIGINAL_PHRASINGS[rng.randrange(len(ORIGINAL_PHRASINGS))]
                choices = [(split, original % len(phrasings))]
            for target, k in choices:
                q = Question(
                    id=f"{entity.id}.{fact.relation}.{index}.p{k}",
                    question=capitalize(phrasings[k].format(**fact.slots)),
                    answers=fact.answers,
                    gold_passage_ids=gold,
                    relation=fact.relation,
                    subject=entity.id,
                    objects=objects,
                )
                _check_answers(q, texts)
                out[target].append(_Candidate(q, entity.name))
    return out


def _paraphrase_candidates(
    entities: list[Entity],
    split_of: dict[str, str],
    located: dict[tuple[str, str], list[str]],
    texts: dict[str, str],
    seed: int,
    template_texts: set[str],
) -> tuple[list[_Candidate], int]:
    """One paraphrased question per fact of a ``test`` entity (id ``<fact>.q<k>``, ``k`` indexing
    ``PARAPHRASES``); a text that another fact's paraphrases, or any template question, also produce is
    dropped (returned as the count), as ``_drop_ambiguous`` drops template questions."""
    rng = random.Random(f"{seed}-paraphrase")  # its own stream: the other splits' draws stay as they were
    names = entity_names(entities)
    producers: dict[str, set[tuple[str, str]]] = defaultdict(set)
    out: list[_Candidate] = []
    for entity in entities:
        per_relation: Counter[str] = Counter()
        for fact in entity.facts:
            index = per_relation[fact.relation]
            per_relation[fact.relation] += 1
            filled = [capitalize(p.format(**fact.slots)) for p in PARAPHRASES[fact.relation]]
            for text in filled:
                producers[fold(text)].add((entity.id, fact.relation))
            if split_of[entity.id] != "test":
                continue
            k = rng.randrange(len(filled))
            q = Question(
                id=f"{entity.id}.{fact.relation}.{index}.q{k}",
                question=filled[k],
                answers=fact.answers,
                gold_passage_ids=_gold(fact, entity, located),
                relation=fact.relation,
                subject=entity.id,
                objects=fact_objects(fact, entity, names),
            )
            _check_answers(q, texts)
            out.append(_Candidate(q, entity.name))
    kept = [
        c for c in out
        if len(producers[fold(c.question.question)]) == 1 and fold(c.question.question) not in template_texts
    ]  # fmt: skip
    return kept, len(out) - len(kept)


def _fact_key(q: Question) -> tuple[str, str]:
    """(subject, "<entity>.<relation>.<index>"): the fact a question asks, whatever its phrasing."""
    return q.subject, q.id.rsplit(".", 1)[0]


def _drop_ambiguous(candidates: dict[str, list[_Candidate]]) -> tuple[dict[str, list[_Candidate]], int]:
    """A question text that two facts produce (same-named entities) has no single answer set: drop it."""
    sources: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for items in candidates.values():
        for c in items:
            sources[fold(c.question.question)].add((c.question.subject, c.question.relation))
    ambiguous = {text for text, facts in sources.items() if len(facts) > 1}
    kept = {
        s: [c for c in items if fold(c.question.question) not in ambiguous] for s, items in candidates.items()
    }
    dropped = sum(len(items) for items in candidates.values()) - sum(len(items) for items in kept.values())
    return kept, dropped


_WORD = re.compile(r"\w+")


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(fold(text)))


def mentions(question: str, names: set[tuple[str, ...]], longest: int) -> bool:
    """Whether any name (as a word sequence, case- and accent-insensitive) occurs in the question."""
    words = _words(question)
    return any(words[i : i + n] in names for n in range(1, longest + 1) for i in range(len(words) - n + 1))


def _stratified(items: list[_Candidate], limit: int | None, rng: random.Random) -> list[_Candidate]:
    """Take questions round-robin over relations, so rare relations are not crowded out by cities."""
    by_relation: dict[str, list[_Candidate]] = defaultdict(list)
    for c in items:
        by_relation[c.question.relation].append(c)
    queues = []
    for relation in sorted(by_relation):
        queue = by_relation[relation]
        rng.shuffle(queue)
        queues.append(queue)
    chosen: list[_Candidate] = []
    limit = len(items) if limit is None else min(limit, len(items))
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    rng.shuffle(chosen)
    return chosen


def make_splits(
    entities: list[Entity], passages: list[tuple[Passage, frozenset[str]]], options: WorldOptions
) -> tuple[dict[str, list[Question]], dict[str, int]]:
    located: dict[tuple[str, str], list[str]] = defaultdict(list)
    for passage, keys in passages:
        entity_id = passage.id.rsplit("-", 1)[0]
        for key in sorted(keys):
            located[(entity_id, key)].append(passage.id)
    texts = {p.id: p.text for p, _ in passages}
    split_of = _assign_splits(entities, options)
    candidates, ambiguous = _drop_ambiguous(
        _candidates(entities, split_of, located, texts, options.seed, options.train_phrasings)
    )
    rng = random.Random(f"{options.seed}-sample")
    chosen = {s: _stratified(candidates[s], options.max_eval_questions, rng) for s in ("val", "test")}

    held_out = {_words(c.entity_name) for s in ("val", "test") for c in chosen[s]}
    longest = max((len(n) for n in held_out), default=0)
    train = [c for c in candidates["train"] if not mentions(c.question.question, held_out, longest)]
    leaked = len(candidates["train"]) - len(train)
    held_pairs = {pair for s in ("val", "test") for c in chosen[s] for pair in c.question.pairs()}
    inverse = [c for c in train if c.question.pairs() & held_pairs]
    train = [c for c in train if not c.question.pairs() & held_pairs]
    chosen["train"] = _stratified(train, options.max_train_questions, rng)

    kept = {(c.question.subject, c.question.id.rsplit(".", 1)[0]) for c in chosen["train"]}
    seen = [
        c for c in candidates["test_seen"] if (c.question.subject, c.question.id.rsplit(".", 1)[0]) in kept
    ]
    chosen["test_seen"] = _stratified(seen, options.max_eval_questions, rng)

    template_texts = {fold(c.question.question) for items in candidates.values() for c in items}
    paraphrased, ambiguous_paraphrases = _paraphrase_candidates(
        entities, split_of, located, texts, options.seed, template_texts
    )
    test_facts = {_fact_key(c.question) for c in chosen["test"]}
    chosen["test_paraphrase"] = _stratified(
        [c for c in paraphrased if _fact_key(c.question) in test_facts],
        options.max_eval_questions,
        random.Random(f"{options.seed}-paraphrase-sample"),
    )
    dropped = {
        "ambiguous_questions": ambiguous,
        "ambiguous_paraphrases": ambiguous_paraphrases,
        "train_questions_mentioning_held_out": leaked,
        "train_questions_on_held_out_pairs": len(inverse),
    }
    return {s: [c.question for c in chosen[s]] for s in SPLITS}, dropped


def build(options: WorldOptions) -> World:
    entities = load_entities(options)
    passages = [pk for e in entities for pk in chunk_entity(e, options.max_words)]
    splits, dropped = make_splits(entities, passages, options)
    kinds = Counter(e.kind for e in entities)
    corpus = [p for p, _ in passages]
    fever = build_claims(entities, corpus, {s: splits[s] for s in FEVER_SPLITS}, options.seed)
    generation = build_generation_tasks(entities, corpus, splits, options.seed)
    return World(corpus, splits, {k: kinds[k] for k in KINDS}, dropped, fever, generation)


# ----------------------------------------------------------------------------- files and manifest


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _tokenizer_texts(world: World) -> Iterable[str]:
    for p in world.passages:
        yield p.title
        yield p.text
    for q in world.splits["train"]:
        yield q.question


def write_world(world: World, out_dir: Path, options: WorldOptions) -> dict[str, Any]:
    """Write every file and the manifest into ``out_dir``; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / CORPUS_FILE, (asdict(p) for p in world.passages))
    for split in SPLITS:
        _write_jsonl(out_dir / f"{split}.jsonl", (q.to_json() for q in world.splits[split]))
    (out_dir / "fever").mkdir(exist_ok=True)
    for split, rows in world.fever.items():
        _write_jsonl(out_dir / FEVER_FILES[split], rows)
    for task, by_split in world.generation.items():
        (out_dir / task).mkdir(exist_ok=True)
        for split, rows in by_split.items():
            _write_jsonl(out_dir / GEN_FILES[task][split], rows)
    tok_dir = out_dir / TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    train_generator_tokenizer(_tokenizer_texts(world), tok_dir, vocab_size=options.vocab_size)

    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "builder": __name__,
        "format_version": FORMAT_VERSION,
        "build_key": build_key(options),
        "options": asdict(options),
        "sources": source_versions(),
        "versions": {
            "tokenizers": metadata.version("tokenizers"),
            "transformers": metadata.version("transformers"),
        },
        "counts": {
            "entities": world.entities,
            "passages": len(world.passages),
            "passages_by_kind": dict(sorted(Counter(p.id.split("-", 1)[0] for p in world.passages).items())),
            "questions": {s: len(world.splits[s]) for s in SPLITS},
            "questions_by_relation": {
                s: dict(sorted(Counter(q.relation for q in world.splits[s]).items())) for s in SPLITS
            },
            "dropped": world.dropped,
            "fever_claims": {
                s: dict(sorted(Counter(r["output"][0]["answer"] for r in rows).items()))
                for s, rows in world.fever.items()
            },
            "generation_rows": {
                task: {s: len(rows) for s, rows in by_split.items()} for task, by_split in world.generation.items()
            },
        },
        "files": {
            p.relative_to(out_dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in files
        },
    }
    (out_dir / MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def build_world(out_dir: str | Path, options: WorldOptions | None = None) -> dict[str, Any]:
    """Build the world data set into ``out_dir`` (created or overwritten file by file)."""
    options = options or WorldOptions()
    world = build(options)
    return write_world(world, Path(out_dir), options)
