"""`logger=mlflow`: a tiny run writes a local store that MLflow's own client reads back (params, metrics,
artifacts); skipped without the `mlflow` extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_lightning.tracking import override_params


def test_override_params_keep_keys_and_values() -> None:
    assert override_params(["experiment=tiny", "model.optim.lr=3e-4", "+tags=[a,b]", "~logger.csv", "x@y=1"]) == {
        "experiment": "tiny",
        "model.optim.lr": "3e-4",
        "tags": "[a,b]",
        "logger.csv": "<deleted>",
        "x_y": "1",
    }


def test_tiny_run_with_mlflow_is_read_back_by_mlflows_client(tmp_path, tiny_train_config) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from omegaconf import open_dict

    from rag_lightning.pipeline import train

    overrides = ["logger=mlflow", f"paths.root_dir={tmp_path}", "model.optim.lr=0.002", "export=false"]
    cfg = tiny_train_config(tmp_path, *overrides)
    with open_dict(cfg):
        cfg.hydra_overrides = overrides  # what Hydra records for a command-line job
    results = train(cfg)
    run_dir = tmp_path / "run"

    store = tmp_path / "outputs" / "mlruns" / "mlflow.db"
    assert store.is_file()  # the local store under outputs/, no server
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-run"
    assert run.data.tags["run_dir"] == str(run_dir)
    # params: the job's overrides (and Lightning's model hyperparameters beside them)
    params = run.data.params
    assert params["model.optim.lr"] == "0.002" and params["logger"] == "mlflow" and params["export"] == "false"
    # metrics as logged: every training step's loss, and the final values of metrics.json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/em", "val/loss", "test/em", "test/recall@1", "val/recall@2", "time/total_s"):
        assert run.data.metrics[key.replace("@", "_at_")] == pytest.approx(metrics[key], rel=1e-6), key
    assert results["test/em"] == pytest.approx(run.data.metrics["test/em"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1]  # 8 questions / batch 4, one epoch
    # artifacts: the run's files
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config_resolved.yaml", "predictions_test.jsonl"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "down"))
    assert json.loads(Path(local).read_text()) == metrics


def test_a_sweeps_jobs_share_one_experiment(tmp_path) -> None:
    from omegaconf import OmegaConf

    from rag_lightning.tracking import configure_mlflow

    store = tmp_path / "outputs" / "mlruns" / "mlflow.db"
    names = []
    for job in ("0", "1"):
        node = OmegaConf.create({"experiment_name": "tiny", "run_name": None, "tracking_uri": f"sqlite:///{store}"})
        configure_mlflow(node, "tiny", tmp_path / "sweep" / job, (tmp_path / "2026-01-01_12-00-00", job, []))
        names.append((node.experiment_name, node.run_name))
    assert names == [("tiny-2026-01-01_12-00-00", "tiny-0"), ("tiny-2026-01-01_12-00-00", "tiny-1")]
    assert store.parent.is_dir()  # SQLite makes the file, not its directory
    single = OmegaConf.create({"experiment_name": "tiny", "run_name": None, "tracking_uri": "http://host:5000"})
    configure_mlflow(single, "tiny", tmp_path / "2026-01-02_08-00-00", None)
    assert (single.experiment_name, single.run_name) == ("tiny", "tiny-2026-01-02_08-00-00")
