"""Distributed retrieval: the tie rule, the merge, and 2 gloo processes against single-process search;
then a real 2-process DDP training (``trainer=ddp_cpu``) whose sharded retrieval equals ``rag-eval``'s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning.config import IndexConfig
from rag_lightning.retrieval.distributed import (
    DistributedSearch,
    LazyPassageIndex,
    exact_scores,
    shard_bounds,
    top_k,
)
from rag_lightning.retrieval.faiss_index import PassageIndex

N, DIM, K = 203, 16, 4
BATCHES = [(5, 3), (2, 4), (1, 1)]  # questions of rank 0 and rank 1 at each call: batch sizes differ
TYPES = {
    "flat": {"type": "flat"},
    "hnsw": {"type": "hnsw", "M": 16, "ef_construction": 64, "ef_search": 64},
    "ivfpq": {"type": "ivfpq", "nlist": 2, "m": 4, "nbits": 4, "nprobe": 2, "rerank": 4},
}


def synthetic_vectors() -> np.ndarray:
    """Random vectors with exact ties: duplicated rows (across the shard boundary too) and a zero row."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    for a, b in [(3, 150), (3, 7), (100, 102), (101, 200), (40, 41)]:
        vectors[b] = vectors[a]
    vectors[55] = 0.0
    return vectors


def questions(step: int, rank: int) -> np.ndarray:
    """The questions of a rank at a call: some are passages themselves (their duplicates tie at the top)."""
    vectors = synthetic_vectors()
    rng = np.random.default_rng(100 * step + rank)
    q = rng.standard_normal((BATCHES[step][rank], DIM)).astype(np.float32)
    q[0] = vectors[[3, 100, 101][(step + rank) % 3]]
    return q


def brute_force(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = synthetic_vectors()
    scores = exact_scores(q, np.broadcast_to(vectors, (len(q), N, DIM)))
    return top_k(scores, np.broadcast_to(np.arange(N), scores.shape), k)


def build_indexes(root: Path) -> dict[str, str]:
    dirs = {}
    for kind, cfg in TYPES.items():
        index = PassageIndex.build(synthetic_vectors(), IndexConfig(**cfg, num_threads=1, seed=0))
        index.save(root / kind, {})
        dirs[kind] = str(root / kind)
    return dirs


def open_retriever(directory: str, kind: str, mode: str) -> DistributedSearch:
    cfg = IndexConfig(**TYPES[kind], num_threads=1)
    index = LazyPassageIndex.open(directory, expect={}, cfg=cfg, verify_checksum=True)
    return DistributedSearch(index, mode, cfg)


# ------------------------------------------------------------------------------------------ pure functions
def test_tie_rule_is_score_desc_then_row_asc() -> None:
    scores = np.array([[1.0, 2.0, 2.0, -np.inf, 2.0, 0.5]], dtype=np.float32)
    rows = np.array([[9, 8, 3, -1, 5, 1]])
    s, r = top_k(scores, rows, 4)
    assert r.tolist() == [[3, 5, 8, 9]] and s.tolist() == [[2.0, 2.0, 2.0, 1.0]]
    s, r = top_k(scores[:, :2], rows[:, :2], 3)  # fewer candidates than k: padded with row -1, -inf
    assert r.tolist() == [[8, 9, -1]] and s[0, 2] == -np.inf


def test_shards_cover_the_rows_once() -> None:
    for n, world in [(203, 2), (203, 3), (5, 8), (0, 2)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_exact_scores_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(1)
    q, v = rng.standard_normal((7, 384)).astype(np.float32), rng.standard_normal((7, 13, 384)).astype(np.float32)
    whole = exact_scores(q, v)
    for i in range(7):
        assert np.array_equal(exact_scores(q[i : i + 1], v[i : i + 1, 5:9]), whole[i : i + 1, 5:9])


def test_single_process_flat_equals_brute_force(tmp_path: Path) -> None:
    dirs = build_indexes(tmp_path)
    retriever = open_retriever(dirs["flat"], "flat", "sharded")  # no process group: the full index
    q = np.concatenate([questions(0, 0), questions(1, 1)])
    scores, rows = retriever.search(torch.from_numpy(q), K)
    want_scores, want_rows = brute_force(q, K)
    assert np.array_equal(rows, want_rows) and np.array_equal(scores, want_scores)
    assert rows[0, :3].tolist() == [3, 7, 150]  # three copies of passage 3: lowest rows first


def near_duplicates(seed: int = 0, n: int = 200, d: int = 64, group: int = 10, queries: int = 20):
    """``group`` rows that are one large vector each moved by a few float32 ulps per component, and questions
    pointing at it: their exact scores differ only in the last bits (or tie once rounded), below the error of
    faiss's float32 accumulation, and sit far above every other row. Returns (vectors, questions, group rows)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    base = (rng.standard_normal(d) * 100).astype(np.float32)
    rows = np.sort(rng.choice(n, group, replace=False))
    for row in rows:
        v = base.copy()
        for _ in range(4):
            v = np.nextafter(v, np.where(rng.random(d) < 0.5, np.inf, -np.inf).astype(np.float32))
        vectors[row] = v
    q = (base / np.linalg.norm(base) * 10 + rng.standard_normal((queries, d))).astype(np.float32)
    return vectors, q, rows


def test_candidates_beyond_k_compete_when_faiss_float32_misorders_the_k_th_place(tmp_path: Path) -> None:
    """faiss's float32 scores of near-duplicate passages tie or misorder them near the k-th place; the search
    asks faiss for k + CANDIDATE_MARGIN candidates and re-scores them exactly, so its top-k is the float64
    brute force's (rows, scores, order). With only k candidates it would keep faiss's choice of the group."""
    vectors, q, group = near_duplicates()
    k = 4
    index = PassageIndex.build(vectors, IndexConfig(type="flat", num_threads=1))
    index.save(tmp_path / "flat", {})
    n, d = vectors.shape
    exact = exact_scores(q, np.broadcast_to(vectors, (len(q), n, d)))
    want_scores, want_rows = top_k(exact, np.broadcast_to(np.arange(n), exact.shape), k)
    assert np.isin(want_rows, group).all()  # the top-k is drawn from the near-duplicate group
    # the premise: faiss's own float32 top-k is a different set of the group for some questions
    _, faiss_rows = index.search(q, k)
    differs = [set(a) != set(b) for a, b in zip(faiss_rows.tolist(), want_rows.tolist())]
    assert sum(differs) >= 3, "faiss's float32 top-k agrees with the exact one: the test vectors are too easy"

    searcher = DistributedSearch(LazyPassageIndex.open(tmp_path / "flat", expect={}), "sharded")
    scores, rows = searcher.search(torch.from_numpy(q), k)
    assert np.array_equal(rows, want_rows)
    assert np.array_equal(scores, want_scores)


# ------------------------------------------------------------------------------------------ 2 gloo processes
def _worker(rank: int, world_size: int, init_file: str, dirs: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for kind, directory in dirs.items():
            for mode in ("sharded", "replicated"):
                retriever = open_retriever(directory, kind, mode)
                for step in range(len(BATCHES)):
                    k = K if step < 2 else 1
                    scores, rows = retriever.search(torch.from_numpy(questions(step, rank)), k)
                    results[f"{kind}-{mode}-{step}-scores"], results[f"{kind}-{mode}-{step}-rows"] = scores, rows
        np.savez(Path(out) / f"rank{rank}.npz", **results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], list[dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("distributed")
    dirs = build_indexes(root / "indexes")
    mp.spawn(_worker, args=(2, str(root / "init"), dirs, str(root)), nprocs=2, join=True)
    return dirs, [dict(np.load(root / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("kind", list(TYPES))
def test_two_ranks_replicated_equals_single_process(two_ranks, kind: str) -> None:
    dirs, ranks = two_ranks
    single = open_retriever(dirs[kind], kind, "replicated")
    for step in range(len(BATCHES)):
        for rank in range(2):
            scores, rows = single.search(torch.from_numpy(questions(step, rank)), K if step < 2 else 1)
            assert np.array_equal(ranks[rank][f"{kind}-replicated-{step}-rows"], rows)
            assert np.array_equal(ranks[rank][f"{kind}-replicated-{step}-scores"], scores)


def test_two_ranks_sharded_flat_equals_single_process_exactly(two_ranks) -> None:
    dirs, ranks = two_ranks
    single = open_retriever(dirs["flat"], "flat", "sharded")
    for step in range(len(BATCHES)):
        for rank in range(2):
            q = questions(step, rank)
            k = K if step < 2 else 1
            scores, rows = single.search(torch.from_numpy(q), k)
            got_rows, got_scores = ranks[rank][f"flat-sharded-{step}-rows"], ranks[rank][f"flat-sharded-{step}-scores"]
            assert got_rows.shape == (len(q), k)
            assert np.array_equal(got_rows, rows), (step, rank)
            assert np.array_equal(got_scores, scores)
            assert np.array_equal(got_rows, brute_force(q, k)[1])
    # the tied copies of passage 3 (rows 3, 7 in shard 0 and 150 in shard 1) merge in row order
    assert ranks[0]["flat-sharded-0-rows"][0, :3].tolist() == [3, 7, 150]


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_two_ranks_sharded_approximate_types_score_exactly_and_never_worse(two_ranks, kind: str) -> None:
    dirs, ranks = two_ranks
    vectors = synthetic_vectors()
    single = open_retriever(dirs[kind], kind, "sharded")
    for step in range(2):
        for rank in range(2):
            q = questions(step, rank)
            got_rows, got_scores = ranks[rank][f"{kind}-sharded-{step}-rows"], ranks[rank][f"{kind}-sharded-{step}-scores"]
            assert (got_rows >= 0).all() and (got_rows < N).all()
            np.testing.assert_array_equal(got_scores, exact_scores(q, vectors[got_rows]))
            if kind == "ivfpq":  # each shard re-ranks its own candidates: a superset of the single pool
                single_scores, _ = single.search(torch.from_numpy(q), K)
                assert (got_scores >= single_scores - 1e-6).all()
            else:
                assert np.mean(got_rows == brute_force(q, K)[1]) >= 0.9


# ------------------------------------------------------------------------------------------ DDP training
def test_ddp_cpu_training_two_processes(tmp_path: Path, rag_train, tiny_overrides, eval_config) -> None:
    run = tmp_path / "run"
    rag_train(
        tmp_path,
        *tiny_overrides(tmp_path),
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "logger=csv",
        f"run_dir={run}",
    )
    # one checkpoint of each kind, written once (no per-rank copies or version suffixes)
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(names) == 2 and "last.ckpt" in names, names
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # 8 questions, global batch 4 = 2 per rank x 2 ranks, 2 epochs
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/em", "test/em", "test/recall@2"} <= set(metrics)
    logged = next((run / "csv").rglob("hparams.yaml")).read_text()  # the effective batch reaches the loggers
    assert "effective_batch_size: 4" in logged and "per_device_batch_size: 2" in logged
    # rank 1 logged to its own file in the same run directory
    assert (run / "train.log").is_file() and any(run.glob("*ddp_rank1*.log"))
    # the test stage ran sharded over 2 ranks; rag-eval on one process must see the same passages
    ddp = {r["id"]: r for r in map(json.loads, (run / "predictions_test.jsonl").read_text().splitlines())}
    assert len(ddp) == 4
    from rag_lightning.pipeline import evaluate

    best = next(p for p in (run / "checkpoints").glob("step*.ckpt"))
    evaluate(eval_config(best, tmp_path / "eval"))
    single = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for record in single:
        other = ddp[record["id"]]
        assert [p["id"] for p in record["passages"]] == [p["id"] for p in other["passages"]]
        np.testing.assert_allclose(
            [p["score"] for p in record["passages"]], [p["score"] for p in other["passages"]], atol=2e-5
        )


# ------------------------------------------------------------------------------------------ GPU check
REPO = Path(__file__).resolve().parents[1]


def gpu_check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "samples/s" in proc.stdout and "MFU assumption" in proc.stdout
    return json.loads(out.read_text())


def test_gpu_check_runs_tiny_on_cpu(tmp_path: Path) -> None:
    result = gpu_check(tmp_path, "--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1", "--threads", "1")
    assert result["samples_per_s"] > 0 and result["shape"]["n_docs"] == 5
    assert result["flops_per_step"]["total"] > 0 and result["mfu"] is None and result["peak_memory_bytes"] is None
    assert np.isfinite(result["final_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_bart_base_on_gpu(tmp_path: Path) -> None:
    result = gpu_check(tmp_path, "--steps", "5", "--warmup", "2")
    assert result["precision"] == "bf16-mixed" and result["index"]["passages"] == 100_000
    assert result["peak_memory_bytes"] > 0 and result["samples_per_s"] > 0
    assert result["mfu"] is None or 0 < result["mfu"] < 1
