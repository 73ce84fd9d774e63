"""rag-predict: answer questions with a trained checkpoint and show the passages used."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import friendly_errors, friendly_hydra_errors


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from rag_lightning.pipeline import predict

    predict(cfg)


if __name__ == "__main__":
    main()
