"""Helpers of the world-set tests (test_world.py, test_world_paraphrase.py): the data config rag-prepare composes,
and a build read back. A plain module, not a test module, so both can import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import DataConfig, section
from rag_lightning.data.prepare_data import ensure_prepared

SPLITS = ("train", "val", "test", "test_seen", "test_paraphrase")
# a small world build: big cities only, a small tokenizer, few questions (seconds instead of a minute)
SMALL = {
    "min_city_population": 2_000_000,
    "vocab_size": 1000,
    "max_train_questions": 500,
    "max_eval_questions": 50,
}


def data_node(tmp: Path, name: str = "world", *overrides: str) -> Any:
    """The composed `data` node, as rag-prepare composes it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("prepare", overrides=[f"data={name}", f"paths.cache_dir={tmp}", *overrides])
    return cfg.data


def data_config(tmp: Path, name: str = "world", *overrides: str) -> DataConfig:
    """The typed `data` section, as rag-prepare builds it."""
    return section(DataConfig, data_node(tmp, name, *overrides), "data")


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_build(cfg: DataConfig) -> dict[str, Any]:
    """Build (or reuse) the world set of ``cfg`` as rag-prepare does and read it back: config, manifest, root
    directory, passages by id and every split's questions."""
    manifest = ensure_prepared(cfg)
    root = Path(manifest["dir"])
    return {
        "cfg": cfg,
        "manifest": manifest,
        "root": root,
        "passages": {p["id"]: p for p in load_jsonl(root / "corpus.jsonl")},
        "splits": {s: load_jsonl(root / f"{s}.jsonl") for s in SPLITS},
    }
