"""rag-index: build or check the corpus store and the FAISS index of a data set (see conf/index.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


def summary_table(store_dir: str, index_dir: str) -> Table:
    """What the store and the index hold, from their manifests."""
    from rag_lightning.retrieval.faiss_index import MANIFEST_FILE
    from rag_lightning.retrieval.store import CorpusStore

    store = CorpusStore.read_manifest(store_dir) or {}
    index = json.loads((Path(index_dir) / MANIFEST_FILE).read_text())
    table = Table(title="retrieval index")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("passages", f"{store.get('passages', 0):,}")
    table.add_row(
        "tokens (generator / context encoder)",
        f"{store.get('gen_tokens', 0):,} / {store.get('ctx_tokens', 0):,}",
    )
    table.add_row("encoder", f"{index['encoder_name']} ({index['encoder_fingerprint'][:12]})")
    params = ", ".join(f"{k}={v}" for k, v in {**index["effective_params"], **index["search_params"]}.items())
    table.add_row("index", f"{index['index_type']} {params}".strip())
    table.add_row("vectors", f"{index['passages']:,} x {index['dim']} float32")
    table.add_row("index file", f"{index['index_bytes'] / 2**20:,.1f} MiB (faiss {index['faiss_version']})")
    table.add_row("store dir", store_dir)
    table.add_row("index dir", index_dir)
    return table


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="index")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from rag_lightning.retrieval.build import ensure_index

    start = time.perf_counter()
    store_dir, index_dir = ensure_index(cfg)
    console = Console()
    console.print(summary_table(store_dir, index_dir))
    console.print(
        f"index '{cfg.data.name}-{cfg.model.question_encoder.kind}-{cfg.index.type}' ready in "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
