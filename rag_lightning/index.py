"""rag-index: build or check the corpus store and the FAISS index of a data set (see conf/index.yaml)."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


def summary_table(rows: dict[str, str]) -> Table:
    table = Table(title="retrieval index")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    for item, value in rows.items():
        table.add_row(item, value)
    return table


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="index")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from rag_lightning.pipeline import index

    start = time.perf_counter()
    summary = index(cfg)
    console = Console()
    console.print(summary_table(summary))
    console.print(f"index '{Path(summary['index dir']).name}' ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
