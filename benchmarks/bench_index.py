"""Retrieval benchmark on this machine: encoding throughput, and build time / queries/s / recall@10 / memory of
the FAISS index types on seeded clustered 768-d vectors (100k: flat, hnsw, ivfpq; 1M: flat, ivfpq).

    python benchmarks/bench_index.py                 # full run, writes benchmarks/results/index_<date>.json
    python benchmarks/bench_index.py --sizes 100000  # one size only

The 1M x 768 float32 set (2.9 GiB) is generated once into --data-dir and memory-mapped; indexes add it in chunks.
Recall@10 is measured against the flat index of the same vectors (exact search).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning: on a small machine shared with other jobs, spinning threads
# made faiss training ~8x slower here. Set before faiss and torch load their OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rag_lightning.config import IndexConfig, QuestionEncoderConfig  # noqa: E402
from rag_lightning.retrieval.faiss_index import PassageIndex  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DIM, CLUSTERS, QUERIES, K = 768, 1000, 1000, 10
FILLER = "the capital city of the country lies on a river and has a population of about two million"
CONFIGS: dict[int, dict[str, dict[str, Any]]] = {
    100_000: {
        "flat": {"type": "flat"},
        "hnsw": {"type": "hnsw", "M": 32, "ef_construction": 80, "ef_search": 128},
        "ivfpq": {
            "type": "ivfpq",
            "nlist": 512,
            "m": 96,
            "nbits": 8,
            "train_size": 32_768,
            "nprobe": 32,
            "rerank_sweep": [4, 16, 64],
        },
    },
    1_000_000: {
        "flat": {"type": "flat"},
        "ivfpq": {
            "type": "ivfpq",
            "nlist": 2048,
            "m": 96,
            "nbits": 8,
            "train_size": 65_536,
            "nprobe": 32,
            "rerank_sweep": [4, 16, 64],
        },
    },
}


def index_file_mib(index: PassageIndex) -> float:
    """Size of the index as faiss writes it: about what it holds in memory (the vectors memmap excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index.index, f"{tmp}/index.faiss")
        return Path(f"{tmp}/index.faiss").stat().st_size / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of the process, memory-mapped pages included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def clustered_memmap(path: Path, n: int, seed: int, chunk: int = 50_000) -> np.memmap:
    """Unit vectors around CLUSTERS fixed centres, written chunk by chunk (deterministic for n, seed)."""
    if path.exists():
        return np.load(path, mmap_mode="r")
    centres = np.random.default_rng(12345).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, CLUSTERS, m)] + 0.6 * rng.standard_normal((m, DIM), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def bench_index(
    vectors: np.ndarray, queries: np.ndarray, cfg: dict[str, Any], truth: np.ndarray | None
) -> list[dict[str, Any]]:
    """Build once, then time the search for each ``rerank`` of the sweep (a search-time setting)."""
    start = time.perf_counter()
    params = {k: v for k, v in cfg.items() if k != "rerank_sweep"}
    index = PassageIndex.build(vectors, IndexConfig(**params))
    build_s = time.perf_counter() - start
    size_mib = index_file_mib(index)
    results = []
    for rerank in cfg.get("rerank_sweep", [None]):
        if rerank is not None:
            index.search_params["rerank"] = rerank
        index.search(queries[:10], K)  # warm-up
        start = time.perf_counter()
        _, rows = index.search(queries, K)
        search_s = time.perf_counter() - start
        recall = (
            1.0 if truth is None else float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, truth)]))
        )
        results.append(
            {
                "n": len(vectors),
                "type": cfg["type"],
                "params": dict(index.effective_params) | index.search_params,
                "build_s": round(build_s, 2),
                "queries_per_s": round(len(queries) / search_s, 1),
                "recall_at_10": round(recall, 4),
                "index_mib": round(size_mib, 1),
                "rows": rows,
            }
        )
    return results


def bench_encode(n_passages: int, batch_size: int) -> dict[str, Any]:
    """Passages/s of encode_passages with the MiniLM context encoder over a store of real-length passages."""
    from transformers import BertTokenizerFast

    from rag_lightning.data.gen_tokenizer import train_generator_tokenizer
    from rag_lightning.models.encoders import build_context_encoder, minilm_dir
    from rag_lightning.retrieval.encode import encode_passages
    from rag_lightning.retrieval.store import CorpusStore

    passages = world_passages(n_passages)
    with tempfile.TemporaryDirectory() as tmp:
        gen_tok = train_generator_tokenizer(
            [p.text for p in passages[:500]], Path(tmp) / "tok", vocab_size=2000
        )
        ctx_tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
        start = time.perf_counter()
        store = CorpusStore.build(passages, gen_tok, ctx_tok, Path(tmp) / "store", ctx_max_length=128)
        store_s = time.perf_counter() - start
        encoder = build_context_encoder(QuestionEncoderConfig(kind="minilm"))
        start = time.perf_counter()
        encode_passages(
            encoder, store, Path(tmp) / "enc", batch_size=batch_size, shard_size=2048, progress=False
        )
        encode_s = time.perf_counter() - start
        mean_tokens = float(np.mean(store.ctx_lengths()))
    return {
        "passages": len(passages),
        "mean_ctx_tokens": round(mean_tokens, 1),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "store_passages_per_s": round(len(passages) / store_s, 1),
        "encode_passages_per_s": round(len(passages) / encode_s, 1),
    }


def world_passages(n: int) -> list[Any]:
    """Passages of the world corpus when it has been prepared, else synthetic ones of DPR length (~100 words)."""
    from rag_lightning.data.readers import Passage, read_corpus

    corpus = Path(os.environ.get("RAG_ROOT", ".")) / "outputs/cache/data/world/corpus.jsonl"
    if corpus.is_file():
        passages = read_corpus(corpus)
        return [passages[i % len(passages)] for i in range(n)]
    words = FILLER.split()
    rng = np.random.default_rng(0)
    return [Passage(f"p{i}", f"Title {i}", " ".join(rng.choice(words, 100))) for i in range(n)]


def world_recall(root: Path, ks: tuple[int, ...] = (1, 5, 20)) -> dict[str, Any] | None:
    """Gold-passage recall@k of the untrained MiniLM question encoder on the world val questions, using the
    index `rag-index data=world` built (skipped when it has not been built)."""
    import json as _json

    from rag_lightning.models.encoders import build_question_encoder, encode_texts, load_encoder_tokenizer
    from rag_lightning.retrieval.store import CorpusStore

    index_dir, store_dir = root / "indexes/world-minilm-flat", root / "stores/world"
    val = root / "data/world/val.jsonl"
    if not (index_dir / "index_manifest.json").is_file() or not val.is_file():
        return None
    store, index = CorpusStore.open(store_dir), PassageIndex.load(index_dir, expect={})
    questions = [_json.loads(line) for line in val.read_text().splitlines() if line.strip()]
    tok = load_encoder_tokenizer(QuestionEncoderConfig(kind="minilm"))
    batch = tok(
        [q["question"] for q in questions], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.inference_mode():
        vectors = encode_texts(
            build_question_encoder(QuestionEncoderConfig(kind="minilm")), batch["input_ids"], batch["attention_mask"]
        )
    _, rows = index.search(vectors.numpy(), max(ks))
    found = [[store.passage_id(int(r)) for r in row] for row in rows]
    recall = {
        f"recall_at_{k}": round(
            float(np.mean([bool(set(f[:k]) & set(q["gold_passage_ids"])) for f, q in zip(found, questions)])),
            4,
        )
        for k in ks
    }
    return {"questions": len(questions), "passages": len(store), **recall}


def table(rows: list[dict[str, Any]]) -> str:
    head = "| vectors | index | params | build s | queries/s | recall@10 | index MiB |\n|---|---|---|---|---|---|---|"
    lines = [
        f"| {r['n']:,} | {r['type']} | {', '.join(f'{k}={v}' for k, v in r['params'].items()) or '-'} | "
        f"{r['build_s']} | {r['queries_per_s']:,} | {r['recall_at_10']:.3f} | {r['index_mib']:,} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=sorted(CONFIGS), help="other sizes: 100k set-up"
    )
    parser.add_argument("--skip-encode", action="store_true", help="skip the encoding throughput run")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("outputs/cache"), help="where rag-index put world"
    )
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "rag_bench")
    parser.add_argument("--encode-passages", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss default)")
    parser.add_argument("--out", type=Path, default=RESULTS / f"index_{time.strftime('%Y%m%d')}.json")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg(),
            "faiss": faiss.__version__,
            "torch": torch.__version__,
            "faiss_threads": args.threads or faiss.omp_get_max_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "dim": DIM,
        "k": K,
        "queries": QUERIES,
    }
    report["world_retrieval"] = world_recall(args.cache_dir)
    print("world retrieval:", json.dumps(report["world_retrieval"]), flush=True)
    if not args.skip_encode:
        print("encoding throughput (MiniLM context encoder) ...", flush=True)
        report["encode"] = bench_encode(args.encode_passages, batch_size=64)
        print(json.dumps(report["encode"]), flush=True)
    rows: list[dict[str, Any]] = []
    queries = None
    for n in args.sizes:
        t = time.perf_counter()
        vectors = clustered_memmap(args.data_dir / f"clustered_{n}x{DIM}_seed0.npy", n, seed=0)
        queries = np.asarray(
            clustered_memmap(args.data_dir / f"queries_{QUERIES}x{DIM}_seed1.npy", QUERIES, 1)
        )
        print(f"{n:,} vectors ready in {time.perf_counter() - t:.1f}s", flush=True)
        truth = None
        for name, cfg in CONFIGS.get(n, CONFIGS[100_000]).items():
            for result in bench_index(vectors, queries, {**cfg, "num_threads": args.threads}, truth):
                found = result.pop("rows")
                if name == "flat":
                    truth = found
                rows.append(result)
                print(json.dumps(result), flush=True)
    report["indexes"] = rows
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    if "encode" in report:
        enc = report["encode"]
        print(
            f"encode: {enc['encode_passages_per_s']} passages/s (MiniLM-L6, {enc['mean_ctx_tokens']} tokens/passage, "
            f"batch {enc['batch_size']}, {enc['torch_threads']} threads); store build {enc['store_passages_per_s']} "
            "passages/s"
        )
    print(table(rows))
    print(f"peak RSS {report['peak_rss_mib']:,} MiB, total {report['total_s']}s -> {args.out}")


if __name__ == "__main__":
    main()
