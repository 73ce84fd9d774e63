"""KILT formats: task files (every KILT task: QA, fact checking, slot filling, entity linking, dialogue) and the
KILT knowledge source (one Wikipedia page per line), read with the same ``file:line`` errors as the other
readers (``readers.py`` dispatches here when a file has the KILT layout, so no flag is needed).

- Task file (``.jsonl``): ``{"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id", "title",
  "start_paragraph_id", "end_paragraph_id", ...}]}], "meta"}``. The answers are the outputs' non-empty
  ``answer`` strings; each output's provenance pages become one evidence set of ``QAExample.provenance`` (for
  R-precision and the KILT scores); provenance paragraphs become gold passage ids ``<wikipedia_id>-<paragraph>``.
- Knowledge source (``.jsonl`` or KILT's ``kilt_knowledgesource.json``, one object per line):
  ``{"wikipedia_id", "wikipedia_title", "text": [paragraph, ...]}``. Each paragraph is a passage with id
  ``<wikipedia_id>-<paragraph>`` (so a provenance paragraph names its passage); a paragraph longer than
  ``max_words`` words is cut into pieces ``<wikipedia_id>-<paragraph>``, ``<wikipedia_id>-<paragraph>.1``, ...
  Every passage remembers its page and paragraph (:class:`KiltPassage`), and ``metrics.page_of`` maps an id
  back to its page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_lightning.data import readers
from rag_lightning.data.readers import Passage, QAExample

KILT_TASK_FIX = (
    "each line must be a KILT object {\"id\", \"input\": string, \"output\": [{\"answer\": string, "
    "\"provenance\": [{\"wikipedia_id\", ...}]}]}; fix or remove the row, " + readers.SKIP_HINT
)
KILT_PAGES_FIX = (
    "each line must be a KILT page {\"wikipedia_id\", \"wikipedia_title\", \"text\": [paragraph, ...]}; fix or "
    "remove the row, " + readers.SKIP_HINT
)
MAX_WORDS = 100  # words per passage, DPR's size; longer paragraphs are cut


@dataclass(frozen=True)
class KiltPassage(Passage):
    """A passage of a KILT page: which page, and which paragraph of it."""

    wikipedia_id: str = ""
    paragraph_id: int = 0


def first_object(path: Path) -> dict[str, Any] | None:
    """The first line's JSON object, or None (empty file, bad UTF-8 or JSON: the reader reports those)."""
    try:
        with path.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
                    return obj if isinstance(obj, dict) else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return None


def is_kilt_task(obj: dict[str, Any] | None) -> bool:
    """KILT task rows have `input` (and `output`) where our QA rows have `question` and `answers`."""
    return obj is not None and "input" in obj and "question" not in obj


def is_kilt_pages(obj: dict[str, Any] | None) -> bool:
    return obj is not None and "wikipedia_id" in obj and "id" not in obj


def _page_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise readers._BadRow(f"{where} 'wikipedia_id' must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _paragraph(value: Any, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise readers._BadRow(f"{where} '{key}' must be a paragraph number >= 0, got {value!r}")
    return value


def _kilt_example(obj: dict[str, Any], default_id: str) -> QAExample:
    if "output" not in obj:
        raise readers._BadRow("missing field 'output' (a KILT task file for training or evaluation needs gold outputs)")
    outputs = obj["output"]
    if not isinstance(outputs, list) or not outputs:
        raise readers._BadRow("'output' must be a non-empty list of {\"answer\", \"provenance\"} objects")
    answers: list[str] = []
    evidence: list[tuple[str, ...]] = []
    gold: list[str] = []
    for m, output in enumerate(outputs, 1):
        if not isinstance(output, dict):
            raise readers._BadRow(f"output {m} must be an object, got {type(output).__name__}")
        answer = output.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise readers._BadRow(f"output {m}: 'answer' must be a string, got {type(answer).__name__}")
        if answer and answer.strip() and answer not in answers:
            answers.append(answer)
        provenance = output.get("provenance") or []
        if not isinstance(provenance, list):
            raise readers._BadRow(f"output {m}: 'provenance' must be a list, got {type(provenance).__name__}")
        pages: list[str] = []
        for n, prov in enumerate(provenance, 1):
            where = f"output {m} provenance {n}:"
            if not isinstance(prov, dict) or "wikipedia_id" not in prov:
                raise readers._BadRow(f"{where} no 'wikipedia_id' (every provenance names its page)")
            page = _page_id(prov["wikipedia_id"], where)
            pages.append(page)
            start = _paragraph(prov.get("start_paragraph_id"), "start_paragraph_id", where)
            end = _paragraph(prov.get("end_paragraph_id"), "end_paragraph_id", where)
            if start is not None:
                end = start if end is None else end
                if end < start:
                    raise readers._BadRow(f"{where} end_paragraph_id {end} is before start_paragraph_id {start}")
                gold.extend(f"{page}-{p}" for p in range(start, end + 1) if f"{page}-{p}" not in gold)
        if pages:
            evidence.append(tuple(dict.fromkeys(pages)))
    if not answers:
        raise readers._BadRow("no output has a non-empty 'answer'")
    return QAExample(
        id=readers._as_id(obj["id"]) if "id" in obj else default_id,
        question=readers._required_str(obj, "input"),
        answers=tuple(answers),
        gold_passage_ids=tuple(gold),
        provenance=tuple(evidence),
    )


def iter_kilt_task(path: Path, collector: Any) -> Iterator[QAExample]:
    """Rows of a KILT task file as QAExamples (``readers.iter_qa`` calls this for KILT-layout files)."""
    ids = readers._UniqueIds()
    for line, obj in readers._json_objects(path, collector):
        try:
            example = _kilt_example(obj, f"{path.stem}-{line}")
            ids.check(example.id, line)
        except readers._BadRow as err:
            collector.bad(line, str(err))
            continue
        yield example


def page_passages(obj: dict[str, Any], max_words: int = MAX_WORDS) -> list[KiltPassage]:
    """One KILT page as passages: a paragraph each, long ones cut into pieces of ``max_words`` words."""
    page = _page_id(obj.get("wikipedia_id"), "page:")
    title = obj.get("wikipedia_title", "")
    if not isinstance(title, str):
        raise readers._BadRow(f"'wikipedia_title' must be a string, got {type(title).__name__}")
    paragraphs = obj.get("text")
    if not isinstance(paragraphs, list) or not paragraphs:
        raise readers._BadRow("page has no paragraphs ('text' must be a non-empty list of strings)")
    if not all(isinstance(p, str) for p in paragraphs):
        raise readers._BadRow("'text' must be a list of strings, found a non-string paragraph")
    out = []
    for number, paragraph in enumerate(paragraphs):
        words = paragraph.split()
        for j, start in enumerate(range(0, len(words), max_words)):
            suffix = f".{j}" if j else ""
            text = " ".join(words[start : start + max_words])
            out.append(KiltPassage(f"{page}-{number}{suffix}", title.strip(), text, page, number))
    if not out:
        raise readers._BadRow("page has no paragraphs with text")
    return out


def iter_kilt_pages(path: Path, collector: Any, max_words: int = MAX_WORDS) -> Iterator[KiltPassage]:
    """Passages of a KILT knowledge source file (``readers.iter_corpus`` calls this for KILT-layout files)."""
    pages = readers._UniqueIds()
    for line, obj in readers._json_objects(path, collector):
        try:
            passages = page_passages(obj, max_words)
            pages.check(passages[0].wikipedia_id, line)
        except readers._BadRow as err:
            collector.bad(line, str(err))
            continue
        yield from passages


def write_kilt_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write KILT rows (task examples or pages), one JSON object per line, atomically."""
    from rag_lightning.files import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
