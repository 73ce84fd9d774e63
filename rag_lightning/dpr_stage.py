"""rag-train-retriever's work: the DPR stage from a composed config (conf/train_retriever.yaml).

Data prepared, corpus store and BM25 index ensured, positives and hard negatives mined for the train
questions, the encoders trained with DPR's loss, measured on the held-out questions against the whole corpus
(re-encoded once after training; once more before it with ``dpr.validate_first``), then both exported with
save_pretrained into ``export_dir``, atomically. The composed config stops here, as in pipeline.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from rag_lightning.config import (
    ConfigError,
    ContextConfig,
    DataConfig,
    IndexConfig,
    PathsConfig,
    QuestionEncoderConfig,
    RetrieverTrainingConfig,
    section,
)
from rag_lightning.files import write_json_atomic
from rag_lightning.pipeline import (
    build_trainer,
    cleaned_on_user_error,
    instantiate_all,
    rebuild_command,
    resolve_ckpt_path,
    save_resolved_config,
)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "dpr_export.json"


def _pieces(cfg: DictConfig) -> dict[str, Any]:
    """Everything the stage needs, built from the typed sections before any training starts."""
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
    from rag_lightning.data.prepare_data import ensure_prepared
    from rag_lightning.data.readers import read_qa
    from rag_lightning.models.dpr import DPRModule
    from rag_lightning.models.encoders import (
        build_context_encoder,
        build_question_encoder,
        load_encoder_tokenizer,
    )
    from rag_lightning.models.rag_checkpoint import context_encoder_like
    from rag_lightning.retrieval.bm25 import BM25Index
    from rag_lightning.retrieval.build import RetrievalSpec, ensure_index
    from rag_lightning.retrieval.dpr_data import (
        corpus_loader,
        dense_candidates,
        interleave,
        mine_split,
        train_dataset,
        train_loader,
        val_loader,
    )

    data = section(DataConfig, cfg.data, "data")
    encoder = section(QuestionEncoderConfig, cfg.model.question_encoder, "model.question_encoder")
    index_cfg = section(IndexConfig, cfg.index, "index")
    dpr = section(RetrieverTrainingConfig, cfg.dpr, "dpr")
    paths = section(PathsConfig, cfg.paths, "paths")
    if index_cfg.type != "bm25":
        raise ConfigError(f"index={index_cfg.type}: rag-train-retriever mines with BM25, run it with index=bm25")
    if not data.train_file:
        raise ConfigError("data.train_file is null: rag-train-retriever needs train questions")
    ensure_prepared(data)
    if data.generator_tokenizer is None:
        raise ConfigError("data.generator_tokenizer is null: the corpus store is tokenised for the generator too; "
                          "point it at a tokenizer directory")
    spec = RetrievalSpec(data, encoder, index_cfg, ContextConfig(), paths.cache_dir, rebuild_command(cfg))
    store, index_dir, expect = ensure_index(spec, load_generator_tokenizer(data.generator_tokenizer))
    bm25 = BM25Index.load(index_dir, expect=expect, rebuild_command=spec.rebuild_command)

    tokenizer = load_encoder_tokenizer(encoder, "question")
    ctx_pad = int(load_encoder_tokenizer(encoder, "context").pad_token_id or 0)
    q_pad = int(tokenizer.pad_token_id or 0)
    max_q = int(cfg.max_question_length)
    question_encoder = build_question_encoder(encoder)
    context_encoder = None if dpr.shared_encoder else build_context_encoder(encoder)
    passage_vectors = None
    if not dpr.train_context_encoder or dpr.negatives != "bm25":  # the starting context encoder's vectors
        passage_vectors = fixed_passage_vectors(context_encoder or context_encoder_like(question_encoder), store, index_cfg)
    bank, bank_s = None, 0.0
    if dpr.corpus_negatives and dpr.train_context_encoder:
        bank, bank_s = passage_bank(context_encoder, store, dpr, index_cfg)

    start = time.time()
    train_examples = read_qa(data.train_file, skip_bad_rows=data.skip_bad_rows)
    candidates = None
    if dpr.negatives != "bm25":
        questions_text = [e.question for e in train_examples]
        candidates = dense_candidates(question_encoder, tokenizer, questions_text, passage_vectors,
                                      depth=dpr.mining_depth, max_question_length=max_q,
                                      batch_size=dpr.eval_batch_size)
        if dpr.negatives == "mixed":
            candidates = interleave(candidates, bm25.search_texts(questions_text, min(dpr.mining_depth, len(bm25)))[1].tolist())
    mined, report = mine_split(data.train_file, train_examples, bm25, store, n_negatives=dpr.hard_negatives,
                               depth=dpr.mining_depth, negative_candidates=candidates)
    log.info("mined %d train examples (%s negatives) in %.1fs: %s", len(mined), dpr.negatives,
             time.time() - start, report)
    train = train_loader(train_dataset(mined, tokenizer, max_q), store, dpr.batch_size, (q_pad, ctx_pad),
                         passage_tokens=dpr.train_context_encoder and bank is None)
    val, val_counts = None, {}
    if data.val_file:
        val_examples = read_qa(data.val_file, skip_bad_rows=data.skip_bad_rows)
        questions, val_counts = val_loader(data.val_file, val_examples, store, tokenizer, max_question_length=max_q,
                                           batch_size=dpr.eval_batch_size, pad_id=q_pad)
        # a trained context encoder re-encodes the whole corpus at each validation; a fixed one has its vectors,
        # a bank refreshes them from its states
        encode_corpus = dpr.train_context_encoder and bank is None
        val = [corpus_loader(store, dpr.eval_batch_size, ctx_pad), questions] if encode_corpus else [questions]
    module = DPRModule(question_encoder, context_encoder, dpr,
                       None if dpr.train_context_encoder else passage_vectors, bank=bank)
    counts = {
        "mining/examples": report.examples,
        "mining/gold_positives": report.gold_positives,
        "mining/bm25_positives": report.bm25_positives,
        "mining/skipped": report.skipped,
        "mining/short_negatives": report.short_negatives,
        **{f"val/{k}": v for k, v in val_counts.items()},
        **({"time/bank_states_s": round(bank_s, 1)} if bank is not None else {}),
    }
    return {"module": module, "train": train, "val": val, "tokenizer": tokenizer, "dpr": dpr, "counts": counts,
            "encoder": encoder}


def fixed_passage_vectors(context_encoder: Any, store: Any, index_cfg: IndexConfig) -> Any:
    """The fixed context encoder's vectors of every passage: the cached ones of ``index.vectors_dir`` (shared with
    the dense index of the same encoder) when they match its weights, else encoded now (resumable)."""
    import numpy as np
    import torch

    from rag_lightning.retrieval.build import encode_device
    from rag_lightning.retrieval.encode import encode_passages

    start = time.time()
    vectors = encode_passages(context_encoder, store, index_cfg.vectors_dir, batch_size=index_cfg.batch_size,
                              shard_size=index_cfg.shard_size, device=encode_device(index_cfg),
                              progress=index_cfg.progress)
    log.info("passage vectors of the fixed context encoder ready in %.1fs", time.time() - start)
    return torch.from_numpy(np.array(vectors, dtype=np.float32))


def passage_bank(context_encoder: Any, store: Any, dpr: RetrieverTrainingConfig, index_cfg: IndexConfig) -> Any:
    """The states every passage's vector is refreshed from (``dpr.bank``), and the seconds they took."""
    from rag_lightning.models.encoder_split import n_layers
    from rag_lightning.models.encoders import encoder_pad_id
    from rag_lightning.models.passage_bank import PassageBank
    from rag_lightning.retrieval.build import encode_device

    depth = n_layers(context_encoder)
    if dpr.bank.layers > depth:
        raise ConfigError(f"dpr.bank.layers={dpr.bank.layers}: the context encoder has {depth} layers; "
                          f"train at most all of them (dpr.bank.layers<={depth})")
    start = time.time()
    context_encoder.to(encode_device(index_cfg))
    bank = PassageBank.build(context_encoder, [store.ctx_tokens(r) for r in range(len(store))], dpr.bank.layers,
                             encoder_pad_id(context_encoder), batch_size=dpr.eval_batch_size,
                             progress=index_cfg.progress).to("cpu")
    context_encoder.cpu()  # Lightning places the module
    log.info("passage bank: states of %d passages below the top %d context layer(s) in %.1fs (%.2f GB)",
             len(bank), dpr.bank.layers, time.time() - start, bank.states.numel() * 4 / 1e9)
    return bank, time.time() - start


def save_last_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """last.ckpt at the end of training too (the callback writes it every N steps), renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # optimizer and loops too: a resume continues from it
    if trainer.is_global_zero:
        os.replace(tmp, path)


def export_atomically(module: Any, tokenizer: Any, export_dir: Path, manifest: dict[str, Any]) -> Path:
    """Both encoders and a manifest written into a temporary sibling, then renamed into ``export_dir``: a
    killed export leaves the previous encoders (or nothing), never half of new ones."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = export_dir.with_name(f".{export_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        module.export_encoders(tmp, tokenizer)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = export_dir.with_name(f".{export_dir.name}.old-{os.getpid()}")
    if export_dir.exists():
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)
    return export_dir


def train_retriever(cfg: DictConfig) -> dict[str, float]:
    """Mine, train, validate on the whole corpus, export; returns the metrics (also in metrics.json)."""
    from rag_lightning.models.encoders import encoder_fingerprint, encoder_name

    start = time.time()
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    with cleaned_on_user_error(output_dir):
        p = _pieces(cfg)
        ckpt_path = resolve_ckpt_path(cfg)
    save_resolved_config(cfg, output_dir)
    module, dpr = p["module"], p["dpr"]
    results: dict[str, float] = {k: float(v) for k, v in p["counts"].items()}
    trainer = build_trainer(cfg.trainer, instantiate_all(cfg.get("callbacks")), instantiate_all(cfg.get("logger")))
    if trainer.world_size > 1 and p["val"] is not None:
        # Lightning would split the corpus loader over the ranks, and each rank would rank against its part
        log.warning("validation on the whole corpus runs in one process: skipped under %d processes; "
                    "measure the exported encoders with a one-process run (trainer.max_steps=0)", trainer.world_size)
        p["val"] = None
    if dpr.validate_first and p["val"] is not None:
        t = time.time()
        trainer.validate(module, dataloaders=p["val"])
        results.update({f"start/{k[4:]}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        results["time/validate_first_s"] = round(time.time() - t, 1)
    t = time.time()
    trainer.fit(module, train_dataloaders=p["train"], ckpt_path=ckpt_path, weights_only=True)
    results["time/fit_s"] = round(time.time() - t, 1)
    if module.bank is not None:
        results["time/bank_refresh_s"] = round(module.bank_refresh_s, 1)
    save_last_checkpoint(trainer, output_dir / "checkpoints" / "last.ckpt")
    results["train/steps"] = float(trainer.global_step)
    if p["val"] is not None:
        t = time.time()
        trainer.validate(module, dataloaders=p["val"])
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        results["time/validate_s"] = round(time.time() - t, 1)
    export_dir = Path(str(cfg.export_dir))
    if trainer.is_global_zero:
        manifest = {
            "started_from": encoder_name(p["encoder"], "question"),
            "shared_encoder": dpr.shared_encoder,
            "steps": trainer.global_step,
            "metrics": results,
            "dpr": json.loads(json.dumps(asdict(dpr), default=str)),
            "run_dir": str(output_dir),
            "question_encoder_fingerprint": encoder_fingerprint(module.question_encoder),
        }
        export_atomically(module, p["tokenizer"], export_dir, manifest)
        results["time/total_s"] = round(time.time() - start, 1)
        write_json_atomic(output_dir / "metrics.json", dict(sorted(results.items())))
        print_summary(results, export_dir, output_dir)
    return results


def print_summary(results: dict[str, float], export_dir: Path, output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DPR stage: held-out questions against the whole corpus")
    for column in ("", "recall@1", *sorted((k.split("/")[1] for k in results if k.startswith("val/recall@")
                                            and k != "val/recall@1"), key=lambda n: int(n.split("@")[1])), "mrr"):
        table.add_column(column, justify="right")
    names = [c.header for c in table.columns][1:]
    for label, prefix in (("before", "start/"), ("after", "val/")):
        if f"{prefix}mrr" in results:
            table.add_row(label, *(f"{results.get(prefix + n, float('nan')):.4f}" for n in names))
    console = Console()
    console.print(table)
    console.print(f"encoders: {export_dir} (question_encoder/, context_encoder/)  run directory: {output_dir}")
    console.print(
        "use them: rag-train model/question_encoder=path "
        f"model.question_encoder.question_name_or_path={export_dir}/question_encoder "
        f"model.question_encoder.context_name_or_path={export_dir}/context_encoder"
    )
