"""Sample predictions after each validation: a wandb Table, and a JSONL file for every other logger."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

COLUMNS = ["step", "question", "prediction", "answers", "em", "top passages (p(z|x))"]  # "em": the task's metric


def _passages_cell(record: dict, top: int = 3) -> str:
    return "\n".join(f"{p['p']:.3f} {p['id']} ({p['title']})" for p in record.get("passages", [])[:top])


class PredictionTable(L.Callback):
    """Shows what the model reads and answers: questions, top passages with p(z|x), prediction, gold."""

    def __init__(self, max_rows: int = 8) -> None:
        self.max_rows = max_rows

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.sample_table_size = self.max_rows

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = getattr(pl_module, "val_samples", [])[: self.max_rows]
        if not samples or trainer.sanity_checking:
            return
        step = trainer.global_step
        metric = getattr(getattr(pl_module, "task", None), "primary", "em")  # the task's metric (QA: em)
        columns = [metric if c == "em" else c for c in COLUMNS]
        rows = [
            [step, s["question"], s["prediction"], " | ".join(s["answers"]), s.get(metric), _passages_cell(s)]
            for s in samples
        ]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="val/samples", columns=columns, data=rows, step=step)
        if trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "val_samples.jsonl"
            with path.open("a", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
