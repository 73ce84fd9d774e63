"""Cost of one question-encoder training step, by how much of MiniLM is trained.

    python benchmarks/bench_question_encoder.py             # writes results/question_encoder_<device>.json
    python benchmarks/bench_question_encoder.py --batch 32 --repeats 40

Joint RAG training back-propagates into the question encoder on every step. This times forward + backward
+ AdamW on a batch of questions for: every weight trained; embeddings frozen; only the top N layers trained
through `model.question_encoder_trainable_layers` (bottom states computed once and cached, as the
RagModule does); and a no-grad forward for reference. Median of ``--repeats`` steps after 5 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rag_lightning.config import QuestionEncoderConfig
from rag_lightning.models.encoder_split import encode_bottom, encode_top, freeze_bottom
from rag_lightning.models.encoders import build_question_encoder, load_encoder_tokenizer

RESULTS = Path(__file__).parent / "results"
MINILM = QuestionEncoderConfig(kind="minilm")


def _questions(n: int) -> list[str]:
    return [f"What is the capital city of the country number {i}, and which language is spoken there?" for i in range(n)]


def _time(step, repeats: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_case(batch: dict, trainable: str | int) -> tuple[Callable[[], None], int]:
    encoder = build_question_encoder(MINILM).train()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if trainable == "no_embeddings":
        encoder.question_encoder.bert_model.embeddings.requires_grad_(False)
    elif isinstance(trainable, int):
        freeze_bottom(encoder, trainable)
        bottom = encode_bottom(encoder, ids, mask, trainable)  # cached once per question in training
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        if isinstance(trainable, int):
            vectors = encode_top(encoder, bottom, mask, trainable)
        else:
            vectors = encoder(input_ids=ids, attention_mask=mask).pooler_output
        vectors.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = load_encoder_tokenizer(MINILM)(_questions(args.batch), padding=True, return_tensors="pt")

    rows = []
    encoder = build_question_encoder(MINILM).eval()

    def forward() -> None:
        with torch.no_grad():
            encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    rows.append({"case": "forward only (no grad)", "trainable_params": 0, "ms": 1000 * _time(forward, args.repeats)})
    for label, trainable in (("all weights", "all"), ("embeddings frozen", "no_embeddings"),
                             ("top 2 layers (bottom cached)", 2), ("top 1 layer (bottom cached)", 1)):
        step, n_params = _train_case(batch, trainable)
        rows.append({"case": label, "trainable_params": n_params, "ms": 1000 * _time(step, args.repeats)})
    for row in rows:
        print(f"{row['case']:32s} {row['trainable_params'] / 1e6:6.1f}M trainable  {row['ms']:7.1f} ms/step")
    meta = {"batch": args.batch, "seq_len": int(batch["input_ids"].shape[1]), "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    out = args.out or RESULTS / "question_encoder_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
