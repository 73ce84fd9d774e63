"""MLflow runs of `logger=mlflow`: one experiment per sweep, the job's overrides as params, the run's files as
artifacts.

Lightning's MLFlowLogger logs the metrics as they are logged (`@` becomes `_at_`: MLflow refuses it in a
name); what it does not know about a run is added here:
the store's directory is made before the logger opens it, a sweep's jobs share one experiment, the job's
overrides become params, and at the end `metrics.json`, `config_resolved.yaml` and the predictions are
uploaded. Nothing here imports mlflow: it only talks to loggers the trainer already has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger

# what a run directory holds that is worth keeping beside its metrics
RUN_FILES = (
    "metrics.json", "metrics_by_relation.json", "config_resolved.yaml", "predictions*.jsonl", "val_samples.jsonl"
)
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def mlflow_metric_name(key: str) -> str:
    """MLflow refuses `@` in a metric name: `val/recall@1` is logged as `val/recall_at_1`."""
    return key.replace("@", "_at_")


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's MLFlowLogger, with `@k` metric names kept readable (Lightning would drop the `@` and warn)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_metric_name(k): v for k, v in metrics.items()}, step)


def _mlflow_loggers(loggers: Iterable[Any]) -> list[Any]:
    return [lg for lg in loggers if isinstance(lg, _LightningMLFlowLogger)]


def configure_mlflow(mlflow_cfg: Any, base: str, output_dir: Path, sweep: tuple[Path, str, list[str]] | None) -> None:
    """Name the experiment and run in ``mlflow_cfg`` (the `logger.mlflow` node, edited in place) and make the
    directory of a local SQLite store.

    A job of a sweep goes to the experiment ``<base>-<sweep dir name>`` as run ``<base>-<job id>``; a single
    run keeps the configured experiment and is named ``<base>-<run dir name>``.
    """
    if sweep is not None:
        sweep_dir, job_id, _ = sweep
        mlflow_cfg.experiment_name = f"{base}-{sweep_dir.name}"
        mlflow_cfg.run_name = f"{base}-{job_id}"
    elif not mlflow_cfg.get("run_name"):
        mlflow_cfg.run_name = f"{base}-{output_dir.name}"
    uri = str(mlflow_cfg.get("tracking_uri") or "")
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith("file:"):
        Path(uri[len("file:") :]).mkdir(parents=True, exist_ok=True)


def override_params(overrides: Sequence[str]) -> dict[str, str]:
    """``key=value`` overrides as MLflow params: ``{"model.optim.lr": "3e-4", "experiment": "tiny"}``.

    ``+key=value`` adds and ``++key=value`` forces a key (the key is kept), ``~key`` deletes one (value
    ``<deleted>``); characters MLflow refuses in a key become ``_``.
    """
    params = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        deleted = key.startswith("~")
        key = _PARAM_KEY_BAD.sub("_", key.lstrip("+~"))
        params[key] = "<deleted>" if deleted else value if sep else ""
    return params


def log_overrides(loggers: Iterable[Any], overrides: Sequence[str]) -> None:
    """The job's overrides as params of its MLflow run (the other loggers get the full config elsewhere)."""
    params = override_params(overrides)
    for logger in _mlflow_loggers(loggers):
        if params:
            logger.log_hyperparams(params)
        logger.experiment.set_tag(logger.run_id, "overrides", " ".join(overrides)[:5000])


def log_run_files(loggers: Iterable[Any], output_dir: Path, extra_metrics: dict[str, float], step: int) -> None:
    """Upload the run's files (metrics.json, resolved config, predictions) as artifacts, and log the metrics of
    metrics.json that no step logged (the total time), at the run's last step."""
    files = sorted({p for pattern in RUN_FILES for p in Path(output_dir).glob(pattern) if p.is_file()})
    for logger in _mlflow_loggers(loggers):
        if extra_metrics:
            logger.log_metrics(extra_metrics, step=step)
        for path in files:
            logger.experiment.log_artifact(logger.run_id, str(path))
