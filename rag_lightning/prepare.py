"""rag-prepare: build the world data set, or check and count users' files, and say where they are."""

from __future__ import annotations

import time
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import DataConfig, section
from rag_lightning.data.prepare_data import WORLD_FILE_KEYS, WORLD_MANIFEST, ensure_prepared
from rag_lightning.errors import friendly_errors, friendly_hydra_errors

COUNTERFACTUAL_BUILDER = "rag_lightning.data.world_counterfactual"  # its manifest's "builder" (not imported here)


def summary_table(manifest: dict[str, Any]) -> Table:
    """What was prepared: passages and questions per split for the world set, rows per file otherwise."""
    if manifest.get("builder") == COUNTERFACTUAL_BUILDER:
        return counterfactual_table(manifest)
    if manifest.get("builder"):
        table = Table(title=f"world data in {manifest['dir']}")
        table.add_column("item")
        table.add_column("count", justify="right")
        table.add_column("file", overflow="fold")
        counts = manifest["counts"]
        table.add_row("passages", f"{counts['passages']:,}", WORLD_FILE_KEYS["corpus_file"])
        for split, n in counts["questions"].items():
            table.add_row(f"{split} questions", f"{n:,}", f"{split}.jsonl")
        for kind, n in counts["entities"].items():
            table.add_row(f"{kind} entities", f"{n:,}", "")
        table.add_row("generator tokenizer", "", f"{WORLD_FILE_KEYS['generator_tokenizer']}/")
        table.add_row("manifest", "", WORLD_MANIFEST)
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


def counterfactual_table(manifest: dict[str, Any]) -> Table:
    """What the counterfactual copy changed, and where its files are."""
    counts = manifest["counts"]
    table = Table(title=f"counterfactual world in {manifest['dir']} (from {manifest['source_dir']})")
    table.add_column("item")
    table.add_column("count", justify="right")
    table.add_column("file", overflow="fold")
    table.add_row("passages (rewritten)", f"{counts['passages']:,} ({counts['passages_changed']:,})", "corpus.jsonl")
    for relation, n in counts["facts_changed"].items():
        table.add_row(f"{relation} facts changed", f"{n:,}", "changes.jsonl")
    if "capital_unchanged_no_other_city" in counts:
        table.add_row("capitals kept (no other city)", f"{counts['capital_unchanged_no_other_city']:,}", "")
    table.add_row("test questions", f"{counts['questions']['test']:,}", "test.jsonl")
    table.add_row("whose answer changed", f"{counts['questions']['test_changed']:,}",
                  "test_changed.jsonl, test_changed_original.jsonl")
    table.add_row("manifest", "", WORLD_MANIFEST)
    return table


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
@friendly_errors
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    manifest = ensure_prepared(section(DataConfig, cfg.data, "data"), validate=True)
    console = Console()
    console.print(summary_table(manifest))
    status = manifest.get("status", "checked")
    console.print(f"data '{cfg.data.name}' {status} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
