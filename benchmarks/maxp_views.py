"""Recall@1 of exported DPR encoders when a passage is also scored by its sentences (MaxP), against whole passages.

A question of the world's administrative divisions names one of a list of ten; one [CLS] vector of the
whole passage does not hold every name (docs/retriever_training.md). MaxP (Dai & Callan, 2019) scores a
passage by the best of several views of it: here the whole passage and each of its sentences, each encoded
with the title as DPR encodes passages. Nothing is trained; the views are only searched.

    python benchmarks/maxp_views.py --encoders outputs/cache/encoders/world_dpr \
        --data outputs/cache/data/world --out benchmarks/results/maxp_views.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        sys.exit(f"{path} is missing. Fix: build the world set first (rag-prepare) or pass --data")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def views(corpus: list[dict]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(title, text) of every passage whole, then of each of its sentences when it has several; the row owning each."""
    out, owner = [], []
    for row, passage in enumerate(corpus):
        sentences = SENTENCE_END.split(passage["text"])
        for text in [passage["text"], *(sentences if len(sentences) > 1 else [])]:
            out.append((passage["title"], text))
            owner.append(row)
    return out, np.asarray(owner)


@torch.no_grad()
def encode(model, tokenizer, pairs: list, batch_size: int = 128, max_length: int = 256) -> torch.Tensor:
    parts = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        if isinstance(chunk[0], tuple):
            inputs = tokenizer([t for t, _ in chunk], [x for _, x in chunk], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
        else:
            inputs = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        parts.append(model(**inputs).pooler_output)
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", type=Path, required=True, help="an export_dir of rag-train-retriever")
    parser.add_argument("--data", type=Path, required=True, help="the world set's directory (corpus.jsonl, val.jsonl)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

    for part in ("question_encoder", "context_encoder"):
        if not (args.encoders / part).is_dir():
            sys.exit(f"{args.encoders / part} is missing. Fix: pass the export_dir of a rag-train-retriever run")
    questions = DPRQuestionEncoder.from_pretrained(args.encoders / "question_encoder").eval()
    contexts = DPRContextEncoder.from_pretrained(args.encoders / "context_encoder").eval()
    q_tok = AutoTokenizer.from_pretrained(args.encoders / "question_encoder")
    c_tok = AutoTokenizer.from_pretrained(args.encoders / "context_encoder")
    corpus = read_jsonl(args.data / "corpus.jsonl")
    asked = read_jsonl(args.data / f"{args.split}.jsonl")
    ids = [p["id"] for p in corpus]
    all_views, owner = views(corpus)
    start = time.time()
    vectors = encode(contexts, c_tok, all_views)
    encode_s = time.time() - start
    scores = (encode(questions, q_tok, [a["question"] for a in asked]) @ vectors.T).numpy()
    whole = scores[:, np.unique(owner, return_index=True)[1]]  # each passage's first view is the whole of it
    best = np.full(whole.shape, -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owner, scores.T)
    result: dict = {"encoders": str(args.encoders), "split": args.split, "questions": len(asked),
                    "passages": len(corpus), "views": len(all_views), "encode_views_s": round(encode_s, 1)}
    relations = Counter(a.get("relation", "") for a in asked)
    for name, table in (("whole", whole), ("maxp", best)):
        hit = np.array([ids[r] in a["gold_passage_ids"] for r, a in zip(table.argmax(1), asked)])
        misses = Counter(a.get("relation", "") for a, h in zip(asked, hit) if not h)
        result[name] = {"recall@1": round(float(hit.mean()), 4),
                        "misses_by_relation": {r: f"{misses[r]} of {n}" for r, n in sorted(relations.items()) if misses[r]}}
        print(f"{name:6s} recall@1 {hit.mean():.3f}  misses: {result[name]['misses_by_relation']}")
    print(f"{len(all_views)} views of {len(corpus)} passages encoded in {encode_s:.0f} s")
    if args.out:
        from rag_lightning.files import write_json_atomic

        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
