"""The test_paraphrase split: the held-out test facts asked in phrasings written apart from the training
templates (data/world_paraphrases.py), and the per-relation breakdown of a run's test splits."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import pytest

from rag_lightning.config import DataConfig, section
from rag_lightning.data.prepare_data import PrepareError, ensure_prepared, world_test_file
from rag_lightning.data.world_paraphrases import PARAPHRASES
from rag_lightning.data.world_sources import fold
from rag_lightning.data.world_templates import QUESTIONS
from rag_lightning.metrics import scores_by_category
from rag_lightning.pipeline import BREAKDOWN_FILE, write_breakdown
from tests.world_builds import SMALL, SPLITS, data_config, data_node, read_build

# a small world set, every held-out fact kept (no cap on the eval splits)
OPTIONS = [f"data.world.{k}={v}" for k, v in {**SMALL, "max_eval_questions": 100_000}.items()]


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _regex(template: str) -> re.Pattern[str]:
    """A phrasing with any text in its slots, case- and accent-insensitive (matched against folded text)."""
    parts = re.split(r"\{\w+\}", fold(template))
    return re.compile(".+".join(re.escape(p) for p in parts))


TEMPLATE_RES = [_regex(t) for ts in QUESTIONS.values() for t in ts]
PARAPHRASE_RES = [_regex(p) for ps in PARAPHRASES.values() for p in ps]


def _matches(text: str, patterns: list[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(fold(text)) for p in patterns)


def test_every_relation_has_four_paraphrases_with_its_template_slots() -> None:
    assert set(PARAPHRASES) == set(QUESTIONS)
    for relation, paraphrases in PARAPHRASES.items():
        assert len(paraphrases) >= 4 and len(set(paraphrases)) == len(paraphrases), relation
        slots = {s for t in QUESTIONS[relation] for s in _slots(t)}
        assert all(_slots(p) == slots for p in paraphrases), relation


def test_no_paraphrase_is_a_training_template_in_any_filling() -> None:
    """Not equal as templates, and neither side matches the other with any text in its slots (so "Who
    discovered the element {name}?" would be refused: it is the template "Who discovered {name}?")."""
    templates = {fold(t) for ts in QUESTIONS.values() for t in ts}
    for relation, paraphrases in PARAPHRASES.items():
        for p in paraphrases:
            assert fold(p) not in templates
            filled = p.format(**{s: "Xanadu" for s in _slots(p)})
            assert not _matches(filled, TEMPLATE_RES), (relation, p)
    for ts in QUESTIONS.values():
        for t in ts:
            assert not _matches(t.format(**{s: "Xanadu" for s in _slots(t)}), PARAPHRASE_RES), t


def _words(template: str) -> set[str]:
    return set(re.findall(r"[a-z{}']+", template.lower()))


def test_no_training_phrasing_comes_close_to_a_paraphrase_of_its_relation() -> None:
    """Two authors writing "other words" converge ("How populous is {name}?" was written on both sides): every
    training phrasing shares less than 0.8 of its word set (slot names included; Jaccard) with every paraphrase
    of its relation, so the split asks in words that training never used."""
    close = []
    for relation, paraphrases in PARAPHRASES.items():
        for t in QUESTIONS[relation][:-1]:
            for p in paraphrases:
                a, b = _words(t), _words(p)
                if len(a & b) / len(a | b) >= 0.8:
                    close.append((relation, t, p))
    assert close == []


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The small world set (OPTIONS), built as rag-prepare builds it."""
    return read_build(data_config(tmp_path_factory.mktemp("cache"), "world", *OPTIONS))


def test_paraphrase_split_asks_the_test_facts_of_held_out_subjects(small: dict[str, Any]) -> None:
    splits = small["splits"]
    para, test = splits["test_paraphrase"], splits["test"]
    assert para and small["manifest"]["counts"]["questions"]["test_paraphrase"] == len(para)
    trained = {q["subject"] for q in splits["train"]} | {q["subject"] for q in splits["val"]}
    assert not {q["subject"] for q in para} & trained
    test_facts = {q["id"].rsplit(".", 1)[0]: q for q in test}
    dropped = small["manifest"]["counts"]["dropped"]["ambiguous_paraphrases"]
    # every test fact, less those whose paraphrase is ambiguous
    assert len(para) + dropped >= len(test) > dropped
    for q in para:
        fact, phrasing = q["id"].rsplit(".", 1)
        same = test_facts[fact]  # the same fact as a test question: same answers, gold passages and objects
        assert [q[k] for k in ("answers", "gold_passage_ids", "relation", "subject", "objects")] == [
            same[k] for k in ("answers", "gold_passage_ids", "relation", "subject", "objects")
        ]
        template = PARAPHRASES[q["relation"]][int(phrasing.removeprefix("q"))]
        assert _regex(template).fullmatch(fold(q["question"])), q
    # every relation the test split asks is asked in paraphrase too
    relations = {q["relation"] for q in para}
    assert relations == {q["relation"] for q in test} and len(relations) > 20
    assert len({q["id"].rsplit(".", 1)[1] for q in para}) >= 4  # several phrasings drawn, not one


def test_paraphrase_answers_are_in_gold_passages(small: dict[str, Any]) -> None:
    for q in small["splits"]["test_paraphrase"]:
        texts = [small["passages"][p]["text"] for p in q["gold_passage_ids"]]
        assert all(any(a in t for t in texts) for a in q["answers"]), q["id"]


def test_no_question_text_is_shared_between_paraphrases_and_templates(small: dict[str, Any]) -> None:
    splits = small["splits"]
    para = [q["question"] for q in splits["test_paraphrase"]]
    others = [q["question"] for s in SPLITS[:-1] for q in splits[s]]
    assert not {fold(t) for t in para} & {fold(t) for t in others}
    assert not [t for t in para if _matches(t, TEMPLATE_RES)]  # no paraphrase question is template-made
    assert not [t for t in others if _matches(t, PARAPHRASE_RES)]  # no other split's question is ours
    assert len({fold(t) for t in para}) == len(para)


def test_world_config_tests_on_the_paraphrase_split_and_tasks_do_not(
    tmp_path: Path, small: dict[str, Any]
) -> None:
    cfg = data_config(tmp_path)
    assert cfg.test_files()["test_paraphrase"] == f"{cfg.dir}/test_paraphrase.jsonl"
    for task in ("world_fever", "world_abstractive", "world_dialogue", "world_jeopardy", "world_summary"):
        assert "test_paraphrase" not in data_config(tmp_path, task).test_files(), task
    # a run trained before the split existed names no file for it: rag-eval finds the world's
    old = DataConfig(
        name="world", build="world", dir="/w", corpus_file="/w/c", train_file=None, val_file=None,
        test_file="/w/test.jsonl", extra_test_files={"test_seen": "/w/test_seen.jsonl"},
    )
    assert world_test_file(old, "test_paraphrase") == str(Path("/w/test_paraphrase.jsonl"))
    assert world_test_file(old, "test_seen") == "/w/test_seen.jsonl"
    assert world_test_file(DataConfig(name="x", build=None, dir="/u", corpus_file="/u/c", train_file=None,
                                      val_file=None, test_file=None), "test_paraphrase") is None
    # a world config naming a paraphrase file the builder did not write is refused, naming the key
    missing = f"data.extra_test_files.test_paraphrase={tmp_path / 'nope.jsonl'}"
    node = data_node(small["root"].parent.parent, "world", *OPTIONS, missing)
    with pytest.raises(PrepareError, match=r"data.extra_test_files.test_paraphrase=.*nope.jsonl does not exist"):
        ensure_prepared(section(DataConfig, node, "data"))


def test_scores_by_category_is_a_hand_count() -> None:
    records = [
        {"id": "a", "em": 1.0, "f1": 1.0},
        {"id": "b", "em": 0.0, "f1": 0.5},
        {"id": "c", "em": 1.0, "f1": 1.0},
        {"id": "d", "em": 0.0, "f1": 0.0},
        {"id": "e", "em": 1.0, "f1": 1.0},  # no category: left out
    ]
    table = scores_by_category(records, {"a": "capital", "b": "capital", "c": "area", "d": "capital"})
    assert table == {
        "area": {"n": 1, "em": 1.0, "f1": 1.0},
        "capital": {"n": 3, "em": pytest.approx(1 / 3), "f1": pytest.approx(0.5)},
    }
    assert list(table) == ["area", "capital"]


def test_breakdown_file_per_split_and_relation(tmp_path: Path) -> None:
    qa = tmp_path / "para.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "q1", "question": "x", "answers": ["a"], "relation": "capital"},
        {"id": "q2", "question": "y", "answers": ["b"], "relation": "capital"},
        {"id": "q3", "question": "z", "answers": ["c"], "relation": "symbol"},
    ]))
    plain = tmp_path / "plain.jsonl"  # user data without a relation field: left out
    plain.write_text(json.dumps({"id": "q1", "question": "x", "answers": ["a"]}) + "\n")
    preds = tmp_path / "predictions_test_paraphrase.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "q1", "prediction": "a", "answers": ["a"], "em": 1.0, "f1": 1.0},
        {"id": "q2", "prediction": "c", "answers": ["b"], "em": 0.0, "f1": 0.0},
        {"id": "q3", "prediction": "c", "answers": ["c"], "em": 1.0, "f1": 1.0},
    ]))
    written = write_breakdown(tmp_path, {"test_paraphrase": (preds, str(qa)), "test": (preds, str(plain))})
    expected = {
        "test_paraphrase": {"capital": {"n": 2, "em": 0.5, "f1": 0.5}, "symbol": {"n": 1, "em": 1.0, "f1": 1.0}}
    }
    assert written == expected == json.loads((tmp_path / BREAKDOWN_FILE).read_text())
    assert write_breakdown(tmp_path / "none", {"test": (preds, str(plain))}) == {}
    assert not (tmp_path / "none").exists()


def test_report_finds_the_paraphrase_file_of_train_and_eval_runs(tmp_path: Path) -> None:
    """rag-report groups by relation from the split's QA file: a train run names it in extra_test_files; a run
    trained before the split existed, and a rag-eval run of it that names no file, find the world build's."""
    from rag_lightning.report.analysis import qa_file_of

    world = tmp_path / "world"
    world.mkdir()
    (world / "test_paraphrase.jsonl").write_text("{}\n")
    new = {"data": {"build": "world", "dir": str(world), "test_file": str(world / "test.jsonl"),
                    "extra_test_files": {"test_paraphrase": "/named/test_paraphrase.jsonl"}}}
    assert qa_file_of(new, "test_paraphrase") == "/named/test_paraphrase.jsonl"
    old = {"data": {**new["data"], "extra_test_files": {"test_seen": str(world / "test_seen.jsonl")}}}
    assert qa_file_of(old, "test_paraphrase") == str(world / "test_paraphrase.jsonl")
    assert qa_file_of(old, "test_other") is None  # not built: no file
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config_resolved.yaml").write_text(json.dumps(old))  # JSON is YAML
    evaluated = {"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "split_name": "test_paraphrase",
                 "data": {"test_file": None}}
    assert qa_file_of(evaluated, "test_paraphrase") == str(world / "test_paraphrase.jsonl")
    assert qa_file_of({**evaluated, "split_name": "test"}, "test") == str(world / "test.jsonl")
    assert qa_file_of({**evaluated, "data": {"test_file": "/mine.jsonl"}}, "test_paraphrase") == "/mine.jsonl"
