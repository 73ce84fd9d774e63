"""Every root config and experiment composes, and the offline wandb run records the logged metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.pipeline import sections

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=False)


# experiments that fine-tune a trained model name it (`???`): the value a user passes
REQUIRED = {name: ["model.generator.name_or_path=/runs/main/checkpoints/hf/generator"]
            for name in ("world_fever", "world_fever_closed_book")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = _compose("train", f"experiment={experiment}", "paths.output_dir=/tmp/x", *REQUIRED.get(experiment, []))
    model = sections(cfg).model
    assert cfg.experiment_name == experiment
    assert OmegaConf.select(cfg, "trainer._target_") == "lightning.pytorch.Trainer"
    assert model.n_docs > 0


@pytest.mark.parametrize("experiment", sorted(REQUIRED))
def test_an_experiment_without_its_required_model_names_the_key(experiment):
    from rag_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.generator\.name_or_path is required .* Fix: pass model\.generator"):
        sections(_compose("train", f"experiment={experiment}", "paths.output_dir=/tmp/x"))


def test_experiments_set_what_they_claim():
    assert _compose("train").experiment_name == "world_rag_token"  # the main job
    assert _compose("train", "experiment=world_rag_sequence").model.mode == "rag_sequence"
    assert _compose("train", "experiment=world_closed_book").model.mode == "closed_book"
    assert _compose("train", "experiment=world_frozen_retriever").model.freeze_question_encoder is True
    # a command-line override beats the experiment
    assert _compose("train", "experiment=world_rag_sequence", "model=rag_token").model.mode == "rag_token"
    # the main job searches dense + BM25; dialogue's generator reads the newest turn, its closed book the history
    assert _compose("train").index.hybrid is True and _compose("train", "index=flat").index.hybrid is False
    assert sections(_compose("train", "experiment=world_dialogue", "paths.output_dir=/tmp/x")).task.generator_turns == 1
    closed = _compose("train", "experiment=world_dialogue_closed_book", "paths.output_dir=/tmp/x")
    assert sections(closed).task.generator_turns is None


def test_a_closed_book_dialogue_that_hides_the_history_is_refused():
    from rag_lightning.config import ConfigError

    cfg = _compose("train", "experiment=world_dialogue_closed_book", "task.generator_turns=1", "paths.output_dir=/tmp/x")
    with pytest.raises(ConfigError, match=r"task.generator_turns=1 with model.mode=closed_book.*Fix: task.generator_turns=null"):
        sections(cfg)


@pytest.mark.parametrize("name", ["train", "eval", "predict", "prepare", "index"])
def test_root_configs_compose(name):
    overrides = {"eval": ["ckpt_path=x"], "predict": ["ckpt_path=x", "question=q"]}.get(name, [])
    cfg = _compose(name, *overrides)
    assert cfg.task_name == name


@pytest.mark.parametrize(
    ("group", "key", "value"),
    [
        ("trainer=ddp", "trainer.strategy._target_", "rag_lightning.ddp.HydraDDPStrategy"),
        ("trainer=gpu", "trainer.accelerator", "gpu"),
        ("trainer=ddp_cpu", "trainer.strategy.process_group_backend", "gloo"),
        ("logger=all", "logger.tensorboard._target_", "lightning.pytorch.loggers.TensorBoardLogger"),
        ("index=hnsw", "index.type", "hnsw"),
        ("index=ivfpq", "index.type", "ivfpq"),
        ("index=hybrid", "index.hybrid", True),
        ("model/generator=bart_base", "model.generator.name_or_path", "facebook/bart-base"),
        ("callbacks=with_early_stopping", "callbacks.early_stopping._target_", "lightning.pytorch.callbacks.EarlyStopping"),
        ("debug=limit", "trainer.max_steps", 20),
        ("model/question_encoder=dpr_nq", "model.question_encoder.kind", "dpr"),
    ],
)
def test_config_group_options_compose(group, key, value):
    cfg = _compose("train", group, "paths.output_dir=/tmp/x")
    sections(cfg)  # typed and checked
    assert OmegaConf.select(cfg, key) == value


def test_each_trained_retriever_gets_its_own_vectors_and_index(tmp_path):
    """Two DPR stages' encoders (a sweep, a hot-swap per seed) keep an index each instead of rebuilding one."""
    def dirs(export: Path, *more: str) -> tuple[str, str, str]:
        cfg = _compose("train", "model/question_encoder=path", f"paths.cache_dir={tmp_path}",
                       f"model.question_encoder.question_name_or_path={export}/question_encoder",
                       f"model.question_encoder.context_name_or_path={export}/context_encoder", *more)
        return cfg.index.store_dir, cfg.index.vectors_dir, cfg.index.dir

    first, second = dirs(tmp_path / "dpr_s1"), dirs(tmp_path / "dpr_s2")
    assert first[0] == second[0] == f"{tmp_path}/stores/world-path-ctx256"  # one tokenised store for both
    assert first[1] != second[1] and first[2] != second[2]
    assert Path(first[2]).name.startswith("world-path-") and Path(first[2]).name.endswith("-flat")
    assert dirs(tmp_path / "dpr_s1") == first  # the same encoders find the same index again
    plain = _compose("train", f"paths.cache_dir={tmp_path}")
    assert (plain.index.vectors_dir, plain.index.dir) == (f"{tmp_path}/vectors/world-minilm", f"{tmp_path}/indexes/world-minilm-flat")


def test_wandb_offline_run_holds_logged_metrics(tmp_path, tiny_train_config):
    from rag_lightning.pipeline import train

    cfg = tiny_train_config(tmp_path, "logger=wandb", "trainer.max_epochs=1", "export=false")
    results = train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = ("val/em", "test/em", "test/recall@1", "train/loss")
    # wandb's service process writes the run file; on a loaded machine its last records can land a moment after
    # finish() returns (one CI run read only the file's header), so wait up to 30 s for them
    deadline = time.monotonic() + 30
    data = next(runs[0].glob("*.wandb")).read_bytes()
    while not all(key.encode() in data for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
        data = next(runs[0].glob("*.wandb")).read_bytes()
    for key in keys:
        assert key.encode() in data
    assert "test/em" in results
    import wandb

    assert wandb.run is None  # finished, so the next job of a sweep starts a fresh run


@pytest.mark.parametrize(("experiment", "bank"), [("world_dpr", True), ("world_dpr_fixed_passages", False)])
def test_dpr_experiments_compose_under_the_retriever_stage(experiment: str, bank: bool) -> None:
    from rag_lightning.config import RetrieverTrainingConfig, section

    cfg = _compose("train_retriever", f"experiment={experiment}", "paths.output_dir=/tmp/x", "paths.cache_dir=/c")
    dpr = section(RetrieverTrainingConfig, cfg.dpr, "dpr")
    assert (dpr.corpus_negatives and dpr.train_context_encoder) is bank  # the passage bank, or fixed passages
    assert cfg.export_dir == "/c/encoders/world_dpr"  # both where world_rag_token_dpr looks
