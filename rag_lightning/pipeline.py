"""Build the pieces of an experiment from a composed config, and run train / eval / predict.

This is where the composed Hydra config stops: :func:`sections` turns it into typed section configs once,
and everything below (data, models, retrieval) takes those or plain arguments. The Hydra entry points
(`train.py`, `eval.py`, `predict.py`, `index.py`) only compose a config and call these.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_lightning.config import (
    ConfigError,
    ContextConfig,
    DataConfig,
    IndexConfig,
    LoaderConfig,
    Mode,
    ModelConfig,
    PathsConfig,
    QuestionEncoderConfig,
    TaskConfig,
    check_context_training,
    check_corpus_size,
    check_trainer,
    section,
)
from rag_lightning.errors import AbortingError, UserError
from rag_lightning.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config_resolved.yaml"
# keys older runs saved that nothing reads any more (removed from the configs; dropped when a run is reloaded)
RETIRED_KEYS = ("model.question_encoder.max_length",)
# rag-eval / rag-predict: the index keys named on their command line (swap_index), kept in the run's config
NAMED_INDEX_KEY = "named_index_keys"
SWAP_INDEX_KEYS = ("store_dir", "vectors_dir", "dir")
# the config groups and keys that decide what rag-index builds (the rest of a run's overrides do not)
INDEX_OVERRIDE_PREFIXES = ("data", "index", "model/question_encoder", "model.question_encoder", "paths")


# ------------------------------------------------------------------------------------------ sections
@dataclass
class Sections:
    """The typed sections of a composed train / eval / predict config."""

    data: DataConfig
    model: ModelConfig
    index: IndexConfig
    context: ContextConfig
    loader: LoaderConfig
    paths: PathsConfig
    max_question_length: int
    max_answer_length: int
    # last, with a default: sections built by hand before tasks existed keep working
    task: TaskConfig = field(default_factory=TaskConfig)


def sections(cfg: DictConfig) -> Sections:
    """Every section of ``cfg`` typed and checked, before anything heavy starts."""
    for key in ("data", "model", "index", "loader", "paths"):
        if key not in cfg:
            raise ConfigError(f"config has no `{key}` section; compose from conf/train.yaml")
    out = Sections(
        data=section(DataConfig, cfg.data, "data"),
        model=section(ModelConfig, cfg.model, "model"),
        index=section(IndexConfig, cfg.index, "index"),
        context=section(ContextConfig, cfg.get("context") or {}, "context"),
        loader=section(LoaderConfig, cfg.loader, "loader"),
        paths=section(PathsConfig, cfg.paths, "paths"),
        max_question_length=int(cfg.max_question_length),
        max_answer_length=int(cfg.max_answer_length),
        task=section(TaskConfig, cfg.get("task") or {}, "task"),  # runs saved before tasks: qa
    )
    if out.task.generator_turns is not None and out.model.mode == Mode.closed_book:
        raise ConfigError(
            f"task.generator_turns={out.task.generator_turns} with model.mode=closed_book: with no passages the "
            "generator would not see what the dialogue refers to. Fix: task.generator_turns=null"
        )
    return out


def job_overrides(cfg: DictConfig) -> list[str]:
    """The overrides this job was started with (a resumed or evaluated run: the ones it was trained with)."""
    overrides = cfg.get("hydra_overrides")
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return [str(o) for o in overrides]


def rebuild_command(cfg: DictConfig) -> str:
    """The `rag-index` command that builds what this config retrieves from: the overrides of this job that
    concern the data, the index and the encoders (a resumed or evaluated run: the ones it was trained with)."""
    kept = [o for o in job_overrides(cfg) if o.lstrip("+~").startswith(INDEX_OVERRIDE_PREFIXES)]
    chosen = [
        f"data={cfg.data.name}",
        "index=hybrid" if cfg.index.get("hybrid") and cfg.index.type == "flat" else f"index={cfg.index.type}",
        f"model/question_encoder={cfg.model.question_encoder.kind}",
    ]
    groups = {o.split("=", 1)[0] for o in kept}
    return " ".join(["rag-index", *(c for c in chosen if c.split("=", 1)[0] not in groups), *kept])


# ------------------------------------------------------------------------------------------ pieces
def retrieval_spec(s: Sections, command: str, named: tuple[str, ...] = ()):
    from rag_lightning.retrieval.build import RetrievalSpec

    return RetrievalSpec(s.data, s.model.question_encoder, s.index, s.context, s.paths.cache_dir, command, named)


def build_module(s: Sections, generator_tokenizer: Any, retriever: Any) -> Any:
    from rag_lightning.data.tasks import build_task
    from rag_lightning.models.encoders import build_context_encoder, build_question_encoder, vector_width
    from rag_lightning.models.generator import build_generator
    from rag_lightning.models.module import RagModule

    question_encoder = build_question_encoder(s.model.question_encoder)
    return RagModule(
        question_encoder,
        build_generator(s.model.generator, generator_tokenizer, question_dim=vector_width(question_encoder)),
        s.model,
        generator_tokenizer=generator_tokenizer,
        retriever=retriever,
        predictions_dir=s.paths.output_dir,
        task=build_task(s.task, s.data.corpus_file),  # the corpus: factuality's gold passage texts
        context_encoder=build_context_encoder(s.model.question_encoder) if s.model.train_context_encoder else None,
    )


def context_training_callbacks(s: Sections) -> list:
    """The index refresh of a run that trains its context encoder (model.train_context_encoder), else none."""
    if not s.model.train_context_encoder:
        return []
    from rag_lightning.callbacks.index_refresh import IndexRefresh

    return [IndexRefresh(s.model.index_refresh_every_n_steps, Path(s.paths.output_dir) / "index", s.index)]


def build_datamodule(s: Sections, generator_tokenizer: Any) -> Any:
    from rag_lightning.data.datamodule import RagDataModule
    from rag_lightning.data.tasks import build_task
    from rag_lightning.models.encoders import load_encoder_tokenizer

    return RagDataModule(
        files={"train": s.data.train_file, "val": s.data.val_file, **s.data.test_files()},
        extra_train_files={name: path for name, path in s.data.extra_train_files.items() if path},
        question_tokenizer=load_encoder_tokenizer(s.model.question_encoder),
        generator_tokenizer=generator_tokenizer,
        global_batch_size=s.loader.global_batch_size,
        eval_batch_size=s.loader.eval_batch_size,
        num_workers=s.loader.num_workers,
        max_question_length=s.max_question_length,
        max_answer_length=s.max_answer_length,
        skip_bad_rows=s.data.skip_bad_rows,
        task=build_task(s.task),
        same_relation_swaps=s.model.answer_swap_prob > 0 and s.model.answer_swap_donors == "relation",
    )


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a callbacks/logger group (null entries are skipped)."""
    if not node:
        return []
    return [hydra.utils.instantiate(c) for c in node.values() if c is not None and "_target_" in c]


def build_trainer(trainer_cfg: DictConfig, callbacks: list, loggers: list, **overrides: Any) -> L.Trainer:
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, **overrides)


def setup(cfg: DictConfig) -> tuple[Sections, Any, Any]:
    """Everything a stage needs: the typed sections, the module (with its retriever) and the data module."""
    from rag_lightning.data.prepare_data import ensure_prepared
    from rag_lightning.models.generator import generator_tokenizer as load_generator_tokenizer

    s = sections(cfg)
    check_context_training(s.model, s.index)
    ensure_prepared(s.data)
    generator_tokenizer = load_generator_tokenizer(s.model.generator)
    retriever = None
    if s.model.retrieves:
        from rag_lightning.retrieval.build import open_retriever

        named = tuple(cfg.get(NAMED_INDEX_KEY) or ())
        retriever = open_retriever(retrieval_spec(s, rebuild_command(cfg), named), generator_tokenizer)
        check_corpus_size(s.model, len(retriever))
    return s, build_module(s, generator_tokenizer, retriever), build_datamodule(s, generator_tokenizer)


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """The fully resolved config of the run, with the job's overrides: what rag-eval and rag-predict
    rebuild the model from."""
    from hydra.core.hydra_config import HydraConfig

    container = OmegaConf.to_container(cfg, resolve=True)
    if HydraConfig.initialized() and "hydra_overrides" not in container:
        container["hydra_overrides"] = list(HydraConfig.get().overrides.task)
    path = Path(output_dir) / RESOLVED_CONFIG
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(container)))
    return path


@contextmanager
def cleaned_on_user_error(output_dir: str | Path) -> Iterator[None]:
    """A run that stops on bad input before writing anything leaves no run directory behind (Hydra makes it,
    and its `.hydra/` record, before the task starts); a directory with anything else in it is kept."""
    try:
        yield
    except (UserError, FileNotFoundError):
        out = Path(output_dir)
        if out.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


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


def name_mlflow_run(cfg: DictConfig) -> None:
    """`logger=mlflow`: a sweep's jobs under one experiment, each run named; the local store's directory made."""
    mlflow_cfg = (cfg.get("logger") or {}).get("mlflow")
    if not mlflow_cfg:
        return
    from rag_lightning.tracking import configure_mlflow

    base = str(cfg.get("experiment_name") or cfg.get("task_name") or "run")
    configure_mlflow(mlflow_cfg, base, Path(cfg.paths.output_dir), sweep_job())


def report_hint(output_dir: Path) -> str:
    """The rag-report command for this run (and, for a sweep's job, the one for its whole sweep)."""
    lines = [f"report: rag-report {output_dir}"]
    job = sweep_job()
    if job is not None:
        lines.append(f"report of the whole sweep (when its jobs are done): rag-report {job[0]}")
    return "\n".join(lines)


def wandb_unreachable(timeout: float = 3.0) -> str | None:
    """Why wandb could not sync live from here (no API key, or its server out of reach), or None."""
    import netrc
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            known = netrc.netrc().authenticators(host)
        except (OSError, netrc.NetrcParseError):
            known = None
        if not known:
            return f"no wandb API key (WANDB_API_KEY or `wandb login`) for {host}"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        return f"{host} cannot be reached ({err})"
    return None


def wandb_offline_unless_reachable(cfg: DictConfig) -> None:
    """`logger.wandb.offline=false` without an account or network goes on offline with a warning (wandb alone
    stops with a UsageError, or waits ~100 s and fails); the offline run can be synced later."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if not wandb_cfg or wandb_cfg.get("offline", True):
        return
    reason = wandb_unreachable()
    if reason:
        log.warning(
            "logger.wandb.offline=false but %s: logging offline instead; upload later with "
            "`wandb sync %s/wandb/offline-run-*`",
            reason,
            cfg.paths.output_dir,
        )
        wandb_cfg.offline = True


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
        with cleaned_on_user_error(output_dir):
            check_trainer(cfg.get("trainer"))
            if cfg.get("export") and cfg.get("export_rag"):
                from rag_lightning.export import check_rag_export

                check_rag_export(sections(cfg).model)
            s, module, datamodule = setup(cfg)
            ckpt_path = resolve_ckpt_path(cfg)
            if ckpt_path:
                check_checkpoint_fits(module, ckpt_path)
        group_sweep_runs(cfg)
        name_mlflow_run(cfg)
        wandb_offline_unless_reachable(cfg)
        save_resolved_config(cfg, output_dir)
        from rag_lightning.resume import atomic_checkpoint_io

        plugins = {} if cfg.trainer.get("plugins") else {"plugins": [atomic_checkpoint_io()]}
        callbacks = instantiate_all(cfg.get("callbacks")) + context_training_callbacks(s)
        trainer = build_trainer(cfg.trainer, callbacks, instantiate_all(cfg.get("logger")), **plugins)
        log_effective_batch(trainer, s.loader)
        if trainer.is_global_zero:
            from rag_lightning.tracking import log_overrides

            log_overrides(trainer.loggers, job_overrides(cfg))
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except RuntimeError as err:
            if trainer.world_size > 1 and peer_lost(err):
                raise RankLostError(
                    f"a DDP process of this job stopped ({str(err).splitlines()[0][:200]}): training stops here; the "
                    f"checkpoints written before are intact. Fix: see the ranks' logs ({output_dir}/*.log), then "
                    f"resume: rag-train run_dir={output_dir} ckpt_path=last"
                ) from err
            raise
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        best = best_checkpoint(trainer)
        splits = list(s.data.test_files()) if cfg.get("test") else []
        for split in splits:
            trainer.test(module, dataloaders=datamodule.test_loader(split), ckpt_path=best, weights_only=True)
            results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")})
        if cfg.get("export") and trainer.is_global_zero:
            if best and not splits:
                module.load_state_dict(load_state_dict(best))
            from rag_lightning.export import PlainRetrieval, export_run

            retrieval = PlainRetrieval(
                store_dir=str(Path(s.index.store_dir).resolve()),
                index_dir=str(Path(s.index.dir).resolve()),
                index_type=s.index.type,
                title_separator=s.index.title_separator,
                context_max_length=s.context.max_length,
                layout=s.context.layout,
            )
            export_dir = export_run(
                module,
                output_dir / "checkpoints" / "hf",
                data=s.data,
                model=s.model,
                max_question_length=s.max_question_length,
                metrics=results,
                overrides=job_overrides(cfg),
                run_dir=output_dir,
                steps=trainer.global_step,
                checkpoint=best,
                index_command=rebuild_command(cfg) if s.model.retrieves else None,
                rag=bool(cfg.get("export_rag")),
                retrieval=retrieval,
            )
            log.info("exported question encoder and generator, their tokenizers and a model card to %s", export_dir)
        results["time/total_s"] = round(time.time() - start, 1)
        if trainer.is_global_zero:
            from rag_lightning.tracking import log_run_files

            write_json_atomic(output_dir / "metrics.json", dict(sorted(results.items())))
            test_files = s.data.test_files()
            write_breakdown(
                output_dir, {sp: (output_dir / f"predictions_{sp}.jsonl", test_files[sp]) for sp in splits}
            )
            log_run_files(trainer.loggers, output_dir, {"time/total_s": results["time/total_s"]}, trainer.global_step)
            print_results(results, output_dir, splits, produced=_produced(output_dir))
            print(report_hint(output_dir))
        return results
    finally:
        finish_loggers()


class RankLostError(AbortingError, RuntimeError):
    """Another process of a DDP job died (killed, out of memory): this one stops instead of hanging."""


# what torch.distributed says when a peer's connection goes away (gloo) or a collective is aborted (NCCL)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker", "ProcessGroupNCCL")


def peer_lost(err: BaseException) -> bool:
    return any(marker in str(err) for marker in PEER_LOST)


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
    """Model weights from a Lightning checkpoint (load_checkpoint)."""
    return load_checkpoint(ckpt_path)["state_dict"]


def load_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint (weights and records), read without unpickling arbitrary objects; a truncated or
    corrupt file is a user error naming it and the run's other checkpoints."""
    from rag_lightning.resume import checkpoint_problem, others

    problem = checkpoint_problem(Path(ckpt_path))
    if problem:
        raise ConfigError(f"{problem}. Fix: use another checkpoint of the run (there: {others(Path(ckpt_path))})")
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)


def check_checkpoint_fits(module: Any, ckpt_path: str | Path) -> None:
    """A checkpoint to resume from must hold exactly the weights this config builds, shapes included;
    checked before anything is written into the run directory."""
    saved, own = load_state_dict(ckpt_path), module.state_dict()
    problems = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k, v in saved.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    problems += [f"{k}: only in the model" for k in sorted(set(own) - set(saved))]
    problems += [f"{k}: only in the checkpoint" for k in sorted(set(saved) - set(own))]
    if problems:
        shown = "\n  - ".join(problems[:8]) + (f"\n  ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ConfigError(
            f"{ckpt_path} does not fit the model this config builds:\n  - {shown}\nFix: resume with the run's "
            "own model settings (drop the overrides of model.* that change its shape)"
        )


def log_effective_batch(trainer: L.Trainer, loader: LoaderConfig) -> None:
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


BREAKDOWN_FILE = "metrics_by_relation.json"  # per test split, EM / F1 per relation (the QA rows' `relation`)
BREAKDOWN_FIELD = "relation"


def categories_of(qa_file: str | Path, field: str = BREAKDOWN_FIELD) -> dict[str, str]:
    """Question id -> its ``field`` (the world set's relation) from a JSONL QA file; empty for a file of
    another format or without the field."""
    path = Path(qa_file)
    if path.suffix != ".jsonl" or not path.is_file():
        return {}
    out = {}
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row and isinstance(row.get(field), str):
                out[str(row["id"])] = row[field]
    return out


def write_breakdown(output_dir: Path, splits: dict[str, tuple[Path, str | None]]) -> dict[str, Any]:
    """`metrics_by_relation.json`: for each test split (its predictions file, its QA file), the number of
    questions and the mean of each task metric per relation, written atomically; splits whose QA file has no
    `relation` are left out, and no file is written when none has one. Returns what it wrote."""
    from rag_lightning.config import TASK_METRICS
    from rag_lightning.metrics import scores_by_category

    out: dict[str, Any] = {}
    for split, (predictions, qa_file) in splits.items():
        category_of = categories_of(qa_file) if qa_file else {}
        if not category_of or not predictions.is_file():
            continue
        lines = predictions.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        table = scores_by_category(records, category_of, TASK_METRICS)
        if table:
            out[split] = table
    if out:
        write_json_atomic(output_dir / BREAKDOWN_FILE, out)
    return out


def _produced(output_dir: Path) -> list[str]:
    """What a run directory holds, for the closing line (only what is really there)."""
    names = ["metrics.json", BREAKDOWN_FILE, *sorted(p.name for p in output_dir.glob("predictions*.jsonl"))]
    if (output_dir / "checkpoints").is_dir():
        names.append("checkpoints/")
    return [n for n in names if (output_dir / n.rstrip("/")).exists()]


def print_results(results: dict[str, float], output_dir: Path, splits: list[str], produced: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = sorted({k.split("/", 1)[1] for k in results if k.split("/", 1)[0] in {"val", *splits}})
    columns = [n for n in ("em", "f1", "accuracy", "bleu", "rougeL", "rprec") if n in names]
    columns += [n for n in names if n.startswith("kilt_")]
    columns += sorted(n for n in names if n.startswith("recall@"))
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
    console.print(f"run directory: {output_dir}  ({', '.join(produced)})")


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
    for key in RETIRED_KEYS:  # runs saved before a key was retired still evaluate
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent)
        if node is not None and leaf in node:
            node.pop(leaf)
    given = _non_null(OmegaConf.to_container(overrides, resolve=True))
    return swap_index(cfg, OmegaConf.merge(cfg, given), sorted((given.get("index") or {}).keys()))


def swap_index(saved: DictConfig, cfg: DictConfig, named: list[str]) -> DictConfig:
    """The index hot-swap (the paper's §4.5): a trained run evaluated on another corpus gets that corpus's own
    store, vectors and index, so the run's are never rebuilt over.

    When ``data.corpus_file`` differs from the run's, every index directory not named in ``named`` is derived
    from the new ``data.name`` the way conf/index/common.yaml derives them (``<name>-<encoder>-...``); the ones
    named are used as given, and a store or index found there that was built for other inputs is refused
    (``retrieval.build.refuse_named``), not rebuilt.
    """
    old_corpus, new_corpus = saved.data.corpus_file, cfg.data.corpus_file
    swapped = Path(str(new_corpus)).resolve() != Path(str(old_corpus)).resolve()
    if swapped:
        old_name, new_name = str(saved.data.name), str(cfg.data.name)
        for key in SWAP_INDEX_KEYS:
            if key in named:
                continue
            old_dir = Path(str(saved.index[key]))
            if new_name == old_name:
                raise ConfigError(
                    f"data.corpus_file={new_corpus} is not the corpus this run was trained with ({old_corpus}); "
                    f"its store and index need directories of their own, so the run's in {old_dir.parent.parent} "
                    "are not rebuilt over. Fix: give the new corpus a name, data.name=<name> (index.store_dir, "
                    "index.vectors_dir and index.dir are derived from it), or name index.store_dir, "
                    "index.vectors_dir and index.dir yourself"
                )
            if not old_dir.name.startswith(f"{old_name}-"):
                raise ConfigError(
                    f"data.corpus_file={new_corpus} swaps the run's corpus, but the run's index.{key}={old_dir} "
                    f"is not named after its data.name ({old_name}), so no directory can be derived for the new "
                    f"corpus. Fix: pass index.{key}=<a new directory> (and the other index directories)"
                )
            cfg.index[key] = str(old_dir.with_name(new_name + old_dir.name[len(old_name):]))
        log.info(
            "index hot-swap: corpus %s (was %s), store %s, index %s",
            new_corpus,
            old_corpus,
            cfg.index.store_dir,
            cfg.index.dir,
        )
        if saved.index.get("bm25_dir") and "bm25_dir" not in named:  # hybrid: derived beside the new index.dir
            cfg.index.bm25_dir = ""
    cfg[NAMED_INDEX_KEY] = [k for k in named if k in ("store_dir", "dir", "bm25_dir")]
    return cfg


def call_overrides(cfg: DictConfig, *keys: str) -> DictConfig:
    """The sections of a rag-eval / rag-predict call that override the run's, resolved against the call's own
    config (a `data=<option>` brings interpolations such as ${paths.cache_dir})."""
    return OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys if cfg.get(k) is not None})


def _non_null(node: Any) -> Any:
    """What a call sets: values that are neither null nor ``???`` (eval.yaml's "the run's own")."""
    if isinstance(node, dict):
        return {k: _non_null(v) for k, v in node.items() if v is not None and v != "???" and _non_null(v) != {}}
    return node


def load_trained(run_cfg: DictConfig, ckpt_path: str, output_dir: str) -> tuple[Any, Any]:
    """Module and data module of a trained run, weights from `ckpt_path`."""
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = output_dir
    checkpoint = load_checkpoint(ckpt_path)  # a damaged checkpoint stops before the index is opened
    s, module, datamodule = setup(run_cfg)
    module.check_tokenizer(checkpoint, str(ckpt_path))
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    if module.context_encoder is not None:  # trained: search an index of the checkpoint's context encoder
        from rag_lightning.retrieval.refresh import use_matching

        run_dir = Path(ckpt_path).resolve().parent.parent
        roots = [run_dir / "index", run_dir / "index_test", Path(output_dir) / "index"]
        use_matching(module.retriever, module.context_encoder, roots, s.index, 0)
    return module, datamodule


def eval_trainer(run_cfg: DictConfig, accelerator: str, output_dir: str | Path, **extra: Any) -> L.Trainer:
    """A one-device trainer from the run's own trainer config (its precision and limits), without its
    strategy, loggers or checkpointing."""
    return build_trainer(
        run_cfg.trainer,
        callbacks=[],
        loggers=[],
        accelerator=accelerator,
        devices=1,
        num_nodes=1,
        strategy="auto",
        default_root_dir=str(output_dir),
        enable_checkpointing=False,
        **extra,
    )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on any QA file: metrics.json and predictions.jsonl in this run's directory."""
    output_dir = Path(cfg.paths.output_dir)
    with cleaned_on_user_error(output_dir):
        run_cfg = run_config(cfg.ckpt_path, call_overrides(cfg, "data", "model", "task", "index"))
        module, datamodule = load_trained(run_cfg, cfg.ckpt_path, str(output_dir))
        split = cfg.split_name
        from rag_lightning.data.prepare_data import world_test_file

        run_data = section(DataConfig, run_cfg.data, "data")
        qa_file = cfg.data.get("test_file") or world_test_file(run_data, split)
        loader = datamodule.test_loader(split, qa_file)
    trainer = eval_trainer(run_cfg, cfg.accelerator, output_dir)
    trainer.test(module, dataloaders=loader)
    results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    write_json_atomic(output_dir / "metrics.json", dict(sorted(results.items())))
    produced = output_dir / f"predictions_{split}.jsonl"
    write_breakdown(output_dir, {split: (produced, qa_file or datamodule.files.get(split))})
    if produced.exists():
        produced.replace(output_dir / "predictions.jsonl")
    print_results(results, output_dir, [split], produced=_produced(output_dir))
    return results


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """No device banners, tips or warnings from Lightning: rag-predict prints the answer and its passages."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def predict(cfg: DictConfig) -> list[dict]:
    """Answer questions from the command line, with the passages used."""
    asked = cfg.question
    questions = [] if asked is None else [str(q) for q in asked] if OmegaConf.is_list(asked) else [str(asked)]
    if not questions or not all(q.strip() for q in questions):
        raise ConfigError(
            f"question={asked!r}: no question to answer (empty or blank). Fix: pass question=\"What is ...?\" "
            "or a list, question=\"[first question?,second question?]\""
        )
    output_dir = Path(cfg.paths.output_dir)
    with cleaned_on_user_error(output_dir):
        run_cfg = run_config(cfg.ckpt_path, call_overrides(cfg, "model", "data", "index"))
        module, datamodule = load_trained(run_cfg, cfg.ckpt_path, str(output_dir))
    with quiet_lightning():
        trainer = eval_trainer(run_cfg, cfg.accelerator, output_dir, enable_progress_bar=False, enable_model_summary=False)
        records = [r for batch in trainer.predict(module, dataloaders=datamodule.predict_loader(questions)) for r in batch]
    write_text_atomic(output_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for r in records:
        print(f"Q: {r['question']}\nA: {r['prediction']}")
        for p in r.get("passages", []):
            print(f"  [{p['p']:.3f}] {p['id']} {p['title']}: {p['text'][:120]}")
    return records


def index(cfg: DictConfig) -> dict[str, str]:
    """rag-index's work: the data prepared, then the corpus store and the FAISS index built or checked;
    returns what they hold (retrieval.build.describe)."""
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
    from rag_lightning.data.prepare_data import ensure_prepared
    from rag_lightning.retrieval.build import RetrievalSpec, describe, ensure_index

    data = section(DataConfig, cfg.data, "data")
    encoder = section(QuestionEncoderConfig, cfg.model.question_encoder, "model.question_encoder")
    index_cfg = section(IndexConfig, cfg.index, "index")
    paths = section(PathsConfig, cfg.paths, "paths")
    ensure_prepared(data)
    if data.generator_tokenizer is None:
        raise ConfigError(
            "data.generator_tokenizer is null: rag-index tokenises the corpus for the generator; point it at a "
            "tokenizer directory (rag-train builds the index with its generator's own tokenizer instead)"
        )
    spec = RetrievalSpec(data, encoder, index_cfg, ContextConfig(), paths.cache_dir, rebuild_command(cfg))
    store, index_dir, _ = ensure_index(spec, load_generator_tokenizer(data.generator_tokenizer), full_check=True)
    described = describe(store.dir, index_dir)
    if index_cfg.hybrid:  # index=hybrid: the BM25 index beside the dense one
        from rag_lightning.retrieval.build import bm25_dir

        bm25 = describe(store.dir, bm25_dir(spec))
        described["hybrid"] = (f"dense + {bm25['index']} ngram={index_cfg.bm25_ngram} "
                               f"min_word_chars={index_cfg.bm25_min_word_chars} whole_numbers={index_cfg.bm25_whole_numbers} "
                               f"adjacent_pairs={index_cfg.bm25_adjacent_pairs}, "
                               f"weight {index_cfg.hybrid_bm25_weight} "
                               f"(norm {index_cfg.hybrid_bm25_norm}), {index_cfg.hybrid_candidates} candidates each")
        described["bm25 dir"] = bm25["index dir"]
    return described
