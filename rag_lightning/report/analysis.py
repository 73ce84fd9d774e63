"""What a run's predictions say: metrics by category field of the QA file and by whether a gold passage was
read (reading errors vs retrieval errors), and a sample of wrong answers with their passages."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rag_lightning.report.runs import RESOLVED_CONFIG, ReportError, Run

# QA fields that are not categories (ids, texts, lists)
QA_FIELDS = {"id", "question", "answers", "gold_passage_ids"}
MAX_CATEGORIES = 40


@dataclass
class Group:
    """Questions sharing a value: how many, their EM / F1, and the share whose gold passage was read."""

    name: str
    n: int
    em: float
    f1: float
    retrieved: float | None = None


@dataclass
class Breakdown:
    split: str
    file: Path
    n: int
    em: float
    f1: float
    logged: dict[str, float]  # the split's metrics of metrics.json
    qa_file: str | None
    notes: list[str] = field(default_factory=list)
    by_field: dict[str, list[Group]] = field(default_factory=dict)
    by_retrieval: list[Group] = field(default_factory=list)
    wrong: int = 0
    reading_errors: int = 0  # wrong although a gold passage was read
    retrieval_errors: int = 0  # wrong, and no gold passage among those read
    records: list[dict] = field(default_factory=list)  # each with "categories", "gold_read", "hits"


def qa_file_of(config: dict[str, Any], split: str) -> str | None:
    """The QA file a split's questions came from, by the run's config (`data.*_file`). A rag-eval run that
    named no file evaluated a split of the trained run: that run's config names it. A world split the config
    predates (`test_paraphrase` of a run trained before it existed) is the world build's file of that name."""
    data = config.get("data") or {}
    if split == "val":
        return data.get("val_file")
    if split in ("test", "predictions", str(config.get("split_name"))):
        if data.get("test_file") or not config.get("ckpt_path"):
            return data.get("test_file")
        name = str(config.get("split_name") or "test") if split == "predictions" else split
        return _trained_run_file(str(config["ckpt_path"]), name)
    named = (data.get("extra_test_files") or {}).get(split)
    if named or data.get("build") != "world" or not data.get("dir"):
        return named
    built = Path(str(data["dir"])) / f"{split}.jsonl"
    return str(built) if built.is_file() else None


def _trained_run_file(ckpt_path: str, split: str) -> str | None:
    """The file of ``split`` by the config of the run that wrote ``ckpt_path`` (None when it cannot be read)."""
    saved = Path(ckpt_path).resolve().parent.parent / RESOLVED_CONFIG
    try:
        config = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return qa_file_of({**config, "split_name": None, "ckpt_path": None}, split)


def read_qa_rows(path: Path) -> dict[str, dict]:
    """QA rows by id, as the readers number them (`id`, else `<file stem>-<line>`); JSONL only."""
    rows = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows[str(row["id"]) if "id" in row else f"{path.stem}-{line}"] = row
    return rows


def category_fields(rows: list[dict], wanted: list[str] | None = None) -> list[str]:
    """Fields that sort the questions of a QA file into a few groups (the world set's `relation`, 29 values over
    300 questions; not its `subject`, 89): a scalar in every row, with 2 to 40 values and no more than a quarter
    of the rows (at least 3). ``wanted`` names them instead."""
    if wanted:
        return [f for f in wanted if any(f in r for r in rows)]
    found = []
    for key in dict.fromkeys(k for r in rows for k in r):
        if key in QA_FIELDS:
            continue
        values = [r.get(key) for r in rows]
        if not all(isinstance(v, str | int | bool) for v in values):
            continue
        distinct = len(set(values))
        if 2 <= distinct <= min(MAX_CATEGORIES, max(3, len(rows) // 4)):
            found.append(key)
    return found


def _group(name: str, records: list[dict]) -> Group:
    n = len(records)
    read = [r["gold_read"] for r in records if r["gold_read"] is not None]
    return Group(
        name=name,
        n=n,
        em=sum(r["em"] for r in records) / n,
        f1=sum(r["f1"] for r in records) / n,
        retrieved=sum(read) / len(read) if read else None,
    )


def _resolve(file: str, run: Run) -> Path | None:
    for candidate in (Path(file), run.dir / file):
        if candidate.is_file():
            return candidate
    return None


def breakdown(run: Run, split: str, wanted_fields: list[str] | None = None) -> Breakdown:
    """Metrics of one split's predictions by category field and by gold passage read."""
    from rag_lightning.metrics import retrieval_hits

    path = run.predictions[split]
    records = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                try:  # ValueError covers invalid UTF-8 and malformed JSON
                    record = json.loads(raw.decode("utf-8"))
                except (ValueError, RecursionError):
                    raise ReportError(f"{path}:{line}: not a JSON prediction record") from None
                if not isinstance(record, dict):
                    raise ReportError(f"{path}:{line}: not a JSON prediction record (a {type(record).__name__})")
                records.append(record)
    if not records:
        raise ReportError(f"{path}: no prediction records")
    missing = [k for k in ("id", "prediction", "answers", "em", "f1") if k not in records[0]]
    if missing:
        raise ReportError(f"{path}: records lack {', '.join(missing)}; expected rag-train's or rag-eval's predictions")
    notes = []
    qa_file = qa_file_of(run.config, split)
    rows: dict[str, dict] = {}
    if qa_file:
        resolved = _resolve(qa_file, run)
        if resolved is None:
            notes.append(f"QA file {qa_file} not found: no categories; a passage counts as gold when it holds an answer")
        elif resolved.suffix == ".jsonl":
            rows = read_qa_rows(resolved)
        else:
            notes.append(f"QA file {qa_file} is not JSONL: no categories or gold passage ids")
    else:
        notes.append(f"the run's config names no QA file for split {split!r}: no categories")
    joined = [rows.get(str(r["id"]), {}) for r in records]
    if rows and not any(joined):
        notes.append(f"no prediction id matches a question of {qa_file}")
    fields = category_fields(list(rows.values()), wanted_fields)  # judged on the whole file
    if wanted_fields:
        notes += [f"no field {f!r} in {qa_file}" for f in wanted_fields if f not in fields]
    for record, row in zip(records, joined):
        record["categories"] = {f: str(row.get(f, "-")) for f in fields}
        passages = record.get("passages")
        if passages:
            gold = [str(g) for g in row.get("gold_passage_ids") or []]
            hits = retrieval_hits([[str(p["id"]) for p in passages]], [[p["text"] for p in passages]], [gold],
                                  [record["answers"]])
            record["hits"] = [bool(h) for h in hits[0].tolist()]
            record["gold_read"] = any(record["hits"])
        else:
            record["hits"], record["gold_read"] = [], None
    n = len(records)
    logged = {k.split("/", 1)[1]: v for k, v in run.metrics.items() if k.startswith(f"{split}/")}
    out = Breakdown(
        split=split,
        file=path,
        n=n,
        em=sum(r["em"] for r in records) / n,
        f1=sum(r["f1"] for r in records) / n,
        logged=logged,
        qa_file=qa_file,
        notes=notes,
        records=records,
    )
    for f in fields:
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(r["categories"][f], []).append(r)
        out.by_field[f] = sorted((_group(k, v) for k, v in groups.items()), key=lambda g: (-g.n, g.name))
    if any(r["gold_read"] is not None for r in records):
        read = [r for r in records if r["gold_read"]]
        unread = [r for r in records if r["gold_read"] is False]
        out.by_retrieval = [_group(name, rs) for name, rs in
                            (("gold passage read", read), ("no gold passage read", unread)) if rs]
        wrong = [r for r in records if r["em"] < 1]
        out.wrong = len(wrong)
        out.reading_errors = sum(1 for r in wrong if r["gold_read"])
        out.retrieval_errors = sum(1 for r in wrong if r["gold_read"] is False)
    else:
        out.wrong = sum(1 for r in records if r["em"] < 1)
        out.notes.append("no passages in the predictions (closed book): no retrieval breakdown")
    return out


def wrong_answers(b: Breakdown, k: int, seed: int = 0) -> list[dict]:
    """Up to ``k`` wrong answers of the split, a fixed random sample in file order."""
    wrong = [r for r in b.records if r["em"] < 1]
    if len(wrong) <= k:
        return wrong
    chosen = set(random.Random(seed).sample(range(len(wrong)), k))
    return [r for i, r in enumerate(wrong) if i in chosen]
