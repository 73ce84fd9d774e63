"""Readers: good rows parse, and every bad row is reported with its file, line and reason (or counted)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from rag_lightning.data.readers import (
    DataError,
    Passage,
    QAExample,
    ReadReport,
    iter_corpus,
    iter_qa,
    read_corpus,
    read_qa,
)

DATA = Path(__file__).parent / "data"


def test_dpr_tsv_corpus_with_quoted_text() -> None:
    rows = read_corpus(DATA / "corpus_dpr.tsv")
    assert rows == [
        Passage(id="1", title="Aaron", text='Aaron is a "prophet" in the Bible.'),
        Passage(id="2", title="Zurich", text="Zurich is a city in Switzerland."),
    ]
    assert rows.report.rows == 2 and rows.report.skipped == 0


@pytest.mark.parametrize(
    ("name", "line", "reason"),
    [
        ("corpus_malformed_json.jsonl", 2, "malformed JSON"),
        ("corpus_missing_title.jsonl", 3, "missing field 'title'"),
        ("corpus_empty_text.jsonl", 3, "field 'text' is empty"),
        ("corpus_duplicate_id.jsonl", 3, "duplicate id 'p1' (first used on line 1)"),
        ("corpus_invalid_utf8.jsonl", 2, "invalid UTF-8"),
        ("corpus_dpr_columns.tsv", 3, "expected 3 tab-separated columns"),
        ("corpus_dpr_no_header.tsv", 1, "header is"),
    ],
)
def test_corpus_errors_name_file_line_and_reason(name: str, line: int, reason: str) -> None:
    path = DATA / name
    with pytest.raises(DataError) as info:
        read_corpus(path)
    err = info.value
    assert (err.path, err.line) == (str(path), line)
    assert reason in err.reason
    message = str(err)
    assert message.startswith(f"{path}:{line}: ") and reason in message and "Fix: " in message


@pytest.mark.parametrize(
    ("name", "line", "reason"),
    [
        ("qa_bad_answers.jsonl", 2, "got a single string"),
        ("qa_missing_question.jsonl", 2, "missing field 'question'"),
        ("qa_dpr.csv", 3, "not a Python list literal"),
        ("qa_duplicate_id.jsonl", 3, "duplicate id 'q1' (first used on line 1)"),
    ],
)
def test_qa_errors_name_file_line_and_reason(name: str, line: int, reason: str) -> None:
    path = DATA / name
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: .*{re.escape(reason)}.*Fix: "):
        read_qa(path)


def test_skip_bad_rows_counts_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rows = read_qa(DATA / "qa_bad_answers.jsonl", skip_bad_rows=True)
    assert [ex.id for ex in rows] == ["q1", "qa_bad_answers-4"]
    assert rows[0] == QAExample(
        id="q1", question="What is the capital of France?", answers=("Paris",), gold_passage_ids=("p1",)
    )
    assert rows.report.rows == 2 and rows.report.skipped == 2
    assert rows.report.examples[0].startswith(f"{DATA / 'qa_bad_answers.jsonl'}:2: ")
    assert rows.report.examples[1].startswith(f"{DATA / 'qa_bad_answers.jsonl'}:3: ")
    assert "skipped 2 bad rows, kept 2" in caplog.text


def test_duplicate_question_ids_are_refused_or_skipped_keeping_the_first() -> None:
    """A question id names one example (predictions, metrics and provenance are keyed by it): a second row
    with the same id is a bad row. Integer and string ids are the same id, and an explicit id that equals
    a generated one (``<file stem>-<line>``) is a duplicate too."""
    path = DATA / "qa_duplicate_id.jsonl"
    rows = read_qa(path, skip_bad_rows=True)
    assert [(ex.id, ex.answers) for ex in rows] == [
        ("q1", ("Madrid",)), ("2", ("Rome",)), ("qa_duplicate_id-5", ("Bamako",)),
    ]
    assert rows.report.skipped == 3
    assert rows.report.examples == [
        f"{path}:3: duplicate id 'q1' (first used on line 1)",
        f"{path}:4: duplicate id '2' (first used on line 2)",
        f"{path}:6: duplicate id 'qa_duplicate_id-5' (first used on line 5)",
    ]


def test_skip_bad_rows_handles_every_corpus_fault() -> None:
    for name, kept in [
        ("corpus_malformed_json.jsonl", ["p1", "p3"]),
        ("corpus_invalid_utf8.jsonl", ["p1", "p3"]),
        ("corpus_duplicate_id.jsonl", ["p1", "p2"]),
        ("corpus_dpr_columns.tsv", ["1", "3"]),
    ]:
        rows = read_corpus(DATA / name, skip_bad_rows=True)
        assert [p.id for p in rows] == kept, name
        assert rows.report.skipped == 1, name
    # the first p1 wins, the duplicate is the one dropped
    assert read_corpus(DATA / "corpus_duplicate_id.jsonl", skip_bad_rows=True)[0].title == "Alpha"


@pytest.mark.parametrize("name", ["corpus_empty.jsonl", "qa_blank_lines.jsonl"])
def test_empty_file_is_an_error(name: str) -> None:
    reader = read_corpus if name.startswith("corpus") else read_qa
    with pytest.raises(DataError, match=rf"^{re.escape(str(DATA / name))}: file is empty"):
        reader(DATA / name, skip_bad_rows=True)


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "all_bad.jsonl"
    path.write_text('{"question": "q"}\n{"question": "r", "answers": []}\n')
    with pytest.raises(DataError, match=r"no valid rows \(2 bad rows skipped"):
        read_qa(path, skip_bad_rows=True)


def test_dpr_csv_answers_are_literals_and_code_is_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the malicious row would create ./rag_lightning_pwned if it were evaluated
    rows = read_qa(DATA / "qa_dpr.csv", skip_bad_rows=True)
    assert [(ex.id, ex.question, ex.answers) for ex in rows] == [
        ("qa_dpr-1", "what is the capital of france", ("Paris",)),
        ("qa_dpr-2", "who wrote the iliad", ("Homer", "homer")),
    ]
    assert rows.report.skipped == 2  # the call expression and the bare string
    assert "must be a list of strings" in rows.report.examples[1]
    assert not (tmp_path / "rag_lightning_pwned").exists()


def test_comma_separated_csv_with_header() -> None:
    rows = read_qa(DATA / "qa_comma.csv")
    assert [(ex.question, ex.answers) for ex in rows] == [
        ("what is the capital of italy, the country", ("Rome",))
    ]


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="corpus file not found"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "corpus.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"unsupported corpus format '\.txt'.*\.jsonl"):
        read_corpus(tmp_path / "corpus.txt")


def test_integer_ids_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 7, "title": "", "text": "untitled passages are allowed"}\n')
    assert read_corpus(path) == [Passage(id="7", title="", text="untitled passages are allowed")]


def test_iter_corpus_streams_and_fills_the_report() -> None:
    report = ReadReport(path="")
    rows = iter_corpus(DATA / "corpus_malformed_json.jsonl", skip_bad_rows=True, report=report)
    assert next(rows).id == "p1" and report.rows == 1  # counted as rows pass, nothing read ahead
    assert [p.id for p in rows] == ["p3"]
    assert (report.rows, report.skipped) == (2, 1)
    with pytest.raises(DataError, match="file is empty"):
        list(iter_qa(DATA / "qa_blank_lines.jsonl"))


def test_a_qa_row_may_name_its_relation_as_a_string(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        '{"id": "q1", "question": "Capital of France?", "answers": ["Paris"], "relation": "capital"}\n'
        '{"id": "q2", "question": "Capital of Chad?", "answers": ["N\'Djamena"]}\n'
        '{"id": "q3", "question": "Capital of Peru?", "answers": ["Lima"], "relation": 7}\n'
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: 'relation' must be a string.*Fix: "):
        read_qa(path)
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    assert [ex.relation for ex in read_qa(path)] == ["capital", ""]
