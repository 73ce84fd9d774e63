"""Index hot-swap: how often a trained run answers with the counterfactual world's new facts (docs/hot_swap.md).

    python benchmarks/hot_swap.py NAME=EVAL_DIR [NAME=EVAL_DIR ...] [--data outputs/cache/data/world_counterfactual]
        [--out benchmarks/results/hot_swap.json]

Each EVAL_DIR is a `rag-eval` run directory over the questions whose answer the counterfactual world changed
(`test_changed.jsonl` on the swapped index, or `test_changed_original.jsonl` on the original one: the same
questions in the same order). For each it counts, by relation and overall, the predictions that match the NEW
answer (the counterfactual fact) and those that match the OLD one (the real world's), with the QA set's own
exact-match normalisation, and how often a passage stating the new fact was read. Several runs of one split
(seeds of a recipe) also get their pooled share; runs of different splits are not pooled.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rag_lightning.files import write_text_atomic
from rag_lightning.metrics import exact_match, has_answer


def require(path: Path, fix: str) -> Path:
    """``path``, or a stop naming it and the fix when it is not there."""
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: {fix}")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a bad line stops with its file:line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{number}: not JSON ({e.msg})") from None
    return rows


def shares(eval_dir: Path, changed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """New-answer and old-answer shares of one rag-eval run over the changed questions."""
    fix = "give the directory of a finished rag-eval run"
    rows = read_jsonl(require(eval_dir / "predictions.jsonl", fix))
    missing = [r["id"] for r in rows if r["id"] not in changed]
    if missing or len(rows) != len(changed):
        raise SystemExit(f"error: {eval_dir}: its questions are not the changed ones ({len(rows)} rows, e.g. {missing[:3]})")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        q = changed[r["id"]]
        for key in (q["relation"], "all"):
            c = counts[key]
            c["questions"] += 1
            c["new"] += int(exact_match(r["prediction"], q["answers"]))
            c["old"] += int(exact_match(r["prediction"], q["old_answers"]))
            c["read_new_fact"] += int(any(has_answer(p["text"], q["answers"]) and p["id"] in q["gold_passage_ids"]
                                          for p in r.get("passages", [])))
    metrics = json.loads(require(eval_dir / "metrics.json", fix).read_text(encoding="utf-8"))
    return {
        "eval_dir": str(eval_dir),
        "metrics": metrics,
        "by_relation": {
            k: {**v, "new_share": round(v["new"] / v["questions"], 3), "old_share": round(v["old"] / v["questions"], 3)}
            for k, v in sorted(counts.items())
        },
    }


def split_name(metrics: dict[str, Any]) -> str:
    """The split a rag-eval run measured: the prefix of its metric names (``test_changed/em`` -> ``test_changed``)."""
    return next((key.split("/", 1)[0] for key in metrics if "/" in key), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=EVAL_DIR")
    parser.add_argument("--data", default="outputs/cache/data/world_counterfactual", type=Path)
    parser.add_argument("--out", default=None, type=Path)
    args = parser.parse_args()
    runs = [r.partition("=") for r in args.runs]
    for (name, eq, directory), given in zip(runs, args.runs, strict=True):
        if not (name and eq and directory):
            parser.error(f"{given!r}: give each run as NAME=EVAL_DIR, e.g. seed1=outputs/runs/eval/<date>_<time>")
    questions = require(args.data / "test_changed.jsonl",
                        "run `rag-prepare data=world_counterfactual` or point --data at its directory")
    changed = {q["id"]: q for q in read_jsonl(questions)}
    result = {name: shares(Path(directory), changed) for name, _, directory in runs}
    for name, r in result.items():
        a = r["by_relation"]["all"]
        print(f"{name:28s} {a['questions']} questions: new answer {a['new_share']:.3f}, old answer {a['old_share']:.3f}, "
              f"read a passage stating the new fact {a['read_new_fact'] / a['questions']:.3f}")
    splits = sorted({split_name(r["metrics"]) for r in result.values()})
    if len(result) > 1 and len(splits) > 1:
        print(f"not pooled: the runs evaluated different splits ({', '.join(splits)})")
    elif len(result) > 1:  # several seeds of one recipe on one index: their pooled share
        n, new, old = (sum(r["by_relation"]["all"][k] for r in result.values()) for k in ("questions", "new", "old"))
        print(f"{'pooled':28s} {n} answers: new answer {new} ({new / n:.3f}), old answer {old} ({old / n:.3f})")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
