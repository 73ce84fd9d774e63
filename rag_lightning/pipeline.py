"""Build the pieces of an experiment from a composed config, and run train / eval / predict.

The Hydra entry points (`train.py`, `eval.py`, `predict.py`) only compose a config and call these.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from rag_lightning.config import ConfigError, Mode, ModelConfig, dataloader_config, validate

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config_resolved.yaml"


# ------------------------------------------------------------------------------------------ pieces
def build_retriever(cfg: DictConfig):
    """Corpus store + FAISS index (built or checked by ensure_index) behind the Retriever API; under DDP the
    ranks search their shards of the index (or each the whole one), as ``index.distributed`` says."""
    from rag_lightning.retrieval.distributed import open_distributed_retriever

    return open_distributed_retriever(cfg)


def build_module(cfg: DictConfig, model_cfg: ModelConfig, generator_tokenizer, retriever) -> Any:
    from rag_lightning.models.encoders import build_question_encoder
    from rag_lightning.models.generator import build_generator
    from rag_lightning.models.module import RagModule

    question_encoder = build_question_encoder(cfg.model.question_encoder)
    generator = build_generator(cfg.model.generator, generator_tokenizer)
    return RagModule(
        question_encoder,
        generator,
        model_cfg,
        generator_tokenizer=generator_tokenizer,
        retriever=retriever,
        predictions_dir=cfg.paths.output_dir,
    )


def build_datamodule(cfg: DictConfig, generator_tokenizer) -> Any:
    from rag_lightning.data.datamodule import RagDataModule
    from rag_lightning.models.encoders import load_encoder_tokenizer

    loader = dataloader_config(cfg)
    return RagDataModule(
        train_file=cfg.data.get("train_file"),
        val_file=cfg.data.get("val_file"),
        test_files=test_files(cfg),
        question_tokenizer=load_encoder_tokenizer(cfg.model.question_encoder),
        generator_tokenizer=generator_tokenizer,
        global_batch_size=loader.global_batch_size,
        eval_batch_size=loader.eval_batch_size,
        num_workers=loader.num_workers,
        max_question_length=cfg.max_question_length,
        max_answer_length=cfg.max_answer_length,
        skip_bad_rows=cfg.data.get("skip_bad_rows", False),
    )


def test_files(cfg: DictConfig) -> dict[str, str]:
    files = {}
    if cfg.data.get("test_file"):
        files["test"] = cfg.data.test_file
    for name, path in (cfg.data.get("extra_test_files") or {}).items():
        if path:
            files[name] = path
    return files


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a callbacks/logger group (null entries are skipped)."""
    if not node:
        return []
    return [hydra.utils.instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def prepare_inputs(cfg: DictConfig) -> None:
    """Build the data set when it is ours to build (the world set), else check the files exist."""
    from rag_lightning.data.prepare_data import ensure_prepared

    ensure_prepared(cfg.data)


def setup(cfg: DictConfig):
    """Everything a stage needs: typed model config, tokenizer, retriever, module, data module."""
    from rag_lightning.models.generator import load_generator_tokenizer_for

    model_cfg = validate(cfg)
    prepare_inputs(cfg)
    generator_tokenizer = load_generator_tokenizer_for(cfg.model.generator)
    retriever = None
    if model_cfg.mode != Mode.closed_book:
        retriever = build_retriever(cfg)
        validate(cfg, corpus_size=len(retriever.store))
    module = build_module(cfg, model_cfg, generator_tokenizer, retriever)
    datamodule = build_datamodule(cfg, generator_tokenizer)
    return model_cfg, module, datamodule


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """The fully resolved config of the run: what rag-eval and rag-predict rebuild the model from."""
    path = Path(output_dir) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(container), path)
    return path


def sweep_job() -> tuple[Path, str, list[str]] | None:
    """(sweep directory, job id, job overrides) when this Hydra job belongs to a sweep, else None.

    A job belongs to a sweep when its output directory lies inside ``hydra.sweep.dir``: true for every job of
    ``-m`` and for its DDP children, which get the sweep's directory on their command line (rag_lightning/ddp.py).
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    output_dir, sweep_dir = Path(hc.runtime.output_dir).resolve(), Path(str(hc.sweep.dir)).resolve()
    if output_dir == sweep_dir or not output_dir.is_relative_to(sweep_dir):
        return None
    return sweep_dir, str(output_dir.relative_to(sweep_dir)), list(hc.overrides.task)


def group_sweep_runs(cfg: DictConfig) -> None:
    """One wandb group per sweep (``<group>-<sweep dir name>``), each job's run named ``<group>-<job id>`` and
    tagged with the job's overrides; a single run keeps the configured name and group."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    job = sweep_job()
    if not wandb_cfg or job is None:
        return
    sweep_dir, job_id, overrides = job
    base = str(wandb_cfg.get("group") or cfg.get("task_name") or "sweep")
    wandb_cfg.group = f"{base}-{sweep_dir.name}"
    wandb_cfg.name = f"{base}-{job_id}"
    wandb_cfg.tags = [*(wandb_cfg.get("tags") or []), *(o[:64] for o in overrides)]  # wandb's tag limit: 64


def finish_loggers() -> None:
    """Close the wandb run whatever happened, so one failed job does not spoil a sweep."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish()


# ------------------------------------------------------------------------------------------ train
def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint on every test split, export, write metrics.json."""
    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    try:
        model_cfg, module, datamodule = setup(cfg)
        ckpt_path = resolve_ckpt_path(cfg)
        group_sweep_runs(cfg)
        save_resolved_config(cfg, output_dir)
        trainer = build_trainer(cfg, instantiate_all(cfg.get("callbacks")), instantiate_all(cfg.get("logger")))
        log_effective_batch(trainer, cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        best = best_checkpoint(trainer)
        if cfg.get("test"):
            for split in test_files(cfg):
                module.eval_split = split
                datamodule.test_split = split
                trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
                results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")})
        if cfg.get("export") and trainer.is_global_zero:
            if best and not cfg.get("test"):
                module.load_state_dict(load_state_dict(best))
            export_dir = module.export_pretrained(output_dir / "checkpoints" / "hf")
            log.info("exported question encoder and generator to %s", export_dir)
        results["time/total_s"] = round(time.time() - start, 1)
        if trainer.is_global_zero:
            write_metrics(results, output_dir / "metrics.json")
            print_results(results, output_dir, list(test_files(cfg)) if cfg.get("test") else [])
        return results
    finally:
        finish_loggers()


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, ""):
        return None
    if ckpt == "last":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"ckpt_path=last: no {last}. To resume a run, also pass run_dir=<that run's directory> "
                "(e.g. run_dir=outputs/runs/train/2026-01-01_12-00-00)"
            )
        return str(last)
    if not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt}: no such checkpoint file")
    return str(ckpt)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    return cb.best_model_path or cb.last_model_path or None


def load_state_dict(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a Lightning checkpoint, read without unpickling arbitrary objects."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def log_effective_batch(trainer: L.Trainer, cfg: DictConfig) -> None:
    loader = dataloader_config(cfg)
    effective = loader.global_batch_size * trainer.accumulate_grad_batches
    per_device = loader.global_batch_size // max(trainer.world_size, 1)
    log.info(
        "batch: %d per device x %d devices x %d accumulation = %d examples per optimizer step",
        per_device,
        trainer.world_size,
        trainer.accumulate_grad_batches,
        effective,
    )
    for logger in trainer.loggers:
        logger.log_hyperparams({"effective_batch_size": effective, "per_device_batch_size": per_device})


def write_metrics(results: dict[str, float], path: Path) -> None:
    path.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n", encoding="utf-8")


def print_results(results: dict[str, float], output_dir: Path, splits: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = sorted({k.split("/", 1)[1] for k in results if k.split("/", 1)[0] in {"val", *splits}})
    columns = [n for n in ("em", "f1") if n in names] + sorted(n for n in names if n.startswith("recall@"))
    columns += [n for n in ("mrr", "loss") if n in names]
    table = Table(title="results")
    table.add_column("split")
    for c in columns:
        table.add_column(c, justify="right")
    for split in dict.fromkeys(["val", *splits]):
        if any(f"{split}/{c}" in results for c in columns):
            table.add_row(split, *(f"{results[f'{split}/{c}']:.4f}" if f"{split}/{c}" in results else "-" for c in columns))
    console = Console()
    console.print(table)
    console.print(f"run directory: {output_dir}  (metrics.json, predictions_*.jsonl, checkpoints/)")


# ------------------------------------------------------------------------------------------ eval / predict
def run_config(ckpt_path: str | Path, overrides: DictConfig) -> DictConfig:
    """The resolved config of the run that wrote `ckpt_path`, with this call's non-null values on top."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    run_dir = ckpt_path.resolve().parent.parent
    saved = run_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: ckpt_path must be a checkpoint inside a rag-train run directory")
    cfg = OmegaConf.load(saved)
    OmegaConf.set_struct(cfg, False)
    cfg = OmegaConf.merge(cfg, _non_null(OmegaConf.to_container(overrides, resolve=True)))
    return cfg


def _non_null(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _non_null(v) for k, v in node.items() if v is not None and _non_null(v) != {}}
    return node


def load_trained(cfg: DictConfig, ckpt_path: str, output_dir: str):
    """Module and data module of a trained run, weights from `ckpt_path`."""
    cfg.paths.output_dir = output_dir
    _, module, datamodule = setup(cfg)
    module.load_state_dict(load_state_dict(ckpt_path))
    module.eval()
    return module, datamodule


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on any QA file: metrics.json and predictions.jsonl in this run's directory."""
    output_dir = Path(cfg.paths.output_dir)
    run_cfg = run_config(cfg.ckpt_path, OmegaConf.create({"data": cfg.data, "model": cfg.model}))
    run_cfg.test = True
    module, datamodule = load_trained(run_cfg, cfg.ckpt_path, str(output_dir))
    split = cfg.split_name
    if cfg.data.get("test_file"):
        datamodule.files[split] = cfg.data.test_file
    module.eval_split = datamodule.test_split = split
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False)
    trainer.test(module, datamodule=datamodule)
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    write_metrics(results, output_dir / "metrics.json")
    produced = output_dir / f"predictions_{split}.jsonl"
    if produced.exists():
        produced.replace(output_dir / "predictions.jsonl")
    print_results(results, output_dir, [split])
    return results


def predict(cfg: DictConfig) -> list[dict]:
    """Answer questions from the command line, with the passages used."""
    from rag_lightning.data.readers import QAExample

    asked = cfg.question
    questions = [] if asked is None else [str(q) for q in asked] if OmegaConf.is_list(asked) else [str(asked)]
    if not questions or not all(q.strip() for q in questions):
        raise ConfigError(
            f"question={asked!r}: no question to answer (empty or blank). Fix: pass question=\"What is ...?\" "
            "or a list, question=\"[first question?,second question?]\""
        )
    run_cfg = run_config(cfg.ckpt_path, OmegaConf.create({"model": cfg.model}))
    module, datamodule = load_trained(run_cfg, cfg.ckpt_path, cfg.paths.output_dir)
    datamodule.predict_examples = [QAExample(f"q{i}", q, [], []) for i, q in enumerate(questions)]
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=False)
    records = [r for batch in trainer.predict(module, datamodule=datamodule) for r in batch]
    out = Path(cfg.paths.output_dir) / "predictions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    for r in records:
        print(f"Q: {r['question']}\nA: {r['answer']}")
        for p in r.get("passages", []):
            print(f"  [{p['p']:.3f}] {p['id']} {p['title']}: {p['text'][:120]}")
    return records
