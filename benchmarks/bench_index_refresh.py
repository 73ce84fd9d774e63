"""The cost of context-encoder training (model.train_context_encoder) on the world set, on this machine:
one index refresh (re-encode the 7,209 passages with MiniLM, build the flat index, write it beside the old one,
swap it in), and the extra work of a training step (the step's retrieved passages encoded with gradient).

    python benchmarks/bench_index_refresh.py            # writes benchmarks/results/index_refresh_cpu.json

With the starting weights the refreshed vectors must equal the cached rag-index vectors of the same encoder
(the max abs difference is recorded). Needs the world data and its MiniLM index (`rag-index`, or any rag-train).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.models.encoders import build_context_encoder, encode_texts, encoder_pad_id
from rag_lightning.models.generator import generator_tokenizer
from rag_lightning.pipeline import rebuild_command, retrieval_spec, sections
from rag_lightning.retrieval.build import open_retriever
from rag_lightning.retrieval.refresh import refresh

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "index_refresh_cpu.json")
    parser.add_argument("--step-questions", type=int, default=16, help="questions per training step")
    parser.add_argument("--repeats", type=int, default=3, help="timed training-step encodings")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model.train_context_encoder=true", "index.progress=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="bench_index_refresh-")  # no Hydra run directory here
    s = sections(cfg)
    retriever = open_retriever(retrieval_spec(s, rebuild_command(cfg)), generator_tokenizer(s.model.generator))
    cached = np.asarray(retriever.index.vectors, dtype=np.float32).copy()
    encoder = build_context_encoder(s.model.question_encoder)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        done = refresh(retriever, encoder, Path(tmp) / "index", s.index, step=1)
        refreshed = np.load(done.directory / "vectors.npy")
    # a training step: n_docs passages per question encoded with gradient, then backward
    rows = torch.randint(0, len(retriever), (args.step_questions, s.model.n_docs), generator=torch.Generator().manual_seed(0))
    ids, mask = retriever.passage_inputs(rows, encoder_pad_id(encoder))
    encoder.train()
    step_s = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        encode_texts(encoder, ids, mask).sum().backward()
        step_s.append(time.perf_counter() - began)
        encoder.zero_grad(set_to_none=True)
    result = {
        "command": "python benchmarks/bench_index_refresh.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}",
        "load_average_before": [round(x, 2) for x in load],
        "passages": len(retriever),
        "encoder": "minilm (all-MiniLM-L6-v2), ctx_max_length 128, index.batch_size "
        f"{s.index.batch_size}, flat index",
        "refresh_s": done.total_s,
        "refresh_encode_s": done.encode_s,
        "refresh_index_write_swap_s": round(done.total_s - done.encode_s, 2),
        "max_abs_diff_vs_rag_index_vectors": float(np.abs(refreshed - cached).max()),
        "step_passages": int(rows.numel()),
        "step_passage_tokens_padded": int(ids.numel()),
        "step_encode_backward_s": [round(x, 3) for x in step_s],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
