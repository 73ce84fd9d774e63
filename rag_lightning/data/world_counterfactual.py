"""A counterfactual copy of the world set, for the index hot-swap of the paper's §4.5.

RAG's knowledge sits in its index, so replacing the index should change what a trained model answers without
retraining it. To show this offline, ``rag-prepare data=world_counterfactual`` copies a built world set and
changes the facts of its held-out countries (the subjects of the test split, never seen in training): along
one seeded cycle through them, each country takes another's capital, population, area and calling code
(a different step of the cycle per relation). Every sentence that states a changed fact is rewritten with the
world's own template (``world_templates.country_entity`` run on the changed record), in every passage that
holds it; no other passage changes and passage ids stay the same. The QA files get the new gold answers:

- ``test.jsonl``: the world's test questions, answers (and gold passages of "X is the capital of which
  country?") updated; a changed question also carries ``old_answers``;
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
from collections import defaultdict
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

FORMAT_VERSION = 1
BUILDER = __name__
# a relation that can change -> the Country field holding it; the sentence key and question relation share its name
RELATIONS = {"capital": "capital", "population": "population", "area": "area", "calling_code": "calling_code"}
FILES = {
    "corpus": "corpus.jsonl",
    "test": "test.jsonl",
    "changed": "test_changed.jsonl",
    "original": "test_changed_original.jsonl",
    "changes": "changes.jsonl",
}


@dataclass(frozen=True)
class Change:
    """One changed fact: ``entity`` now states ``new`` (``donor``'s value) where it stated ``old``."""

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


def plan_changes(
    countries: list[Any], held_out: set[str], options: CounterfactualOptions
) -> tuple[list[Change], dict[str, Any]]:
    """The changes for the held-out countries (entity ids ``country-<alpha3>``), and the changed records.

    The held-out countries are shuffled (``options.seed``) into one cycle; for the i-th relation each country
    takes the value of the country i+1 steps on, so a country does not simply trade all its facts with one other.
    Facts equal to the donor's (two countries dialled with +1) do not change.
    """
    by_id = {f"country-{c.alpha3.lower()}": c for c in countries}
    cycle = sorted(e for e in held_out if e in by_id)
    random.Random(f"{options.seed}-counterfactual").shuffle(cycle)
    changed = {e: by_id[e] for e in cycle}
    changes: list[Change] = []
    for step, relation in enumerate(options.relations, start=1):
        if len(cycle) < 2:
            break
        shift = 1 + (step - 1) % (len(cycle) - 1)
        for i, entity in enumerate(cycle):
            donor = cycle[(i + shift) % len(cycle)]
            field_name = RELATIONS[relation]
            old_value = getattr(by_id[entity], field_name)
            new_value = getattr(by_id[donor], field_name)
            old, new = _value(by_id[entity], relation), _value(by_id[donor], relation)
            if old is None or new is None or old == new:
                continue
            changed[entity] = replace(changed[entity], **{field_name: new_value})
            assert getattr(by_id[entity], field_name) == old_value  # the source record stays as it was
            changes.append(
                Change(
                    entity=entity,
                    title=by_id[entity].name,
                    relation=relation,
                    old=old,
                    new=new,
                    donor=donor,
                    old_sentence=_sentence(by_id[entity], relation),
                    new_sentence=_sentence(replace(by_id[entity], **{field_name: new_value}), relation),
                )
            )
    return changes, changed


def rewrite_corpus(passages: list[dict[str, Any]], changes: list[Change]) -> tuple[list[dict[str, Any]], list[Change]]:
    """The corpus with every sentence that states a changed fact rewritten (in each passage holding it); the
    changes with the passages they rewrote. A changed fact no passage states is a build error, not a silent
    no-op."""
    out = [dict(p) for p in passages]
    located = []
    for change in changes:
        rows = [i for i, p in enumerate(out) if change.old_sentence in p["text"]]
        if not rows:
            raise PrepareError(
                f"counterfactual world: no passage states {change.old_sentence!r} ({change.entity}, "
                f"{change.relation}). Fix: rebuild the source world (rag-prepare data=world)"
            )
        for i in rows:
            out[i]["text"] = out[i]["text"].replace(change.old_sentence, change.new_sentence)
        located.append(replace(change, passage_ids=tuple(out[i]["id"] for i in rows)))
    return out, located


def rewrite_questions(
    questions: list[dict[str, Any]],
    changes: list[Change],
    changed: dict[str, Any],
    countries: list[Any],
    corpus: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The questions with the counterfactual world's answers; a changed one also carries ``old_answers``.

    Direct questions on a changed fact take the new value. "X is the capital of which country?" takes the
    country whose capital X now is, with that country's capital passage as gold.
    """
    new_of = {(c.entity, c.relation): c for c in changes}
    by_id = {f"country-{c.alpha3.lower()}": c for c in countries}
    now = {e: changed.get(e, c) for e, c in by_id.items()}
    owners: dict[str, list[str]] = defaultdict(list)  # capital -> the countries that have it now
    for entity, country in now.items():
        owners[country.capital].append(entity)
    out = []
    for q in questions:
        row = dict(q)
        change = new_of.get((q.get("subject"), q.get("relation")))
        if change is not None:
            row["answers"] = [change.new]
        elif q.get("relation") == "capital_of" and q.get("subject") in by_id:
            who = owners.get(by_id[q["subject"]].capital, [])
            if who and who != [q["subject"]]:
                row["answers"] = [by_id[e].name for e in who]
                sentences = [_sentence(now[e], "capital") for e in who]
                row["gold_passage_ids"] = [p["id"] for p in corpus if any(s in p["text"] for s in sentences)]
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
    changes, changed = plan_changes(countries, held_out, options)
    corpus, changes = rewrite_corpus(passages, changes)
    new_test = rewrite_questions(test, changes, changed, countries, corpus)
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
