"""rag-train: fit a RAG model, test its best checkpoint, export it (see conf/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    from rag_lightning.pipeline import train

    results = train(cfg)
    # returned for sweepers (optuna): the metric named by `optimized_metric`
    return results.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
