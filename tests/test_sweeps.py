"""Sweeps: `rag-train -m` with DDP (each job trained once, one sweep directory, one wandb run per job), optuna
on a joblib launcher, and the composition of the SLURM (submitit) and joblib launchers."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.ddp import hydra_job_command


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def only_sweep(root: Path) -> Path:
    sweeps = sorted((root / "outputs" / "multiruns" / "train").iterdir())
    assert len(sweeps) == 1, f"expected one sweep directory, found {sweeps}"
    assert not (root / "outputs" / "runs").exists(), "a job ran outside its sweep directory"
    return sweeps[0]


# ------------------------------------------------------------------------------------------ fast checks
def test_child_command_reruns_one_job_in_run_mode() -> None:
    command = hydra_job_command(
        overrides=["experiment=tiny", "model.optim.lr=0.001", "hparams_search=optuna"],
        output_dir="/runs/sweep 1/0",
        config_name="train",
        config_dirs=["/extra/conf"],
        job_name="train",
        rank=1,
        sweep_dir="/runs/sweep 1",
    )
    assert command[:3] == [sys.executable, "-m", "rag_lightning.train"]
    assert "-m" not in command[3:] and "--multirun" not in command
    assert command[3:5] == ["--config-name=train", "--config-dir=/extra/conf"]
    assert command[5:8] == ["experiment=tiny", "model.optim.lr=0.001", "hparams_search=optuna"]
    # run mode even where the config asks for a sweep (hparams_search=optuna sets hydra.mode=MULTIRUN)
    assert "hydra.mode=RUN" in command
    assert "hydra.run.dir='/runs/sweep 1/0'" in command and "hydra.sweep.dir='/runs/sweep 1'" in command
    assert "hydra.output_subdir=null" in command and "hydra.job.name=train_ddp_rank1" in command


def test_ddp_configs_use_the_hydra_aware_strategy() -> None:
    for trainer, backend in (("ddp", "nccl"), ("ddp_cpu", "gloo")):
        cfg = compose_train(f"trainer={trainer}")
        assert cfg.trainer.strategy._target_ == "rag_lightning.ddp.HydraDDPStrategy"
        assert cfg.trainer.strategy.process_group_backend == backend
        assert cfg.trainer.strategy.find_unused_parameters is True
    assert compose_train("trainer=ddp").trainer.precision == "bf16-mixed"


def test_optuna_search_space_composes() -> None:
    cfg = compose_train("hparams_search=optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(sweeper.params) == {"model.optim.lr", "model.n_docs", "model.label_smoothing"}
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/em"


def test_slurm_and_joblib_launchers_compose() -> None:
    cfg = compose_train(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.gpus_per_node=4",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    )
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node * cfg.hydra.launcher.nodes == cfg.trainer.devices * cfg.trainer.num_nodes
    assert ".submitit" in cfg.hydra.launcher.submitit_folder
    cfg = compose_train("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


# ------------------------------------------------------------------------------------------ real sweeps
def test_multirun_with_ddp_trains_each_job_once(tmp_path: Path, rag_train, tiny_overrides) -> None:
    rag_train(
        tmp_path,
        "-m",
        *tiny_overrides(tmp_path),
        "trainer=ddp_cpu",
        "logger=many",
        "model.optim.lr=0.001,0.002",
    )
    sweep = only_sweep(tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    runs = []
    for job, lr in zip(jobs, ("0.001", "0.002")):
        assert (job / "metrics.json").is_file()
        # each rank started once: rank 0 in the job process, rank 1 in one child, both in the job's directory
        assert len(re.findall(r"Initializing distributed: GLOBAL_RANK: 0,", (job / "train.log").read_text())) == 1
        assert len(re.findall(r"GLOBAL_RANK: 1,", (job / "train_ddp_rank1.log").read_text())) == 1
        assert len(list((job / "checkpoints").glob("*.ckpt"))) == 2
        wandb_cfg = yaml.safe_load((job / "config_resolved.yaml").read_text())["logger"]["wandb"]
        assert wandb_cfg["group"] == f"tiny-{sweep.name}" and wandb_cfg["name"] == f"tiny-{job.name}"
        assert f"model.optim.lr={lr}" in wandb_cfg["tags"] and "trainer=ddp_cpu" in wandb_cfg["tags"]
        job_runs = list((job / "wandb").glob("offline-run-*"))
        assert len(job_runs) == 1, job_runs  # rank 0 only
        runs += job_runs
        record = next(job_runs[0].glob("*.wandb")).read_bytes()
        assert f"tiny-{sweep.name}".encode() in record and f"model.optim.lr={lr}".encode() in record
    assert len(runs) == 2


def test_optuna_two_trials_in_parallel_with_joblib(tmp_path: Path, rag_train, tiny_overrides) -> None:
    """Two trials, each a rag-train job with its own sampled parameters; optuna reports the trial whose metric
    is best in the configured direction. The metric is val/loss (minimised): it differs between trials (the
    tiny model's val/em is 0 for both, and would not tell the best trial from the other)."""
    rag_train(
        tmp_path,
        "hparams_search=optuna",
        *tiny_overrides(tmp_path),
        "logger=csv",
        "optimized_metric=val/loss",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    sweep = only_sweep(tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    space = {"model.optim.lr", "model.n_docs", "model.label_smoothing"}
    assert set(results["best_params"]) == space
    trials = []
    for job in ("0", "1"):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text()))
        params = {key: yaml.safe_load(overrides[key]) for key in space}  # what the sampler gave this trial
        assert 1e-5 <= params["model.optim.lr"] <= 1e-3 and params["model.n_docs"] in (3, 5, 10)
        assert 0.0 <= params["model.label_smoothing"] <= 0.2
        resolved = yaml.safe_load((sweep / job / "config_resolved.yaml").read_text())["model"]
        assert (resolved["optim"]["lr"], resolved["n_docs"], resolved["label_smoothing"]) == (
            params["model.optim.lr"], params["model.n_docs"], params["model.label_smoothing"]
        )  # the trial trained with them
        trials.append((json.loads((sweep / job / "metrics.json").read_text())["val/loss"], params))
    assert trials[0][0] != trials[1][0], trials
    best_loss, best_params = min(trials, key=lambda t: t[0])
    assert results["best_value"] == pytest.approx(best_loss, rel=1e-6)
    assert results["best_params"] == pytest.approx(best_params, rel=1e-9)
