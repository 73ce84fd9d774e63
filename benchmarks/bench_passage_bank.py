"""The cost of training the passage side against the whole corpus (`dpr.bank`) on the world set, on this machine:
the passage states below the context encoder's top layer (once), a refresh of every passage's vector from them,
and a step's fresh encodings (positives and hardest negatives) forward and backward, with the last layer over
every token as a BertLayer runs it, and at [CLS] only as the bank runs it.

    python benchmarks/bench_passage_bank.py paths.cache_dir=<cache>   # writes benchmarks/results/passage_bank_cpu.json

The refreshed vectors of the starting encoder must equal its cached rag-index vectors (the max abs difference is
recorded). Needs the world data and its MiniLM vectors (`rag-index`, or any rag-train / rag-train-retriever run).
Arguments other than the flags are overrides of `rag-train-retriever experiment=world_dpr`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import (
    ContextConfig,
    DataConfig,
    IndexConfig,
    PathsConfig,
    QuestionEncoderConfig,
    section,
)
from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
from rag_lightning.models.encoder_split import encode_top, freeze_bottom
from rag_lightning.models.encoders import build_context_encoder, encoder_pad_id
from rag_lightning.models.passage_bank import PassageBank
from rag_lightning.retrieval.build import RetrievalSpec, ensure_index
from rag_lightning.retrieval.encode import encode_passages

RESULTS = Path(__file__).parent / "results"


def _median_s(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return round(float(np.median(times)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "passage_bank_cpu.json")
    parser.add_argument("--fresh", type=int, default=128, help="passages encoded fresh per step (32 x (1 + 3))")
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train_retriever", overrides=["experiment=world_dpr", "paths.output_dir=/tmp", *overrides])
    data = section(DataConfig, cfg.data, "data")
    encoder_cfg = section(QuestionEncoderConfig, cfg.model.question_encoder, "model.question_encoder")
    index_cfg = section(IndexConfig, cfg.index, "index")
    paths = section(PathsConfig, cfg.paths, "paths")
    spec = RetrievalSpec(data, encoder_cfg, index_cfg, ContextConfig(), paths.cache_dir, "rag-index")
    store, _, _ = ensure_index(spec, load_generator_tokenizer(data.generator_tokenizer))
    encoder = build_context_encoder(encoder_cfg)
    cached = np.asarray(encode_passages(encoder, store, index_cfg.vectors_dir, progress=False), dtype=np.float32)
    load = os.getloadavg()

    began = time.perf_counter()
    bank = PassageBank.build(encoder, [store.ctx_tokens(r) for r in range(len(store))], 1, encoder_pad_id(encoder),
                             progress=False)
    states_s = time.perf_counter() - began
    began = time.perf_counter()
    refreshed = bank.vectors(encoder).numpy()
    refresh_s = time.perf_counter() - began

    freeze_bottom(encoder, 1)
    encoder.train()
    rows = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: args.fresh]
    states, mask = bank.padded(rows)
    def step(cls_only: bool):
        return lambda: encode_top(encoder, states, mask, 1, cls_only=cls_only).sum().backward()

    result = {
        "command": "python benchmarks/bench_passage_bank.py " + " ".join(overrides),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}",
        "load_average_before": [round(x, 2) for x in load],
        "passages": len(bank),
        "tokens": int(bank.states.shape[0]),
        "encoder": "minilm (all-MiniLM-L6-v2), top layer trained (dpr.bank.layers=1)",
        "states_s": round(states_s, 1),
        "states_gb": round(bank.states.numel() * 4 / 1e9, 2),
        "refresh_s": round(refresh_s, 2),
        "max_abs_diff_refresh_vs_rag_index_vectors": float(np.abs(refreshed - cached).max()),
        "fresh_passages": int(len(rows)),
        "fresh_forward_backward_s_every_token": _median_s(step(False), args.repeats),
        "fresh_forward_backward_s_cls_only": _median_s(step(True), args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
