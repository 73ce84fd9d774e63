"""rag-prepare: build the world data set, or check and count users' files, and say where they are."""

from __future__ import annotations

import time
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.data.prepare_data import ensure_prepared
from rag_lightning.data.world import KINDS, MANIFEST_FILE, SPLITS, TOKENIZER_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


def summary_table(manifest: dict[str, Any]) -> Table:
    """What was prepared: passages and questions per split for the world set, rows per file otherwise."""
    if manifest.get("builder"):
        table = Table(title=f"world data in {manifest['dir']}")
        table.add_column("item")
        table.add_column("count", justify="right")
        table.add_column("file", overflow="fold")
        counts = manifest["counts"]
        table.add_row("passages", f"{counts['passages']:,}", "corpus.jsonl")
        for split in SPLITS:
            table.add_row(f"{split} questions", f"{counts['questions'][split]:,}", f"{split}.jsonl")
        for kind in KINDS:
            table.add_row(f"{kind} entities", f"{counts['entities'][kind]:,}", "")
        table.add_row("generator tokenizer", "", f"{TOKENIZER_DIR}/")
        table.add_row("manifest", "", MANIFEST_FILE)
        return table
    table = Table(title="your data")
    table.add_column("item")
    table.add_column("rows", justify="right")
    table.add_column("file", overflow="fold")
    for key, path in manifest["files"].items():
        c = manifest.get("counts", {}).get(key, {})
        skipped = f" ({c['skipped']:,} bad rows skipped)" if c.get("skipped") else ""
        table.add_row(key, f"{c.get('rows', 0):,}{skipped}", path)
    table.add_row("generator tokenizer", "", manifest.get("generator_tokenizer") or "(the generator's own)")
    return table


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
@friendly_errors
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    manifest = ensure_prepared(cfg.data, validate=True)
    console = Console()
    console.print(summary_table(manifest))
    status = manifest.get("status", "checked")
    console.print(f"data '{cfg.data.name}' {status} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
