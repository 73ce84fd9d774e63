"""A tiny synthetic QA world and config composition for pipeline tests (tiny models, seconds per run)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_lightning.conf_path import CONFIG_DIR

COUNTRIES = [
    ("Aland", "Mariehamn"), ("Borduria", "Szohod"), ("Carpania", "Valdek"), ("Dorvia", "Pellin"),
    ("Elbonia", "Mudville"), ("Florin", "Guilder"), ("Genovia", "Pyrus"), ("Hyrule", "Kakariko"),
    ("Ixania", "Zorbal"), ("Jotunheim", "Utgard"), ("Krakozhia", "Lavinka"), ("Latveria", "Doomstadt"),
]


def write_tiny_world(root: Path) -> dict[str, str]:
    """Corpus with one passage per country plus distractors; QA with gold passage ids."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = []
    for i, (country, capital) in enumerate(COUNTRIES):
        corpus.append({"id": f"c{i}", "title": country, "text": f"{country} is a country. Its capital is {capital}."})
        corpus.append({"id": f"d{i}", "title": f"{country} river", "text": f"A river flows through {country}."})
    qa = [
        {"id": f"q{i}", "question": f"What is the capital of {country}?", "answers": [capital],
         "gold_passage_ids": [f"c{i}"]}
        for i, (country, capital) in enumerate(COUNTRIES)
    ]
    files = {"corpus": root / "corpus.jsonl", "train": root / "train.jsonl", "val": root / "val.jsonl",
             "test": root / "test.jsonl"}
    files["corpus"].write_text("".join(json.dumps(r) + "\n" for r in corpus))
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in qa[:8]))
    files["val"].write_text("".join(json.dumps(r) + "\n" for r in qa[8:]))
    files["test"].write_text("".join(json.dumps(r) + "\n" for r in qa[8:]))
    return {k: str(v) for k, v in files.items()}


def tiny_overrides(root: Path) -> list[str]:
    """`experiment=tiny` on the tiny world under `root` (data written on first use), as CLI overrides."""
    data = root / "data"
    files = write_tiny_world(data) if not (data / "corpus.jsonl").exists() else {
        k: str(data / f"{k}.jsonl") for k in ("corpus", "train", "val", "test")
    }
    return [
        "experiment=tiny",
        "data=jsonl",
        f"data.dir={data}",
        f"data.corpus_file={files['corpus']}",
        f"data.train_file={files['train']}",
        f"data.val_file={files['val']}",
        f"data.test_file={files['test']}",
        "data.tokenizer.vocab_size=300",
        f"paths.cache_dir={root / 'cache'}",
        "index.progress=false",
    ]


def tiny_train_config(root: Path, *overrides: str, run_dir: Path | None = None) -> DictConfig:
    """`rag-train experiment=tiny` on the tiny world, as composed by Hydra (output dir given explicitly)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_overrides(root), *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir or root / "run")
    OmegaConf.resolve(cfg)
    return cfg
