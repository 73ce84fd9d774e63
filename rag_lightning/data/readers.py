"""Readers for users' corpus and QA files.

Every bad row is reported as ``file:line: reason. fix`` so a researcher can repair a 21M-line file
without a debugger. With ``skip_bad_rows`` the bad rows are counted instead (see ``ReadReport``), and a
single warning at the end says how many were dropped. A file with no valid row is always an error:
an empty dataset would only fail later, far from its cause.

Formats (chosen by extension):

- corpus ``.jsonl``: one object per line with string fields ``id``, ``title``, ``text``.
- corpus ``.tsv``: the DPR passage file (``psgs_w100.tsv``), header ``id<TAB>text<TAB>title``.
- QA ``.jsonl``: ``question``, ``answers`` (list of strings), optional ``id`` (unique in the file; default
  ``<file stem>-<line>``), ``gold_passage_ids`` and ``relation`` (a string naming the kind of fact asked, e.g.
  ``capital``: answers of one relation are of one type, which same-relation answer swapping relies on); other
  fields are ignored.
- QA ``.json``: DPR's retriever training format (``biencoder-*.json``): one JSON array of objects with
  ``question``, ``answers``, ``positive_ctxs`` (their ``passage_id`` become the gold passage ids),
  ``negative_ctxs`` and ``hard_negative_ctxs`` (ids kept as the example's hard negatives); errors name the
  line where the object starts.
- KILT task files (``.jsonl`` rows with ``input`` and ``output``) and the KILT knowledge source (``.json`` or
  ``.jsonl`` rows with ``wikipedia_id`` and ``text`` as a list of paragraphs), recognised by their first row:
  ``kilt.py``.
- QA ``.csv`` / ``.tsv``: the DPR QA files: question, then the answers as a Python list literal
  (``['a', 'b']``), parsed with ``ast.literal_eval`` (never ``eval``). DPR's ``.csv`` files are
  tab-separated; a ``.csv`` whose first line has no tab is read as comma-separated.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from rag_lightning.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

SKIP_HINT = "or set data.skip_bad_rows=true to skip bad rows"
CORPUS_JSONL_FIX = (
    f"each line must be a JSON object with string fields id, title, text; fix or remove the row, {SKIP_HINT}"
)
CORPUS_TSV_FIX = f"each row must be id<TAB>text<TAB>title (DPR format); fix or remove the row, {SKIP_HINT}"
QA_JSONL_FIX = (
    "each line must be a JSON object with 'question' (string), 'answers' (list of strings), optional 'id' "
    f"and 'gold_passage_ids' (list of strings); fix or remove the row, {SKIP_HINT}"
)
QA_CSV_FIX = (
    "each row must be question<TAB>answers, answers a Python list literal such as ['Paris'] (DPR format); "
    f"fix or remove the row, {SKIP_HINT}"
)
QA_DPR_JSON_FIX = (
    "the file must be one JSON array of objects with 'question' (string), 'answers' (list of strings), "
    "'positive_ctxs' (list of objects with 'passage_id'), optional 'negative_ctxs' and 'hard_negative_ctxs' "
    f"(DPR's biencoder format); fix or remove the object, {SKIP_HINT}"
)
TSV_HEADER = ("id", "text", "title")
_QA_HEADER_NAMES = {"answer", "answers"}


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of the corpus."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class QAExample:
    """One question with every accepted answer and, when known, the passages that support it."""

    id: str
    question: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...] = ()
    hard_negative_ids: tuple[str, ...] = ()  # DPR's hard_negative_ctxs (retriever training)
    # KILT files: the provenance pages (wikipedia ids) of each gold output, for R-precision and the KILT scores
    provenance: tuple[tuple[str, ...], ...] = ()
    relation: str = ""  # the kind of fact asked ("capital"), where the QA set says; answers of one relation share a type


class DataError(UserError, ValueError):
    """A data file cannot be used as it is; the message names the file, the line, the reason and the fix."""

    def __init__(self, path: str | Path, line: int | None, reason: str, fix: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.fix = fix
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}. Fix: {fix}")


@dataclass
class ReadReport:
    """What a read kept and what it skipped, so callers can log or assert on data quality."""

    path: str
    rows: int = 0
    skipped: int = 0
    # the first few skip messages, enough to see what kind of damage a file has
    examples: list[str] = field(default_factory=list)


class Rows(list[T], Generic[T]):
    """A plain list of parsed rows that also carries the ``ReadReport`` of the read that made it."""

    report: ReadReport


class _BadRow(Exception):
    """Raised by a row parser; the caller adds the file and line."""


class _Collector:
    """Turns bad rows into a DataError, or counts them when skipping is allowed."""

    max_examples = 5

    def __init__(self, path: Path, fix: str, skip_bad_rows: bool, report: ReadReport | None = None) -> None:
        self.path = path
        self.fix = fix
        self.skip_bad_rows = skip_bad_rows
        self.report = report if report is not None else ReadReport(path=str(path))
        self.report.path = str(path)

    def bad(self, line: int, reason: str) -> None:
        if not self.skip_bad_rows:
            raise DataError(self.path, line, reason, self.fix)
        self.report.skipped += 1
        if len(self.report.examples) < self.max_examples:
            self.report.examples.append(f"{self.path}:{line}: {reason}")

    def track(self, rows: Iterator[T]) -> Iterator[T]:
        """Count rows as they pass, then check the file was not empty and warn about skipped rows."""
        for row in rows:
            self.report.rows += 1
            yield row
        report = self.report
        if not report.rows:
            if report.skipped:
                reason = f"no valid rows ({report.skipped} bad rows skipped; first: {report.examples[0]})"
            else:
                reason = "file is empty (no rows)"
            raise DataError(self.path, None, reason, self.fix.split(";")[0])
        if report.skipped:
            log.warning(
                "%s: skipped %d bad rows, kept %d (first: %s)",
                self.path,
                report.skipped,
                report.rows,
                "; ".join(report.examples[:2]),
            )


def _rows(rows: Iterator[T], report: ReadReport) -> Rows[T]:
    out: Rows[T] = Rows(rows)
    out.report = report
    return out


def _open_checked(path: str | Path, kinds: dict[str, str], what: str) -> tuple[Path, str]:
    """Resolve the file and its format, with a clear error for a missing file or an unknown extension."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in kinds:
        accepted = ", ".join(f"{ext} ({desc})" for ext, desc in kinds.items())
        raise DataError(p, None, f"unsupported {what} format '{suffix or p.name}'", f"use one of: {accepted}")
    if not p.is_file():
        raise DataError(
            p, None, f"{what} file not found", "check the path (relative paths start where rag-* runs)"
        )
    return p, suffix


class _Lines:
    """Physical lines decoded one at a time, so invalid UTF-8 is pinned to its line instead of killing the read."""

    def __init__(self, path: Path, collector: _Collector) -> None:
        self.path = path
        self.collector = collector
        self.lineno = 0

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as fh:
            for raw in fh:
                self.lineno += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.collector.bad(self.lineno, f"invalid UTF-8 (byte {err.start + 1} of the line)")
                    continue
                if self.lineno == 1:
                    text = text.removeprefix("\ufeff")
                yield text


def _json_objects(path: Path, collector: _Collector) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = _Lines(path, collector)
    for text in lines:
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            collector.bad(lines.lineno, f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        except (ValueError, RecursionError) as err:
            collector.bad(lines.lineno, f"malformed JSON ({type(err).__name__})")
            continue
        if not isinstance(obj, dict):
            collector.bad(lines.lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield lines.lineno, obj


def _csv_rows(path: Path, collector: _Collector, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    lines = _Lines(path, collector)
    reader = csv.reader(iter(lines), delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            collector.bad(lines.lineno, f"malformed row ({err})")
            continue
        if any(cell.strip() for cell in row):
            yield lines.lineno, row


def _sniff_delimiter(path: Path) -> str:
    """DPR ships tab-separated files named .csv; fall back to commas only when the first line has no tab."""
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                return "\t" if b"\t" in raw else ","
    return "\t"


def _required_str(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise _BadRow(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRow(f"field '{key}' is empty")
    return value


def _as_id(value: Any, key: str = "id") -> str:
    """Ids may be written as strings or integers (DPR uses integers); both become strings."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _BadRow(f"field '{key}' must be a string or an integer, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise _BadRow(f"field '{key}' is empty")
    return text


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _BadRow(f"'{key}' must be a list of strings, got a single string (wrap it in a list)")
    if not isinstance(value, (list, tuple)):
        raise _BadRow(f"'{key}' must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(item, str) for item in value):
        raise _BadRow(f"'{key}' must be a list of strings, found a non-string item")
    return tuple(value)


def _answers(value: Any) -> tuple[str, ...]:
    answers = _string_list(value, "answers")
    if not answers or not all(a.strip() for a in answers):
        raise _BadRow("'answers' must be a non-empty list of non-empty strings")
    return answers


def _literal_answers(cell: str) -> tuple[str, ...]:
    """Parse DPR's answer column as a literal only: an expression such as a call is rejected, never run."""
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        shown = cell if len(cell) <= 60 else cell[:57] + "..."
        raise _BadRow(f"answers {shown!r} are not a Python list literal") from None
    return _answers(value)


class _UniqueIds:
    def __init__(self) -> None:
        self.first_line: dict[str, int] = {}

    def check(self, row_id: str, line: int) -> None:
        first = self.first_line.setdefault(row_id, line)
        if first != line:
            raise _BadRow(f"duplicate id '{row_id}' (first used on line {first})")


def _passages_jsonl(path: Path, collector: _Collector) -> Iterator[Passage]:
    ids = _UniqueIds()
    for line, obj in _json_objects(path, collector):
        try:
            if "id" not in obj:
                raise _BadRow("missing field 'id'")
            passage = Passage(
                id=_as_id(obj["id"]),
                title=_required_str(obj, "title", allow_empty=True),
                text=_required_str(obj, "text"),
            )
            ids.check(passage.id, line)
        except _BadRow as err:
            collector.bad(line, str(err))
            continue
        yield passage


def _passages_tsv(path: Path, collector: _Collector) -> Iterator[Passage]:
    ids = _UniqueIds()
    rows = _csv_rows(path, collector, "\t")
    for line, row in rows:
        if tuple(cell.strip().lower() for cell in row) != TSV_HEADER:
            # A wrong header is never a bad row to skip: every row after it would be misread.
            raise DataError(
                path,
                line,
                f"header is {row!r}, expected id<TAB>text<TAB>title",
                "add the DPR header line 'id\\ttext\\ttitle' (or convert the file to .jsonl with id, title, text)",
            )
        break
    for line, row in rows:
        try:
            if len(row) != 3:
                raise _BadRow(f"expected 3 tab-separated columns (id, text, title), found {len(row)}")
            row_id, text, title = row
            if not text.strip():
                raise _BadRow("field 'text' is empty")
            passage = Passage(id=_as_id(row_id), title=title, text=text)
            ids.check(passage.id, line)
        except _BadRow as err:
            collector.bad(line, str(err))
            continue
        yield passage


def _qa_jsonl(path: Path, collector: _Collector) -> Iterator[QAExample]:
    ids = _UniqueIds()
    for line, obj in _json_objects(path, collector):
        try:
            if "answers" not in obj:
                raise _BadRow("missing field 'answers'")
            example = QAExample(
                id=_as_id(obj["id"]) if "id" in obj else f"{path.stem}-{line}",
                question=_required_str(obj, "question"),
                answers=_answers(obj["answers"]),
                gold_passage_ids=_gold_ids(obj.get("gold_passage_ids")),
                relation=_relation(obj.get("relation")),
            )
            ids.check(example.id, line)
        except _BadRow as err:
            collector.bad(line, str(err))
            continue
        yield example


def _relation(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"'relation' must be a string naming the kind of fact asked, got {type(value).__name__}")
    return value


def _gold_ids(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _BadRow(f"'gold_passage_ids' must be a list of ids, got {type(value).__name__}")
    return tuple(_as_id(item, "gold_passage_ids") for item in value)


def _dpr_json_objects(path: Path, collector: _Collector) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line it starts on (json.load knows no lines)."""
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"invalid UTF-8 (byte {err.start + 1})", QA_DPR_JSON_FIX) from None
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(path, text.count("\n", 0, pos) + 1, "expected a JSON array '[' of examples", QA_DPR_JSON_FIX)
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line = text.count("\n", 0, pos) + 1
        if pos >= len(text):
            raise DataError(path, line, "the JSON array is not closed with ']'", QA_DPR_JSON_FIX)
        if text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            # the rest of the array cannot be found reliably after a syntax error: never skippable
            raise DataError(path, err.lineno, f"malformed JSON ({err.msg} at column {err.colno})", QA_DPR_JSON_FIX) from None
        yield line, obj


def _ctx_ids(obj: dict[str, Any], key: str, required: bool) -> tuple[str, ...]:
    if key not in obj:
        if required:
            raise _BadRow(f"missing field '{key}' (DPR's biencoder format names the gold passages there)")
        return ()
    ctxs = obj[key]
    if not isinstance(ctxs, list):
        raise _BadRow(f"'{key}' must be a list of passage objects, got {type(ctxs).__name__}")
    ids = []
    for i, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict):
            raise _BadRow(f"'{key}[{i}]' must be an object with 'passage_id', got {type(ctx).__name__}")
        found = next((k for k in ("passage_id", "psg_id", "id") if k in ctx), None)
        if found is None:
            raise _BadRow(f"'{key}[{i}]' has no 'passage_id': the passage must be named by its corpus id")
        ids.append(_as_id(ctx[found], f"{key}[{i}].{found}"))
    return tuple(ids)


def _qa_dpr_json(path: Path, collector: _Collector) -> Iterator[QAExample]:
    for index, (line, obj) in enumerate(_dpr_json_objects(path, collector)):
        try:
            if not isinstance(obj, dict):
                raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
            if "answers" not in obj:
                raise _BadRow("missing field 'answers'")
            example = QAExample(
                id=_as_id(obj["id"]) if "id" in obj else f"{path.stem}-{index}",
                question=_required_str(obj, "question"),
                answers=_answers(obj["answers"]),
                gold_passage_ids=_ctx_ids(obj, "positive_ctxs", required=True),
                hard_negative_ids=_ctx_ids(obj, "hard_negative_ctxs", required=False),
            )
            _ctx_ids(obj, "negative_ctxs", required=False)  # checked; DPR's random negatives are not used
        except _BadRow as err:
            collector.bad(line, str(err))
            continue
        yield example


def _qa_csv(path: Path, collector: _Collector, delimiter: str) -> Iterator[QAExample]:
    for index, (line, row) in enumerate(_csv_rows(path, collector, delimiter)):
        if index == 0 and len(row) >= 2 and row[1].strip().lower() in _QA_HEADER_NAMES:
            continue  # an optional header line (question, answers)
        try:
            if len(row) < 2:
                raise _BadRow(f"expected at least 2 columns (question, answers), found {len(row)}")
            if not row[0].strip():
                raise _BadRow("question is empty")
            # ids come from line numbers, so they are unique by construction
            example = QAExample(id=f"{path.stem}-{line}", question=row[0], answers=_literal_answers(row[1]))
        except _BadRow as err:
            collector.bad(line, str(err))
            continue
        yield example


def iter_corpus(
    path: str | Path, *, skip_bad_rows: bool = False, report: ReadReport | None = None
) -> Iterator[Passage]:
    """Stream a corpus (.jsonl or DPR .tsv) without holding it in memory; ``report`` is filled as rows pass.

    Missing files and unknown formats fail at the call; bad rows, and an empty file, fail while iterating.
    """
    kinds = {".jsonl": "id, title, text", ".tsv": "DPR: id, text, title", ".json": "KILT knowledge source"}
    p, suffix = _open_checked(path, kinds, "corpus")
    from rag_lightning.data import kilt  # the KILT layout is recognised by its first row, no flag needed

    if suffix == ".json" or (suffix == ".jsonl" and kilt.is_kilt_pages(kilt.first_object(p))):
        collector = _Collector(p, kilt.KILT_PAGES_FIX, skip_bad_rows, report)
        return collector.track(kilt.iter_kilt_pages(p, collector))
    if suffix == ".jsonl":
        collector = _Collector(p, CORPUS_JSONL_FIX, skip_bad_rows, report)
        return collector.track(_passages_jsonl(p, collector))
    collector = _Collector(p, CORPUS_TSV_FIX, skip_bad_rows, report)
    return collector.track(_passages_tsv(p, collector))


def iter_qa(
    path: str | Path, *, skip_bad_rows: bool = False, report: ReadReport | None = None
) -> Iterator[QAExample]:
    """Stream a QA file (.jsonl, or DPR .csv/.tsv); ``report`` is filled as rows pass."""
    kinds = {".jsonl": "question, answers, id, gold_passage_ids", ".csv": "DPR QA", ".tsv": "DPR QA",
             ".json": "DPR biencoder training file"}
    p, suffix = _open_checked(path, kinds, "QA")
    from rag_lightning.data import kilt  # the KILT layout is recognised by its first row, no flag needed

    if suffix == ".jsonl" and kilt.is_kilt_task(kilt.first_object(p)):
        collector = _Collector(p, kilt.KILT_TASK_FIX, skip_bad_rows, report)
        return collector.track(kilt.iter_kilt_task(p, collector))
    if suffix == ".jsonl":
        collector = _Collector(p, QA_JSONL_FIX, skip_bad_rows, report)
        return collector.track(_qa_jsonl(p, collector))
    if suffix == ".json":
        collector = _Collector(p, QA_DPR_JSON_FIX, skip_bad_rows, report)
        return collector.track(_qa_dpr_json(p, collector))
    delimiter = "\t" if suffix == ".tsv" else _sniff_delimiter(p)
    collector = _Collector(p, QA_CSV_FIX, skip_bad_rows, report)
    return collector.track(_qa_csv(p, collector, delimiter))


def read_corpus(path: str | Path, *, skip_bad_rows: bool = False) -> Rows[Passage]:
    """Read a whole corpus (.jsonl or DPR .tsv); the result's ``.report`` says what was kept and skipped."""
    report = ReadReport(path=str(path))
    return _rows(iter_corpus(path, skip_bad_rows=skip_bad_rows, report=report), report)


def read_qa(path: str | Path, *, skip_bad_rows: bool = False) -> Rows[QAExample]:
    """Read a whole QA file (.jsonl, DPR .csv/.tsv, or DPR biencoder .json); the result's ``.report`` says what was kept and skipped."""
    report = ReadReport(path=str(path))
    return _rows(iter_qa(path, skip_bad_rows=skip_bad_rows, report=report), report)
