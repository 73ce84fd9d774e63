"""Recall@k of dense, BM25 and hybrid retrieval for a trained run's question encoder (issue 16).

Loads a rag-train checkpoint the way rag-eval does (its config_resolved.yaml, its question encoder, its store
and index under the run's paths.cache_dir, relative to the working directory), encodes the questions of its
test splits once, and ranks the corpus with each retriever:

- dense: the run's FAISS index (q.d);
- bm25: BM25 alone (the question text);
- hybrid w (norm): dense top-m + BM25 top-m, ranked by q.d + w * BM25 (norm max: / the question's best BM25);
- rrf: reciprocal rank fusion of the dense and BM25 rankings (1/(60 + rank)), the usual alternative.

A passage is a hit when it is one of the question's gold passages. Reported for all questions of a split and
for the questions of one relation (default element_by_number: "Which element has atomic number N?").

The split name ``number_probe`` asks every element met in the run's QA files (train, val, test and the extra
test files) by its atomic number in each held-out phrasing of ``data/world_paraphrases.py`` (never used in
training): 118 elements x 4 phrasings on the world set, a larger held-out sample than the test splits' 6-10.

    python benchmarks/hybrid_retrieval.py --ckpt RUN/checkpoints/last.ckpt --out benchmarks/results/hybrid_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rag_lightning.files import write_json_atomic

RRF_K = 60


def recall(ranked: list[list[str]], gold: list[list[str]], k: int) -> float:
    hits = [bool(set(r[:k]) & set(g)) for r, g in zip(ranked, gold) if g]
    return round(float(np.mean(hits)), 4) if hits else float("nan")


def rrf(dense_rows: np.ndarray, bm25_rows: np.ndarray, k: int) -> np.ndarray:
    """Reciprocal rank fusion of two rankings (B, m) each; ties to the lower row."""
    out = []
    for d, b in zip(dense_rows, bm25_rows):
        score: dict[int, float] = {}
        for ranking in (d, b):
            for rank, row in enumerate(ranking.tolist()):
                score[row] = score.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
        out.append(sorted(score, key=lambda r: (-score[r], r))[:k])
    return np.asarray(out, dtype=np.int64)


def write_records(name: str, records: list[dict]) -> Path:
    """A question file of the benchmark's own (outputs/bench_hybrid/<name>.jsonl), read by the run's test loader."""
    path = Path("outputs/bench_hybrid") / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def number_probe(files: dict[str, str], relation: str = "element_by_number") -> list[dict]:
    """Every element of the QA files asked by its number in each held-out paraphrase of the relation."""
    import re

    from rag_lightning.data.world_paraphrases import PARAPHRASES

    facts: dict[str, dict] = {}
    for path in files.values():
        for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
            record = json.loads(line) if line.strip() else {}
            if record.get("relation") == relation:
                numbers = re.findall(r"\b\d+\b", record["question"])
                if len(numbers) != 1:
                    raise SystemExit(f"{path}:{line_no}: an {relation} question must name one number, this one names "
                                     f"{len(numbers)}: {record['question']!r}")
                facts.setdefault(numbers[0], record)
    return [
        {"id": f"probe-{number}.q{k}", "question": template.format(number=number), "answers": record["answers"],
         "gold_passage_ids": record["gold_passage_ids"], "relation": relation}
        for number, record in sorted(facts.items(), key=lambda item: int(item[0]))
        for k, template in enumerate(PARAPHRASES[relation])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default="benchmarks/results/hybrid_retrieval.json")
    parser.add_argument("--splits", nargs="+", default=["val", "train", "test", "test_seen"])
    parser.add_argument("--relation", default="element_by_number")
    parser.add_argument("--relation-only", nargs="*", default=["train"],
                        help="splits of which only the --relation questions are read (a probe: train's 212)")
    parser.add_argument("--weights", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--bm25-ngram", type=int, default=1, help="index.bm25_ngram of the BM25 index")
    parser.add_argument("--bm25-min-word-chars", type=int, default=2, help="index.bm25_min_word_chars")
    parser.add_argument("--bm25-whole-numbers", action="store_true", help="index.bm25_whole_numbers=true")
    parser.add_argument("--bm25-adjacent-pairs", action="store_true", help="index.bm25_adjacent_pairs=true")
    args = parser.parse_args()

    from rag_lightning.pipeline import load_trained, run_config
    from rag_lightning.retrieval.retriever import HybridScoring

    start = time.time()
    run_cfg = run_config(args.ckpt, OmegaConf.create({"index": {"hybrid": True}}))
    module, datamodule = load_trained(run_cfg, args.ckpt, "outputs/bench_hybrid")
    retriever = module.retriever
    bm25 = retriever.hybrid.bm25
    if args.bm25_ngram != 1 or args.bm25_min_word_chars != 2 or args.bm25_whole_numbers or args.bm25_adjacent_pairs:
        # another tokenisation: built in memory (seconds)
        from dataclasses import replace

        from rag_lightning.pipeline import sections
        from rag_lightning.retrieval.bm25 import BM25Index

        cfg = replace(sections(run_cfg).index, bm25_ngram=args.bm25_ngram, bm25_min_word_chars=args.bm25_min_word_chars,
                      bm25_whole_numbers=args.bm25_whole_numbers, bm25_adjacent_pairs=args.bm25_adjacent_pairs)
        bm25 = BM25Index.build(retriever.store, cfg)
    files = {"test": run_cfg.data.test_file, "val": run_cfg.data.val_file, "train": run_cfg.data.train_file,
             **run_cfg.data.extra_test_files}
    results: dict = {"splits": {}}
    for split in args.splits:
        path = None
        if split == "number_probe":
            records = number_probe({k: v for k, v in files.items() if v})
            path = write_records("number_probe", records)
        else:
            records = [json.loads(line) for line in Path(files[split]).read_text().splitlines() if line.strip()]
        if split in args.relation_only:  # the relation's questions of a large split, through a file of their own
            records = [r for r in records if r.get("relation") == args.relation]
            path = write_records(f"{split}_{args.relation}", records)
        questions, gold, vectors = [], [], []
        for batch in datamodule.test_loader(split, None if path is None else str(path)):
            with torch.no_grad():
                vectors.append(module.question_encoder(input_ids=batch["question_input_ids"],
                                                       attention_mask=batch["question_attention_mask"]).pooler_output)
            questions += batch["questions"]
            gold += [list(g) for g in batch["gold_passage_ids"]]
        assert questions == [r["question"] for r in records]
        q = torch.cat(vectors).float()
        subset = [i for i, r in enumerate(records) if r.get("relation") == args.relation]
        methods: dict[str, list[list[str]]] = {}
        retriever.hybrid = None
        dense = retriever.retrieve(q, args.candidates)
        methods["dense"] = dense.passage_ids
        _, bm25_rows = bm25.search_texts(questions, args.candidates)
        methods["bm25"] = [[retriever.store.passage_id(int(r)) for r in row] for row in bm25_rows]
        methods["rrf"] = [[retriever.store.passage_id(int(r)) for r in row]
                          for row in rrf(dense.rows.numpy(), bm25_rows, args.candidates)]
        for norm in ("max", "none"):
            for w in args.weights:
                retriever.hybrid = HybridScoring(bm25, w, args.candidates, norm)
                methods[f"hybrid w={w} norm={norm}"] = retriever.retrieve(q, args.k, questions=questions).passage_ids
        table, by_phrasing = {}, {}
        groups: dict[str, list[int]] = {}  # the relation's questions by phrasing: the world's id suffix .p<k> / .q<k>
        for i in subset:
            groups.setdefault(str(records[i].get("id", "")).rsplit(".", 1)[-1], []).append(i)
        order = sorted(groups, key=lambda s: (len(s), s))
        for name, ranked in methods.items():
            table[name] = {
                "all@1": recall(ranked, gold, 1), "all@3": recall(ranked, gold, 3),
                f"{args.relation}@1": recall([ranked[i] for i in subset], [gold[i] for i in subset], 1),
                f"{args.relation}@3": recall([ranked[i] for i in subset], [gold[i] for i in subset], 3),
            }
            by_phrasing[name] = {
                p: {"n": len(groups[p]), f"@{args.k}": recall([ranked[i] for i in groups[p]], [gold[i] for i in groups[p]], args.k)}
                for p in order
            }
        results["splits"][split] = {"questions": len(records), f"{args.relation}_questions": len(subset),
                                    "recall": table, f"{args.relation}_by_phrasing": by_phrasing}
        print(f"== {split}: {len(records)} questions, {len(subset)} {args.relation}")
        for name, row in table.items():
            print(f"  {name:28s} " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
            if name.endswith("norm=none"):
                print(f"    {args.relation}@{args.k} by phrasing: "
                      + ", ".join(f"{p} {v[f'@{args.k}']:.2f} (n={v['n']})" for p, v in by_phrasing[name].items()))
    results.update({
        "ckpt": str(args.ckpt), "candidates": args.candidates, "bm25": bm25.manifest, "k": args.k, "relation": args.relation,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": round(time.time() - start, 1),
    })
    write_json_atomic(Path(args.out), results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
