"""KILT formats: task files of every KILT task type and the knowledge source, read through the ordinary readers
(no flag); malformed rows fail with file:line; KILT's provenance metrics on hand-worked examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_lightning import metrics
from rag_lightning.data.kilt import KiltPassage
from rag_lightning.data.readers import DataError, read_corpus, read_qa


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def prov(page: str | int, start: int | None = None, end: int | None = None, title: str = "T") -> dict:
    p = {"wikipedia_id": page, "title": title}
    if start is not None:
        p.update(start_paragraph_id=start, end_paragraph_id=start if end is None else end)
    return p


# one row per KILT task type, as the KILT release writes them
KILT_ROWS = {
    "nq": {"id": "nq1", "input": "who wrote hamlet", "output": [
        {"answer": "William Shakespeare", "provenance": [prov(100, 2)]}, {"answer": "Shakespeare"}]},
    "fever": {"id": "fv1", "input": "Hamlet is a play.", "output": [
        {"answer": "SUPPORTS", "provenance": [prov(100, 0), prov(200, 3)]}]},
    "trex": {"id": "tr1", "input": "Hamlet [SEP] author", "output": [{"answer": "Shakespeare", "provenance": [
        prov("100", 1)]}], "meta": {"subj_aliases": [], "template_questions": ["who wrote hamlet?"]}},
    "zsre": {"id": "zs1", "input": "Hamlet [SEP] author", "output": [{"answer": "Shakespeare"}]},
    "hotpotqa": {"id": "hp1", "input": "which play...", "output": [
        {"answer": "Hamlet", "provenance": [prov(100, 1), prov(300, 0, 2)]}]},
    "eli5": {"id": "el1", "input": "why is the sky blue?", "output": [
        {"answer": "Because of Rayleigh scattering."}, {"provenance": [prov(400)]}]},
    "wow": {"id": "ww1", "input": "I like plays.\nHamlet is great.\nWho wrote it?", "output": [
        {"answer": "Shakespeare wrote it around 1600.", "provenance": [prov(100, 4)]}]},
    "aidayago2": {"id": "el2", "input": "... [START_ENT] Hamlet [END_ENT] ...", "output": [
        {"answer": "Hamlet", "provenance": [prov(100)]}]},
}


def test_every_kilt_task_type_reads_as_qa_without_a_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all-kilt.jsonl", list(KILT_ROWS.values()))
    rows = {ex.id: ex for ex in read_qa(path)}
    assert len(rows) == len(KILT_ROWS)
    nq = rows["nq1"]
    assert nq.question == "who wrote hamlet" and nq.answers == ("William Shakespeare", "Shakespeare")
    assert nq.provenance == (("100",),) and nq.gold_passage_ids == ("100-2",)
    fever = rows["fv1"]
    assert fever.answers == ("SUPPORTS",) and fever.provenance == (("100", "200"),)
    assert fever.gold_passage_ids == ("100-0", "200-3")
    assert rows["hp1"].gold_passage_ids == ("100-1", "300-0", "300-1", "300-2")
    assert rows["zs1"].provenance == () and rows["el1"].provenance == (("400",),)
    assert rows["ww1"].question.split("\n")[-1] == "Who wrote it?"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"id": "a", "input": "q"}, "missing field 'output'"),
        ({"id": "a", "input": "q", "output": [{"answer": "x", "provenance": [{"title": "T"}]}]},
         "output 1 provenance 1: no 'wikipedia_id'"),
        ({"id": "a", "input": "q", "output": [{"provenance": [prov(1)]}]}, "no output has a non-empty 'answer'"),
        ({"id": "a", "input": "q", "output": [{"answer": "x", "provenance": [prov(1, 3, 1)]}]},
         "output 1 provenance 1: end_paragraph_id 1 is before start_paragraph_id 3"),
        ({"id": "a", "input": "", "output": [{"answer": "x"}]}, "field 'input' is empty"),
    ],
)
def test_malformed_kilt_rows_fail_with_file_and_line(tmp_path: Path, row: dict, reason: str) -> None:
    good = KILT_ROWS["nq"]
    path = write_jsonl(tmp_path / "dev-kilt.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        read_qa(path)
    assert f"{path}:2: {reason}" in str(err.value) and "KILT object" in str(err.value)


def test_bad_utf8_in_a_kilt_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "dev-kilt.jsonl"
    path.write_bytes(json.dumps(KILT_ROWS["nq"]).encode() + b"\n" + b'{"id": "b", "input": "\xff"}\n')
    with pytest.raises(DataError, match=r"dev-kilt.jsonl:2: invalid UTF-8"):
        read_qa(path)
    rows = read_qa(path, skip_bad_rows=True)
    assert [ex.id for ex in rows] == ["nq1"] and rows.report.skipped == 1


PAGES = [
    {"wikipedia_id": "100", "wikipedia_title": "Hamlet", "text": ["Hamlet\n", "Hamlet is a tragedy.", "",
                                                                "word " * 250]},
    {"wikipedia_id": "200", "wikipedia_title": "William Shakespeare", "text": ["William Shakespeare"]},
]


@pytest.mark.parametrize("name", ["kilt_knowledgesource.json", "pages.jsonl"])
def test_knowledge_source_splits_pages_into_passages_that_remember_page_and_paragraph(
    tmp_path: Path, name: str
) -> None:
    passages = read_corpus(write_jsonl(tmp_path / name, PAGES))
    assert [p.id for p in passages] == ["100-0", "100-1", "100-3", "100-3.1", "100-3.2", "200-0"]
    assert all(isinstance(p, KiltPassage) for p in passages)
    assert [(p.wikipedia_id, p.paragraph_id) for p in passages][2:5] == [("100", 3)] * 3
    assert [len(p.text.split()) for p in passages][2:5] == [100, 100, 50]  # DPR-sized pieces of a long paragraph
    assert passages[1].title == "Hamlet" and passages[1].text == "Hamlet is a tragedy."
    assert {metrics.page_of(p.id) for p in passages} == {"100", "200"}


@pytest.mark.parametrize(
    ("page", "reason"),
    [
        ({"wikipedia_id": "300", "wikipedia_title": "Empty", "text": []}, "page has no paragraphs"),
        ({"wikipedia_title": "No id", "text": ["x"]}, "'wikipedia_id' must be a non-empty string or integer"),
        ({"wikipedia_id": "100", "wikipedia_title": "Again", "text": ["x"]}, "duplicate id '100'"),
    ],
)
def test_malformed_pages_fail_with_file_and_line(tmp_path: Path, page: dict, reason: str) -> None:
    path = write_jsonl(tmp_path / "kilt_knowledgesource.json", [PAGES[0], page])
    with pytest.raises(DataError) as err:
        read_corpus(path)
    assert f"{path}:2: " in str(err.value) and reason in str(err.value) and "KILT page" in str(err.value)


def test_kilt_pages_with_bad_utf8_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "kilt_knowledgesource.json"
    path.write_bytes(json.dumps(PAGES[1]).encode() + b"\n\xfe\xff\n")
    with pytest.raises(DataError, match=r"kilt_knowledgesource.json:2: invalid UTF-8"):
        read_corpus(path)


# --------------------------------------------------------------------------- KILT metrics, worked by hand
def test_r_precision_by_hand() -> None:
    # one evidence set of R=2 pages; the first 2 retrieved pages are A, C: one of two is gold
    assert metrics.r_precision(["A", "C", "B"], [["A", "B"]]) == 0.5
    # several outputs: the best one counts (R=1, first page B is gold)
    assert metrics.r_precision(["B", "A"], [["A", "C"], ["B"]]) == 1.0
    assert metrics.r_precision(["A"], []) == 0.0


def test_page_recall_at_k_counts_an_evidence_set_when_its_last_page_arrives() -> None:
    # KILT's rank: A opens set {A,B} (a partial point), C is a miss, B completes the set and takes its place
    # after C: rank = [miss, complete]
    pages = ["A", "C", "B"]
    assert metrics.page_recall_at_k(pages, [["A", "B"]], 1) == 0.0
    assert metrics.page_recall_at_k(pages, [["A", "B"]], 2) == 1.0
    # two evidence sets, {C} complete at place 2 ([partial A, C done] -> rank [partial, True]): 1 of 2 sets at k=2
    assert metrics.page_recall_at_k(["A", "C"], [["A", "B"], ["C"]], 2) == 0.5
    # duplicate evidence sets count once
    assert metrics.page_recall_at_k(["A"], [["A"], ["A"]], 1) == 1.0


def test_ranked_pages_deduplicates_passages_of_one_page_in_rank_order() -> None:
    assert metrics.ranked_pages(["100-3", "100-3.1", "200-0", "100-1", "country-fra-1"]) == [
        "100", "200", "country-fra"
    ]
