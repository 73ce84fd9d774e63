"""The generation tasks of the world set (world_gen.py): built by rag-prepare from the QA splits' facts, held out
by fact in both directions, targets built right, read by the KILT reader, experiments that fit their targets."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import DataConfig, WorldOptions, section
from rag_lightning.data import world
from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
from rag_lightning.data.prepare_data import ensure_prepared
from rag_lightning.data.readers import read_qa
from rag_lightning.data.world_gen import ASPECTS, TASK_SPLITS, TASKS, fact_table, names_entity, sentence

HELD_OUT = ("val", "test")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default world set written by `rag-prepare data=world` (through the config), with its entities."""
    cache = tmp_path_factory.mktemp("cache")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        node = compose("prepare", overrides=["data=world", f"paths.cache_dir={cache}"]).data
    manifest = ensure_prepared(section(DataConfig, node, "data"))
    root = Path(manifest["dir"])
    options = WorldOptions()
    entities = world.load_entities(options)
    return {
        "root": root,
        "cache": cache,
        "manifest": manifest,
        "facts": fact_table(entities),
        "passages": {p["id"]: p for p in _jsonl(root / "corpus.jsonl")},
        "qa": {s: _jsonl(root / f"{s}.jsonl") for s in world.SPLITS},
        "rows": {t: {s: _jsonl(root / t / f"{s}.jsonl") for s in TASK_SPLITS[t]} for t in TASKS},
    }


def _pairs(row: dict[str, Any]) -> set[frozenset[str]]:
    return {frozenset((row["meta"]["subject"], o)) for o in row["meta"]["objects"]}


def _gold(row: dict[str, Any]) -> set[str]:
    return {f"{p['wikipedia_id']}-{p['start_paragraph_id']}" for o in row["output"] for p in o["provenance"]}


def test_every_task_is_written_counted_and_read_by_the_kilt_reader(built: dict[str, Any]) -> None:
    counts = built["manifest"]["counts"]["generation_rows"]
    for task in TASKS:
        for split in TASK_SPLITS[task]:
            rows = built["rows"][task][split]
            examples = read_qa(built["root"] / task / f"{split}.jsonl")  # KILT layout, no flag
            assert len(examples) == len(rows) == counts[task][split] > 0, (task, split)
            for ex, row in zip(examples, rows):
                assert ex.gold_passage_ids and all(p in built["passages"] for p in ex.gold_passage_ids)
                assert ex.answers[0] == row["output"][0]["answer"] and ex.provenance
            if split != "train":
                assert len(rows) <= 300
    assert counts["abstractive"]["val"] == counts["dialogue"]["val"] == len(built["qa"]["val"])


def test_held_out_rows_share_no_pair_or_gold_passage_with_train_rows(built: dict[str, Any]) -> None:
    """Split by fact in both directions: no val/test row of any task is about a pair of entities that a train row
    (of any task, or a train question) is about, so none shares a gold passage on that pair either."""
    qa_train_pairs = {frozenset((q["subject"], o)) for q in built["qa"]["train"] for o in q["objects"]}
    all_train_rows = [r for t in TASKS for r in built["rows"][t]["train"]]
    train_pairs = {p for r in all_train_rows for p in _pairs(r)} | qa_train_pairs
    train_on_pair = {(p, g) for r in all_train_rows for p in _pairs(r) for g in _gold(r)}
    train_subjects = {r["meta"]["subject"] for r in all_train_rows}
    for task in TASKS:
        held = [r for s in HELD_OUT for r in built["rows"][task][s]]
        held_pairs = {p for r in held for p in _pairs(r)}
        if task != "summary":  # summaries state single-valued facts, mostly numbers and names of no entity
            assert len(held_pairs) > 10, task
        assert not held_pairs & train_pairs, task
        assert not {(p, g) for r in held for p in _pairs(r) for g in _gold(r)} & train_on_pair, task
        assert not {r["meta"]["subject"] for r in held} & train_subjects, task
        # every row states facts its own QA split asks, and only those
        for split in TASK_SPLITS[task]:
            asked = {q["id"].rsplit(".", 1)[0] for q in built["qa"][split]}
            assert all(set(r["meta"]["facts"]) <= asked for r in built["rows"][task][split]), (task, split)


def test_jeopardy_clues_state_a_fact_without_naming_the_entity(built: dict[str, Any]) -> None:
    facts, rows = built["facts"], built["rows"]["jeopardy"]
    for split in TASK_SPLITS["jeopardy"]:
        inputs = Counter(r["input"] for r in rows[split])
        for row in rows[split]:
            entity, _ = facts[row["meta"]["facts"][0]]
            assert row["input"] == entity.name
            clues = [o["answer"] for o in row["output"]]
            assert all(c.startswith(("This ", "The ", "People ")) or " this " in c for c in clues), clues
            assert not any(names_entity(c, entity) for c in clues), clues
            own = facts[row["meta"]["facts"][0]][1]
            # the first clue (the target) states the row's first fact: one of its answers (a division's name, for
            # division_of, whose answer is the country) is in it
            values = [*own.answers, *(v for k, v in own.slots.items() if k != "name")]
            assert any(v in clues[0] for v in values), (clues[0], values)
            if split == "train":
                assert len(row["meta"]["facts"]) == 1
            else:  # one row per entity, scored against all its clues in the split
                assert inputs[row["input"]] == 1 and len(clues) == len(set(clues)) >= 1
    sample = next(r for r in rows["train"] if r["meta"]["facts"][0].split(".")[1] == "capital")
    assert re.fullmatch(r"This country's capital is .+\.", sample["output"][0]["answer"])


def test_abstractive_answers_are_full_sentences_with_the_answer(built: dict[str, Any]) -> None:
    for split in TASK_SPLITS["abstractive"]:
        questions = {q["id"]: q for q in built["qa"][split]}
        for row in built["rows"]["abstractive"][split]:
            q = questions[row["id"].removesuffix(".sentence")]
            assert row["input"] == q["question"]
            sentences = [o["answer"] for o in row["output"]]
            assert len(sentences) == len(q["answers"])
            for text, answer in zip(sentences, q["answers"]):
                assert answer in text and not text[0].islower() and text.endswith(".")
                assert len(text.split()) > len(answer.split()) + 2
    chad = next(r for r in built["rows"]["abstractive"]["train"] if r["meta"]["relation"] == "capital")
    assert re.fullmatch(r"The capital of .+ is .+\.", chad["output"][0]["answer"])


def test_dialogue_turns_refer_back_and_end_in_the_asked_question(built: dict[str, Any]) -> None:
    facts = built["facts"]
    for split in TASK_SPLITS["dialogue"]:
        questions = {q["id"]: q for q in built["qa"][split]}
        turns = Counter()
        for row in built["rows"]["dialogue"][split]:
            q = questions[row["id"].removesuffix(".dialogue")]
            lines = row["input"].split("\n")
            n = row["meta"]["turns"]
            turns[n] += 1
            assert len(lines) == 2 * n - 1 and [o["answer"] for o in row["output"]] == q["answers"]
            assert row["meta"]["facts"][-1] == q["id"].rsplit(".", 1)[0]
            entity, _ = facts[row["meta"]["facts"][-1]]
            if n == 1:
                assert lines == [q["question"]]
                continue
            first, *_ = row["meta"]["facts"]
            assert any(lines[0] == other["question"] for other in questions.values()
                       if other["id"].rsplit(".", 1)[0] == first)  # fmt: skip
            for i in range(1, n):  # each answer is the previous question's; later turns refer back
                fact = facts[row["meta"]["facts"][i - 1]][1]
                assert lines[2 * i - 1] == f"{fact.answers[0]}."
                assert lines[2 * i].startswith("And ") and f"that {entity.kind}" in lines[2 * i]
                assert not names_entity(lines[2 * i], entity)
        assert set(turns) == {1, 2, 3} and turns[2] + turns[3] >= 0.25 * sum(turns.values()), (split, turns)


def test_summaries_combine_facts_from_different_passages(built: dict[str, Any]) -> None:
    facts, passages = built["facts"], built["passages"]
    for split in TASK_SPLITS["summary"]:
        rows = built["rows"]["summary"][split]
        assert Counter(r["meta"]["sentences"] for r in rows).keys() == {2, 3}
        for row in rows:
            chosen = [facts[k] for k in row["meta"]["facts"]]
            entity = chosen[0][0]
            target = row["output"][0]["answer"]
            assert len(row["output"]) == 1 and target == " ".join(sentence(f) for _, f in chosen)
            aspects = [ASPECTS[f.relation] for _, f in chosen]
            assert row["input"].startswith("Summarise ") and all(a in row["input"] for a in aspects)
            own = {p for p in _gold(row) if p.rsplit("-", 1)[0] == entity.id}
            texts = [passages[p]["text"] for p in own]
            holding = {p for p, text in zip(own, texts) for _, f in chosen if f.answers[0] in text}
            assert len(holding) >= 2, row  # the facts stand in two passages of the entity at least
            assert all(f.answers[0] in target for _, f in chosen)


@pytest.mark.parametrize("task", TASKS)
def test_each_experiment_reads_its_files_and_has_room_for_its_targets(built: dict[str, Any], task: str) -> None:
    tok = load_generator_tokenizer(built["root"] / "generator_tokenizer")
    rows = built["rows"][task]["val"] + built["rows"][task]["train"]
    pieces = sorted(len(ids) + 1 for ids in tok([" " + r["output"][0]["answer"] for r in rows],
                                                add_special_tokens=False).input_ids)  # fmt: skip
    for experiment in (f"world_{task}", f"world_{task}_closed_book"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.cache_dir={built['cache']}"])
        assert cfg.data.train_file.endswith(f"{task}/train.jsonl") and cfg.data.name == "world"
        assert cfg.task.monitor in cfg.task.metrics
        assert (cfg.model.mode == "closed_book") == experiment.endswith("closed_book")
        if task in ("jeopardy", "summary"):  # no test_seen: the world's QA test_seen is not this task's
            assert set(cfg.data.extra_test_files.values()) == {None}
        assert pieces[int(0.99 * len(pieces))] <= cfg.max_answer_length, experiment
        assert pieces[int(0.99 * len(pieces))] <= cfg.model.decoding.max_new_tokens + 1, experiment
