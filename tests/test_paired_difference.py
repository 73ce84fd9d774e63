"""benchmarks/paired_difference.py, run as a user runs it, on hand-worked prediction files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_difference.py"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_paired_means_difference_and_standard_error_by_hand(tmp_path):
    a = _write(tmp_path / "a.jsonl", [
        {"id": "q1", "em": 1.0, "factuality": 1.0, "meta": {"turns": 1}},
        {"id": "q2", "em": 1.0, "factuality": None, "meta": {"turns": 2}},
        {"id": "q3", "em": 0.0, "factuality": 0.5, "meta": {"turns": 2}},
        {"id": "only-a", "em": 1.0, "factuality": 1.0, "meta": {"turns": 1}},
    ])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [
        {"id": "q3", "em": 0.0, "factuality": 0.0},
        {"id": "q1", "em": 0.0, "factuality": 0.0},
        {"id": "q2", "em": 0.0, "factuality": 1.0},
    ])  # fmt: skip
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), "--group-by", "turns", "--json", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["questions"] == 3
    em = result["metrics"]["em"]  # differences 1, 1, 0: mean 2/3, sd sqrt(1/3), se sqrt(1/3)/sqrt(3) = 1/3
    assert em["n"] == 3 and abs(em["diff"] - 2 / 3) < 1e-9 and abs(em["se"] - 1 / 3) < 1e-9
    fact = result["metrics"]["factuality"]  # q2 is null in A: pairs q1 (1 - 0) and q3 (0.5 - 0)
    assert fact["n"] == 2 and abs(fact["diff"] - 0.75) < 1e-9
    assert abs(result["groups"]["2"]["em"]["a"] - 0.5) < 1e-9 and result["groups"]["1"]["em"] is None
    assert "em" in proc.stdout and "3 questions in both" in proc.stdout


def test_files_with_no_common_question_are_refused(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"id": "x", "em": 1.0}])
    b = _write(tmp_path / "b.jsonl", [{"id": "y", "em": 1.0}])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no question ids in common" in proc.stderr


def test_a_metric_null_in_some_records_is_still_compared(tmp_path):
    """Metrics are found over all records: the first one's null factuality must not hide the metric."""
    a = _write(tmp_path / "a.jsonl", [
        {"id": "a1", "em": 1.0, "factuality": None},
        {"id": "a2", "em": 1.0, "factuality": 1.0},
        {"id": "a3", "em": 0.0, "factuality": 0.5},
    ])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [{"id": f"a{i}", "em": 0.0, "factuality": 0.0} for i in (1, 2, 3)])
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), "--json", str(out)], check=True, capture_output=True)
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"em", "factuality"} and metrics["factuality"]["n"] == 2


def test_a_weighted_difference_paired_by_id_stem(tmp_path):
    """paraphrase EM against 0.8 x test EM over the same facts: ids <fact>.q<k> and <fact>.p<k> pair by stem."""
    para = _write(tmp_path / "para.jsonl", [{"id": "f1.q0", "em": 1.0}, {"id": "f2.q3", "em": 0.0}])
    test = _write(tmp_path / "test.jsonl", [{"id": "f2.p1", "em": 1.0}, {"id": "f1.p9", "em": 1.0}])
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(SCRIPT), str(para), str(test), "--b-weight", "0.8", "--pair-by-stem",
                    "--json", str(out)], capture_output=True, text=True, check=True)  # fmt: skip
    em = json.loads(out.read_text())["metrics"]["em"]  # differences 1 - 0.8 = 0.2 and 0 - 0.8: mean -0.3, se 0.5
    assert em["n"] == 2 and abs(em["diff"] + 0.3) < 1e-9 and abs(em["se"] - 0.5) < 1e-9
    dup = _write(tmp_path / "dup.jsonl", [{"id": "f1.q0", "em": 1.0}, {"id": "f1.q1", "em": 0.0}])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(dup), str(test), "--pair-by-stem"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0 and "dup.jsonl:2" in proc.stderr and "repeats" in proc.stderr


def test_runs_joined_by_commas_are_averaged_per_question_before_pairing(tmp_path):
    """Two seeds of A: per-question EM (1+0)/2, (1+1)/2, (0+0)/2 = 0.5, 1, 0 against B's 0, 0, 0."""
    a1 = _write(tmp_path / "a1.jsonl", [{"id": "q1", "em": 1.0}, {"id": "q2", "em": 1.0}, {"id": "q3", "em": 0.0}])
    a2 = _write(tmp_path / "a2.jsonl", [
        {"id": "q1", "em": 0.0}, {"id": "q2", "em": 1.0}, {"id": "q3", "em": 0.0}, {"id": "only-a2", "em": 1.0},
    ])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [{"id": f"q{i}", "em": 0.0} for i in (1, 2, 3)])
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), f"{a1},{a2}", str(b), "--metrics", "em", "--json", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    em = json.loads(out.read_text())["metrics"]["em"]  # differences 0.5, 1, 0: mean 0.5, sd 0.5, se 0.5/sqrt(3)
    assert em["n"] == 3 and abs(em["a"] - 0.5) < 1e-9 and abs(em["diff"] - 0.5) < 1e-9
    assert abs(em["se"] - 0.5 / 3**0.5) < 1e-9


def test_a_metric_null_in_the_first_run_is_averaged_over_the_runs_that_have_it(tmp_path):
    a1 = _write(tmp_path / "a1.jsonl", [{"id": "q1", "em": 1.0, "factuality": None},
                                        {"id": "q2", "em": 0.0, "factuality": 0.5}])  # fmt: skip
    a2 = _write(tmp_path / "a2.jsonl", [{"id": "q1", "em": 0.0, "factuality": 1.0},
                                        {"id": "q2", "em": 0.0, "factuality": 0.5}])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [{"id": f"q{i}", "em": 0.0, "factuality": 0.0} for i in (1, 2)])
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(SCRIPT), f"{a1},{a2}", str(b), "--json", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["em"]["a"] == 0.25  # q1 (1 + 0) / 2, q2 0
    fact = metrics["factuality"]  # q1: a2's 1.0 alone (a1's is null), q2: 0.5; against 0 and 0
    assert fact["n"] == 2 and abs(fact["diff"] - 0.75) < 1e-9
