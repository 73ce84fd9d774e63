"""A generated sweep of malformed files through every reader (corpus .jsonl / DPR .tsv, QA .jsonl / DPR .csv
with tabs or commas): each variant, read strictly and with skip_bad_rows, ends as rows, a counted skip, or a
DataError naming the file (and line); never another exception. Benign variants (BOM, CRLF, blank lines) keep
every row. The QA .jsonl variants also go through `rag-prepare`: exit 0 or 2, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_lightning.data.readers import DataError, ReadReport, iter_corpus, iter_qa

HUGE = 3_000_000  # characters in one line or word

CORPUS_JSONL = [json.dumps({"id": f"p{i}", "title": f"T{i}", "text": f"Passage {i} text."}) for i in range(4)]
CORPUS_TSV = ["id\ttext\ttitle", *(f"{i}\tPassage {i} text.\tT{i}" for i in range(4))]
QA_JSONL = [json.dumps({"id": f"q{i}", "question": f"Question {i}?", "answers": [f"A{i}"]}) for i in range(4)]
QA_CSV_TAB = [f"Question {i}?\t['A{i}']" for i in range(4)]
QA_CSV_COMMA = [f'Question {i}?,"[\'A{i}\']"' for i in range(4)]


def _json_variants(good: list[str], fields: dict[str, object]) -> dict[str, list[str]]:
    """Missing fields and wrong types of each field, the rest of the row kept."""
    first = json.loads(good[0])
    out = {}
    for key in fields:
        out[f"missing {key}"] = [json.dumps({k: v for k, v in first.items() if k != key}), *good[1:]]
        for name, wrong in (("number", 7.5), ("null", None), ("list", [1, 2]), ("object", {"a": 1}), ("bool", True)):
            out[f"{key} {name}"] = [json.dumps({**first, key: wrong}), *good[1:]]
    return out


def variants(good: list[str], kind: str) -> dict[str, bytes]:
    """Malformed (and benign) versions of a good file, as bytes."""
    lines = {
        "blank lines": ["", *good[:2], "   ", *good[2:], ""],
        "duplicate row": [*good, good[-1]],
        "huge line": [*good, good[0][:-1] + " " + "y" * HUGE + good[0][-1]],
        "huge word in a row": [good[0].replace("Question 0", "x" * HUGE).replace("Passage 0", "x" * HUGE), *good[1:]],
        "truncated last line": [*good[:-1], good[-1][: len(good[-1]) // 2]],
        "only a header or nothing": good[:1] if kind == "corpus.tsv" else [],
        "one column": [*good, "lonely"],
        "many columns": [*good, "\t".join(["x"] * 50)],
        "deep nesting": [*good, "[" * 100_000 + "]" * 100_000],
        "NUL bytes": [*good, good[0].replace("0", "\x00")],
    }
    if kind.endswith("jsonl"):
        lines["not an object"] = [*good, "[1, 2]", "42", '"text"']
        lines["nested answers"] = [*good, good[0].replace('["A0"]', '[["A0"]]')]
        fields = {"id": 1, "title": 1, "text": 1} if kind == "corpus.jsonl" else {"id": 1, "question": 1, "answers": 1}
        lines.update(_json_variants(good, fields))
    if kind.startswith("qa"):
        lines["answers not a list"] = [good[0].replace("['A0']", "'A0'").replace('["A0"]', '"A0"'), *good[1:]]
        lines["answers a call"] = [good[0].replace("['A0']", "__import__('os').getcwd()"), *good[1:]]
        lines["empty answers"] = [good[0].replace("['A0']", "[]").replace('["A0"]', "[]"), *good[1:]]
        lines["deep answers"] = [good[0].replace("['A0']", "[" * 50_000 + "]" * 50_000), *good[1:]]
    out = {name: "\n".join(rows).encode() + b"\n" for name, rows in lines.items()}
    body = "\n".join(good).encode() + b"\n"
    out["empty file"] = b""
    out["BOM"] = b"\xef\xbb\xbf" + body
    out["CRLF"] = body.replace(b"\n", b"\r\n")
    out["BOM and CRLF"] = b"\xef\xbb\xbf" + out["CRLF"]
    out["bad UTF-8"] = body + b"\xff\xfe bad \xc3\x28\n"
    out["latin-1 file"] = body.replace(b"text", "t\u00e9xt".encode("latin-1"))
    out["binary garbage"] = bytes(range(256)) * 64
    return out


READERS: dict[str, tuple[str, list[str], Callable]] = {
    "corpus.jsonl": (".jsonl", CORPUS_JSONL, iter_corpus),
    "corpus.tsv": (".tsv", CORPUS_TSV, iter_corpus),
    "qa.jsonl": (".jsonl", QA_JSONL, iter_qa),
    "qa.csv (tabs)": (".csv", QA_CSV_TAB, iter_qa),
    "qa.csv (commas)": (".csv", QA_CSV_COMMA, iter_qa),
}
BENIGN = {"blank lines", "BOM", "CRLF", "BOM and CRLF"}
CASES = [(reader, name) for reader, (_, good, _) in READERS.items() for name in variants(good, reader)]


def read(reader: str, data: bytes, directory: Path, skip: bool) -> tuple[str, object]:
    """('rows', report) or ('error', DataError) after reading ``data`` as ``reader``'s format."""
    suffix, _, iterate = READERS[reader]
    path = directory / f"{'skip' if skip else 'strict'}{suffix}"
    path.write_bytes(data)
    report = ReadReport(str(path))
    try:
        for _ in iterate(path, skip_bad_rows=skip, report=report):
            pass
        return "rows", report
    except DataError as err:
        assert str(err).startswith(f"{path}:") or str(err).startswith(f"{path}: "), str(err)[:300]
        return "error", err


@pytest.mark.parametrize(("reader", "variant"), CASES, ids=[f"{r}: {v}" for r, v in CASES])
def test_a_malformed_file_is_a_file_line_error_or_a_counted_skip(tmp_path, reader, variant):
    """Any exception other than DataError fails the test (that is a traceback a user would see)."""
    data = variants(READERS[reader][1], reader)[variant]
    strict, strict_out = read(reader, data, tmp_path, skip=False)
    skipped, skipped_out = read(reader, data, tmp_path, skip=True)
    if variant in BENIGN:
        good_rows = len(READERS[reader][1]) - (1 if reader == "corpus.tsv" else 0)
        assert strict == skipped == "rows" and strict_out.rows == skipped_out.rows == good_rows
        return
    if strict == "rows":  # read as it is (a variant this format does not mind)
        assert skipped == "rows" and skipped_out.rows == strict_out.rows and strict_out.skipped == 0
    elif strict_out.line is not None and skipped == "rows":  # a bad row: counted and left out
        assert skipped_out.skipped >= 1 and skipped_out.examples and skipped_out.rows >= 1
    elif skipped == "error":  # a file with no valid row (or, in DPR .tsv, a wrong header): an error either way
        assert skipped_out.line is None or reader == "corpus.tsv", str(skipped_out)


QA_VARIANTS = variants(QA_JSONL, "qa.jsonl")


@pytest.mark.parametrize("variant", sorted(QA_VARIANTS))
def test_rag_prepare_on_a_malformed_train_file_never_shows_a_traceback(cli, tmp_path, tiny_world, variant):
    train = Path(tiny_world["train"])
    train.write_bytes(QA_VARIANTS[variant])
    data = train.parent
    run = cli("rag-prepare", "data=jsonl", f"data.dir={data}", f"data.corpus_file={tiny_world['corpus']}",
              f"data.train_file={train}", "data.val_file=null", "data.test_file=null", "data.generator_tokenizer=null")
    assert run.code in (0, 2) and "Traceback" not in run.output, run.output[-3000:]
    if run.code == 2:
        (line,) = [x for x in run.err.splitlines() if x.startswith("error: ")]
        assert str(train) in line


# ------------------------------------------------------------------------------------------ run directories
def run_file_variants(good: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "bad UTF-8": b"\xff\xfe" + good,
        "truncated": good[: len(good) // 2],
        "BOM": b"\xef\xbb\xbf" + good,
        "CRLF": good.replace(b"\n", b"\r\n"),
        "NUL bytes": good.replace(b"e", b"\x00", 3),
        "not an object": b"[1, 2, 3]\n",
        "a number": b"42\n",
        "deep nesting": b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "huge line": good + b"x" * HUGE + b"\n",
        "binary garbage": bytes(range(256)) * 64,
    }


RUN_FILES = ["metrics.json", "config_resolved.yaml", ".hydra/overrides.yaml", "predictions_test.jsonl",
             "csv/version_0/metrics.csv"]
RUN_CASES = [(f, v) for f in RUN_FILES for v in run_file_variants(b"{}\n")]


@pytest.mark.parametrize(("name", "variant"), RUN_CASES, ids=[f"{f}: {v}" for f, v in RUN_CASES])
def test_rag_report_on_a_damaged_run_file_never_shows_a_traceback(cli, tmp_path, drill_world, name, variant):
    """rag-report reads run directories (metrics, config, overrides, predictions, CSV logs): a damaged file
    is a message naming it (or, for a log, rows left out), never a traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(drill_world.run, run, ignore=shutil.ignore_patterns("checkpoints"))
    target = run / name
    target.write_bytes(run_file_variants(target.read_bytes())[variant])
    report = cli("rag-report", str(run), f"out={tmp_path / 'report'}")
    assert report.code in (0, 2) and "Traceback" not in report.output, report.output[-3000:]
    if report.code == 2:
        (line,) = [x for x in report.err.splitlines() if x.startswith("error: ")]
        assert str(run) in line
