"""rag-train-retriever: the DPR stage, question and context encoders trained contrastively (see
conf/train_retriever.yaml and docs/retriever_training.md)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train_retriever")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    from rag_lightning.dpr_stage import train_retriever

    results = train_retriever(cfg)
    return results.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
