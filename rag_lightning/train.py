"""rag-train: fit a RAG model, test its best checkpoint, export it (see conf/train.yaml)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.errors import UserError, exit_with, friendly_errors, friendly_hydra_errors


@friendly_hydra_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@friendly_errors
def run(cfg: DictConfig) -> float | None:
    from rag_lightning.pipeline import train

    results = train(cfg)
    # returned for sweepers (optuna): the metric named by `optimized_metric`
    return results.get(cfg.get("optimized_metric"))


def main() -> float | None:
    """A resume (`run_dir=... ckpt_path=...`) is checked before Hydra writes into the run directory
    (rag_lightning/resume.py); the run's record is put back if the resumed job stops on a user error."""
    from rag_lightning.resume import prepare

    try:
        sys.argv, snapshot = prepare(sys.argv)
    except UserError as err:
        if os.environ.get("RAG_DEBUG"):
            raise
        exit_with(str(err))
    try:
        return run()
    except SystemExit as stop:
        if snapshot is not None and stop.code == 2:
            snapshot.restore()
        raise


if __name__ == "__main__":
    main()
