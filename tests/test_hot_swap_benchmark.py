"""benchmarks/hot_swap.py, run as a user runs it, on hand-made rag-eval directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hot_swap.py"

CHANGED = [
    {"id": "q1", "relation": "capital", "answers": ["Košice"], "old_answers": ["Bratislava"],
     "gold_passage_ids": ["svk-0"]},
    {"id": "q2", "relation": "tld", "answers": [".ee"], "old_answers": [".sk"], "gold_passage_ids": ["svk-1"]},
]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _eval_dir(root: Path, name: str, predictions: dict[str, str], split: str = "test_changed") -> Path:
    """A rag-eval directory whose q1 read the passage stating the new capital, q2 another passage."""
    passages = {"q1": [{"id": "svk-0", "text": "The capital of Slovakia is Košice."}],
                "q2": [{"id": "est-1", "text": "Its internet country code top-level domain is .gs."}]}  # fmt: skip
    run = root / name
    _write_jsonl(run / "predictions.jsonl",
                 [{"id": q, "prediction": p, "passages": passages[q]} for q, p in predictions.items()])  # fmt: skip
    (run / "metrics.json").write_text(json.dumps({f"{split}/em": 0.5}), encoding="utf-8")
    return run


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_new_and_old_answers_are_counted_per_relation_and_pooled_over_runs(tmp_path):
    data = tmp_path / "world_counterfactual"
    _write_jsonl(data / "test_changed.jsonl", CHANGED)
    a = _eval_dir(tmp_path, "a", {"q1": "Košice", "q2": ".sk"})  # new capital, old domain
    b = _eval_dir(tmp_path, "b", {"q1": "Bratislava", "q2": ".ee"})  # old capital, new domain
    out = tmp_path / "out" / "hot_swap.json"
    proc = _run(f"seed1={a}", f"seed2={b}", "--data", str(data), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    all_a, all_b = result["seed1"]["by_relation"]["all"], result["seed2"]["by_relation"]["all"]
    assert (all_a["new"], all_a["old"], all_a["read_new_fact"]) == (1, 1, 1)
    assert (all_b["new"], all_b["old"]) == (1, 1)
    assert result["seed1"]["by_relation"]["capital"]["new_share"] == 1.0
    assert result["seed2"]["by_relation"]["capital"]["old_share"] == 1.0
    assert "pooled" in proc.stdout and "new answer 2 (0.500), old answer 2 (0.500)" in proc.stdout


def test_runs_of_different_splits_are_not_pooled(tmp_path):
    """The swapped and the original index answer different questions' facts: one share over both would mean nothing."""
    data = tmp_path / "world_counterfactual"
    _write_jsonl(data / "test_changed.jsonl", CHANGED)
    swapped = _eval_dir(tmp_path, "cf", {"q1": "Košice", "q2": ".ee"})
    original = _eval_dir(tmp_path, "orig", {"q1": "Bratislava", "q2": ".sk"}, split="test_changed_original")
    proc = _run(f"cf={swapped}", f"orig={original}", "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    assert "pooled" not in proc.stdout.replace("not pooled", "")
    assert (
        "not pooled: the runs evaluated different splits (test_changed, test_changed_original)" in proc.stdout
    )


def test_missing_or_malformed_inputs_stop_with_the_path_and_the_fix(tmp_path):
    data = tmp_path / "world_counterfactual"
    proc = _run(f"a={tmp_path}", "--data", str(data))
    assert (
        proc.returncode == 1
        and "test_changed.jsonl not found" in proc.stderr
        and "rag-prepare" in proc.stderr
    )
    _write_jsonl(data / "test_changed.jsonl", CHANGED)
    proc = _run(f"a={tmp_path / 'missing'}", "--data", str(data))
    assert proc.returncode == 1 and "predictions.jsonl not found" in proc.stderr and "rag-eval" in proc.stderr
    proc = _run(str(tmp_path), "--data", str(data))
    assert proc.returncode == 2 and "NAME=EVAL_DIR" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "predictions.jsonl").write_text('{"id": "q1"}\n{oops\n', encoding="utf-8")
    proc = _run(f"a={bad}", "--data", str(data))
    assert proc.returncode == 1 and "predictions.jsonl:2: not JSON" in proc.stderr
    no_metrics = _eval_dir(tmp_path, "no_metrics", {"q1": "Košice", "q2": ".ee"})
    (no_metrics / "metrics.json").unlink()
    proc = _run(f"a={no_metrics}", "--data", str(data))
    assert proc.returncode == 1 and "metrics.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr
