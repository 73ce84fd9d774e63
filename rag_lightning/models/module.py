"""RagModule: wires the question encoder, the retriever and the generator to the pure RAG functions.

The math lives in `marginalize.py` and `decoding.py`; this module only moves tensors between them,
logs, and sets up optimisation.  The retriever (FAISS index + corpus store) is attached, not owned:
it is not a parameter and never enters a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from rag_lightning import metrics
from rag_lightning.config import ConfigError, Mode, ModelConfig
from rag_lightning.data.gen_tokenizer import vocabulary_fingerprint
from rag_lightning.data.tasks import Task
from rag_lightning.errors import UserError
from rag_lightning.files import write_text_atomic
from rag_lightning.models.augment import drop_question_words, swap_answers
from rag_lightning.models.decoding import rag_sequence_generate, rag_token_generate
from rag_lightning.models.encoder_split import encode_bottom, encode_top, freeze_bottom
from rag_lightning.models.encoders import encode_texts, encoder_pad_id
from rag_lightning.models.marginalize import closed_book_nll, rag_sequence_nll, rag_token_nll
from rag_lightning.models.word_completion import WordPieces


def with_specials(ids: torch.Tensor, mask: torch.Tensor, bos: int, eos: int, pad: int):
    """`<s> ids </s>` per row, right-padded: the closed-book generator's input."""
    lengths = mask.sum(dim=1)
    out = torch.full((ids.shape[0], ids.shape[1] + 2), pad, dtype=ids.dtype, device=ids.device)
    out[:, 0] = bos
    out[:, 1 : ids.shape[1] + 1] = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    out[torch.arange(ids.shape[0], device=ids.device), lengths + 1] = eos
    mask = torch.arange(out.shape[1], device=ids.device)[None, :] <= lengths[:, None] + 1
    return out, mask.long()


def contrastive_loss(
    question_vectors: torch.Tensor, passage_vectors: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Mean over questions of -log of the softmax mass (over all M passages) on the question's positives.

    question_vectors (B, d), passage_vectors (M, d), positives (B, M) bool: which passages count as positive
    for each question (every question needs one); all others are its negatives.
    """
    log_p = torch.log_softmax((question_vectors @ passage_vectors.T).float(), dim=-1)
    return -torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=-1).mean()


def contrastive_retrieval_loss(
    question_vectors: torch.Tensor, gold_vectors: torch.Tensor, gold_rows: torch.Tensor
) -> torch.Tensor:
    """DPR's in-batch negative loss on the examples that name a gold passage.

    question_vectors (B, d) and gold_vectors (B, d) pair each question with its gold passage; questions
    that share a gold passage count every copy as positive (gold_rows (B,) are their corpus rows).
    """
    return contrastive_loss(question_vectors, gold_vectors, gold_rows[:, None] == gold_rows[None, :])


log = logging.getLogger(__name__)

class NonFiniteLossError(UserError, ArithmeticError):
    """The training loss became nan or inf: training stops, naming the step, with the checkpoints kept."""


TOKENIZER_KEY = "generator_tokenizer_sha256"  # in every checkpoint: the vocabulary its weights were trained with


class RagModule(L.LightningModule):
    def __init__(
        self,
        question_encoder: nn.Module,
        generator: nn.Module,
        config: ModelConfig,
        *,
        generator_tokenizer: Any,
        retriever: Any = None,
        predictions_dir: str | None = None,
        sample_table_size: int = 8,
        task: Task | None = None,
        context_encoder: nn.Module | None = None,
    ) -> None:
        """``context_encoder``: the passage encoder trained with ``config.train_context_encoder`` (None else)."""
        super().__init__()
        self.question_encoder = question_encoder
        if config.train_context_encoder and context_encoder is None:
            raise ValueError("model.train_context_encoder=true needs the context encoder (pipeline.build_module)")
        self.context_encoder = context_encoder if config.train_context_encoder else None
        self.generator = generator
        self.cfg = config
        self.task = task or Task()  # scores the outputs; the module only computes losses and generates
        self._outputs: dict[str, tuple[list[str], list[list[str]]]] = {}  # per split, for corpus-level metrics
        self.tokenizer = generator_tokenizer
        self._pieces: WordPieces | None = None  # the vocabulary's word classes, built on first use
        self._warned_start_at_word = False  # decoding.start_at_word skipped for this tokenizer: said once
        self.retriever = retriever
        self.predictions_dir = predictions_dir
        self.sample_table_size = sample_table_size
        self.val_samples: list[dict] = []
        self._predictions: dict[str, list[dict]] = {}  # per test split, written at the end of the test
        self._frozen_vectors: dict[str, torch.Tensor] = {}
        self._bottom_states: dict[str, torch.Tensor] = {}  # per question, when only top layers train
        for encoder in (question_encoder, self.context_encoder):
            if encoder is not None and config.question_encoder_trainable_layers is not None:
                _freeze_question_encoder_bottom(encoder, config.question_encoder_trainable_layers)
        self.pad_id = generator_tokenizer.pad_token_id
        self.bos_id = generator_tokenizer.bos_token_id
        self.eos_id = generator_tokenizer.eos_token_id
        if config.gradient_checkpointing:
            generator.gradient_checkpointing_enable()
            question_encoder.gradient_checkpointing_enable()
            if self.context_encoder is not None:
                self.context_encoder.gradient_checkpointing_enable()
        self.train()  # pretrained weights arrive in eval mode
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": json.loads(json.dumps(asdict(config), default=str))})

    # ---------------------------------------------------------------- pieces of a step
    @property
    def mode(self) -> Mode:
        return Mode(self.cfg.mode)

    @property
    def sparse_retrieval(self) -> bool:
        """BM25 (`index=bm25`): passages are found and scored from the question text; the question encoder is
        unused and never trained."""
        return bool(getattr(self.retriever, "sparse", False))

    def question_encoder_frozen(self) -> bool:
        return (
            self.cfg.freeze_question_encoder
            or self.sparse_retrieval
            or self.global_step < self.cfg.question_encoder_warmup_steps
        )

    def encode_questions(self, batch: dict) -> torch.Tensor:
        """Question vectors (B, d); differentiable unless the encoder is frozen.

        A frozen encoder runs without dropout and its vectors are cached per question text, so a frozen
        retriever (the ablation, or the warm-up phase) costs one encoder pass per distinct question.
        """
        if not self.question_encoder_frozen():
            self._frozen_vectors.clear()  # the encoder is training now: cached vectors are stale
            if self.cfg.question_encoder_trainable_layers is not None:
                return self._encode_top_layers(batch)
            out = self.question_encoder(
                input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
            )
            return out.pooler_output
        missing = [i for i, q in enumerate(batch["questions"]) if q not in self._frozen_vectors]
        if missing:
            was_training = self.question_encoder.training
            self.question_encoder.eval()
            with torch.no_grad():
                vectors = self.question_encoder(
                    input_ids=batch["question_input_ids"][missing],
                    attention_mask=batch["question_attention_mask"][missing],
                ).pooler_output
            self.question_encoder.train(was_training)
            for i, v in zip(missing, vectors):
                self._frozen_vectors[batch["questions"][i]] = v
        return torch.stack([self._frozen_vectors[q] for q in batch["questions"]])

    def _encode_top_layers(self, batch: dict) -> torch.Tensor:
        """Vectors through the trainable top layers, from bottom states cached per question text."""
        n_top = self.cfg.question_encoder_trainable_layers
        ids, mask = batch["question_input_ids"], batch["question_attention_mask"]
        missing = [i for i, q in enumerate(batch["questions"]) if q not in self._bottom_states]
        if missing:
            states = encode_bottom(self.question_encoder, ids[missing], mask[missing], n_top)
            for i, row in zip(missing, states):
                self._bottom_states[batch["questions"][i]] = row[: int(mask[i].sum())].clone()
        rows = [self._bottom_states[q] for q in batch["questions"]]
        states = rows[0].new_zeros(len(rows), ids.shape[1], rows[0].shape[-1])
        for i, row in enumerate(rows):
            states[i, : row.shape[0]] = row
        return encode_top(self.question_encoder, states, mask, n_top)

    def retrieve(self, batch: dict, n_docs: int) -> dict:
        """Top-k passages, their scores (differentiable w.r.t. the question encoder) and the contexts."""
        if self.retriever is None:
            raise RuntimeError(
                f"RagModule in mode {self.mode.value} needs a retriever; build the module with "
                "rag_lightning.pipeline.build_module, which attaches one"
            )
        if self.sparse_retrieval:
            found = self.retriever.retrieve_texts(batch["questions"], n_docs)
            if self.training and self.global_step < self.cfg.gold_passage_steps:
                found = self.retriever.with_gold(found, batch["gold_passage_ids"], None, batch["questions"])
            return self._contexts(batch, found, None, found.scores.to(batch["question_input_ids"].device))
        # retrieval stays float32 under mixed precision: the index was built from float32 vectors
        with torch.autocast(batch["question_input_ids"].device.type, enabled=False):
            q = self.encode_questions(batch)
            found = self.retriever.retrieve(q.detach(), n_docs, questions=batch.get("questions"))
            if self.training and self.global_step < self.cfg.gold_passage_steps:
                found = self.retriever.with_gold(found, batch["gold_passage_ids"], q, batch.get("questions"))
            vectors = self.passage_vectors(found.rows, found.vectors)
            doc_scores = torch.einsum("bd,bkd->bk", q, vectors.to(device=q.device, dtype=q.dtype))
            lexical = getattr(found, "lexical", None)  # hybrid retrieval: + w * BM25, a constant
            if lexical is not None:
                doc_scores = doc_scores + lexical.to(device=q.device, dtype=q.dtype)
        return self._contexts(batch, found, q, doc_scores)

    def passage_vectors(self, rows: torch.Tensor, index_vectors: torch.Tensor) -> torch.Tensor:
        """(B, k, d) vectors of the retrieved ``rows``: re-encoded by the context encoder while it trains (so
        the doc scores carry its gradient), else the index's ``index_vectors``."""
        if self.context_encoder is None or self.question_encoder_frozen():
            return index_vectors
        ids, mask = self.retriever.passage_inputs(rows, encoder_pad_id(self.context_encoder))
        device = next(self.context_encoder.parameters()).device
        return encode_texts(self.context_encoder, ids.to(device), mask.to(device)).reshape(*rows.shape, -1)

    def _contexts(self, batch: dict, found: Any, q: torch.Tensor | None, doc_scores: torch.Tensor) -> dict:
        """The retrieval result of a batch with the generator's contexts (q is None for sparse retrieval)."""
        lengths = batch["question_generator_mask"].sum(dim=1).tolist()
        question_ids = [row[:n].tolist() for row, n in zip(batch["question_generator_ids"], lengths)]
        if self.training and self.cfg.question_word_dropout > 0:  # the generator's copy only, never in eval
            mask_id = getattr(self.tokenizer, "mask_token_id", None)
            question_ids = drop_question_words(question_ids, prob=self.cfg.question_word_dropout, mask_id=mask_id)
        ctx_ids, ctx_mask = self.retriever.build_contexts(question_ids, found.rows)
        view = None
        if self.cfg.generator.question_view:  # read, not trained: the retriever learns from doc scores only
            vectors = q if q is not None else self.encode_questions(batch)
            view = vectors.detach().repeat_interleave(found.rows.shape[1], dim=0).to(doc_scores.device)
        return {
            "question_vectors": q,
            "question_view": view,
            "rows": found.rows,
            "passage_ids": found.passage_ids,
            "doc_scores": doc_scores,
            "context_input_ids": ctx_ids.to(doc_scores.device),
            "context_attention_mask": ctx_mask.to(doc_scores.device),
        }

    def nll(self, batch: dict, n_docs: int, reduction: str) -> tuple[torch.Tensor, dict | None]:
        labels, dec_in = batch["labels"], batch["decoder_input_ids"]
        if self.mode == Mode.closed_book:
            return self.target_nll(batch, None, labels, dec_in, reduction), None
        ret = self.retrieve(batch, n_docs)
        if self.training and self.cfg.answer_swap_prob > 0:
            ids, mask, labels, dec_in = swap_answers(
                ret["context_input_ids"],
                labels,
                n_docs=n_docs,
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                decoder_start_id=int(dec_in[0, 0]),
                prob=self.cfg.answer_swap_prob,
                donor_answers=batch.get("swap_answers"),
                max_length=self.retriever.max_context_length,
                cut_tail=self.retriever.layout == "question_first",
            )
            device = ret["context_input_ids"].device
            ret["context_input_ids"], ret["context_attention_mask"] = ids.to(device), mask.to(device)
            labels, dec_in = labels.to(device), dec_in.to(device)
        return self.target_nll(batch, ret, labels, dec_in, reduction), ret

    def target_nll(
        self,
        batch: dict,
        ret: dict | None,
        labels: torch.Tensor,
        dec_in: torch.Tensor,
        reduction: str,
        label_smoothing: float | None = None,
    ) -> torch.Tensor:
        """The mode's NLL of ``labels`` given the batch's inputs and (unless closed book) the retrieved ``ret``."""
        smoothing = self.cfg.label_smoothing if label_smoothing is None else label_smoothing
        common = {"pad_token_id": self.pad_id, "label_smoothing": smoothing}
        if ret is None:
            ids, mask = with_specials(
                batch["question_generator_ids"], batch["question_generator_mask"], self.bos_id, self.eos_id, self.pad_id
            )
            logits = self.generator(
                input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, use_cache=False
            ).logits
            return closed_book_nll(logits, labels, reduction=reduction, **common)
        n_docs = ret["doc_scores"].shape[1]
        logits = self.generator(
            input_ids=ret["context_input_ids"],
            attention_mask=ret["context_attention_mask"],
            decoder_input_ids=dec_in.repeat_interleave(n_docs, dim=0),
            use_cache=False,  # a training forward needs no KV cache
            **_view(ret),
        ).logits
        if self.mode == Mode.rag_token:
            return rag_token_nll(logits, ret["doc_scores"], labels, reduction=reduction, **common)
        return rag_sequence_nll(
            logits,
            ret["doc_scores"],
            labels,
            exclude_bos_score=self.cfg.exclude_bos_score,
            bos_token_id=self.bos_id,
            reduction=reduction,
            **common,
        )

    def candidate_nll(self, batch: dict, ret: dict | None, candidates: list[list[int]]) -> torch.Tensor:
        """(B, C): the NLL of each candidate output (token ids ending in </s>) for every example, with the
        passages already retrieved: decoding restricted to a set (a verification task's labels)."""
        batch_size = batch["question_generator_ids"].shape[0]
        device = batch["question_generator_ids"].device
        out = []
        for ids in candidates:
            labels = torch.tensor(ids, device=device).expand(batch_size, -1)
            dec_in = torch.cat([torch.full_like(labels[:, :1], self.eos_id), labels[:, :-1]], dim=1)
            out.append(self.target_nll(batch, ret, labels, dec_in, "none", label_smoothing=0.0))
        return torch.stack(out, dim=1)

    def retrieval_loss(self, batch: dict, ret: dict) -> torch.Tensor | None:
        """The multi-task term: the retriever's contrastive loss of the questions that name a gold passage.

        The passages are the batch's first gold passages (in-batch negatives for the other questions) and
        every passage retrieved for the batch (hard negatives by construction); a question's positives are
        those among them that are its gold passages (any of its gold ids). None when no question has a gold
        passage in this corpus."""
        golds = [{r for r in self.retriever.rows_of(list(gold)) if r is not None} for gold in batch["gold_passage_ids"]]
        firsts = self.retriever.rows_of([gold[0] if gold else "" for gold in batch["gold_passage_ids"]])
        keep = [i for i, row in enumerate(firsts) if row is not None]  # a gold id outside this corpus: no positive
        if not keep:
            return None
        columns = list(dict.fromkeys([firsts[i] for i in keep] + [int(r) for r in ret["rows"].reshape(-1).tolist()]))
        q = ret["question_vectors"][keep]
        positives = torch.tensor([[c in golds[i] for c in columns] for i in keep], device=q.device)
        vectors = self.retriever.vectors(columns).to(q.device, q.dtype)
        return contrastive_loss(q, vectors, positives)

    # ---------------------------------------------------------------- Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = batch["labels"].shape[0]
        nll, ret = self.nll(batch, self.cfg.n_docs, self.cfg.loss_reduction)
        loss = nll
        self.log("train/nll", nll, batch_size=batch_size)
        if ret is not None:
            if self.cfg.retrieval_loss_weight > 0 and not self.question_encoder_frozen():
                r_loss = self.retrieval_loss(batch, ret)
                if r_loss is not None:
                    loss = loss + self.cfg.retrieval_loss_weight * r_loss
                    self.log("train/retrieval_loss", r_loss, batch_size=batch_size)
            self.log("train/doc_entropy", metrics.doc_entropy(ret["doc_scores"].detach()).mean(), batch_size=batch_size)
            self.log("train/distinct_passages", metrics.distinct_share(ret["rows"]), batch_size=batch_size)
            self.log("train/question_encoder_frozen", float(self.question_encoder_frozen()), batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if not math.isfinite(float(loss.detach())):  # one host sync per step: cheap next to the step itself
            raise NonFiniteLossError(self._non_finite_message(float(loss.detach()), batch_idx))
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Non-finite gradients stop training before they reach the weights (and so any checkpoint)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not math.isfinite(float(torch.stack(torch._foreach_norm(grads)).sum())):
            raise NonFiniteLossError(self._non_finite_message("the gradients are not finite", None))

    def _non_finite_message(self, what: str | float, batch_idx: int | None) -> str:
        what = what if isinstance(what, str) else f"the training loss is {what}"
        where = f"step {self.global_step} (epoch {self.current_epoch}" + (f", batch {batch_idx})" if batch_idx is not None else ")")
        trainer = self._trainer
        callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        found = sorted(Path(callback.dirpath).glob("*.ckpt")) if callback is not None and callback.dirpath else []
        kept = f"; the checkpoints written before are intact: {', '.join(str(c) for c in found)}" if found else ""
        return (
            f"{what} at {where}: training stops here and this step's update was not applied{kept}. Fix: lower "
            f"model.optim.lr (now {self.cfg.optim.lr}), keep trainer.gradient_clip_val set, or look for a bad row "
            "in the data"
        )

    def _word_pieces(self) -> WordPieces:
        """The generator vocabulary's word classes, for ``decoding.complete_copied_words`` (built once)."""
        if self._pieces is None:
            self._pieces = WordPieces.from_tokenizer(self.tokenizer)
        return self._pieces

    def _answer_start(self) -> WordPieces | None:
        """The vocabulary's space-led pieces, for ``decoding.start_at_word``; None (with a warning, once) for a
        tokenizer that puts no space before a text (BART's own), whose answers may begin without one: the main
        job keeps working when a user swaps in a pretrained generator."""
        pieces = self._word_pieces()
        if pieces.prefix_space:
            return pieces
        if not self._warned_start_at_word:
            self._warned_start_at_word = True
            log.warning("model.decoding.start_at_word=true is skipped: the generator tokenizer puts no space before "
                        "a text, so an answer may begin with a piece that has none. Set "
                        "model.decoding.start_at_word=false to silence this")
        return None

    def generate(self, batch: dict, ret: dict | None) -> tuple[torch.Tensor, int]:
        """Answer token ids (B, L) with the mode's decoder."""
        dec = self.cfg.decoding
        if self.mode == Mode.closed_book:
            ids, mask = with_specials(
                batch["question_generator_ids"], batch["question_generator_mask"], self.bos_id, self.eos_id, self.pad_id
            )
            return self.generator.generate(
                input_ids=ids,
                attention_mask=mask,
                num_beams=dec.num_beams,
                max_new_tokens=dec.max_new_tokens,
                no_repeat_ngram_size=dec.no_repeat_ngram_size,
                decoder_start_token_id=self.eos_id,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                do_sample=False,
            )
        args = (self.generator, ret["context_input_ids"], ret["context_attention_mask"], ret["doc_scores"])
        n_docs = ret["doc_scores"].shape[1]
        pieces = self._word_pieces() if dec.complete_copied_words else None
        start = self._answer_start() if dec.start_at_word else None
        if self.mode == Mode.rag_token:
            return rag_token_generate(
                *args, n_docs=n_docs, num_beams=dec.num_beams, max_new_tokens=dec.max_new_tokens, word_pieces=pieces,
                start_at_word=start, no_repeat_ngram_size=dec.no_repeat_ngram_size, **_view(ret),
            )  # fmt: skip
        return rag_sequence_generate(
            *args,
            **_view(ret),
            no_repeat_ngram_size=dec.no_repeat_ngram_size,
            n_docs=n_docs,
            num_beams=dec.num_beams,
            max_new_tokens=dec.max_new_tokens,
            word_pieces=pieces,
            start_at_word=start,
            mode=dec.sequence_mode.value if hasattr(dec.sequence_mode, "value") else dec.sequence_mode,
        )

    def _evaluate(self, batch: dict, prefix: str) -> list[dict]:
        """Loss, answers and metrics of a batch with gold answers, logged under ``prefix``; its records."""
        n_docs = self.cfg.eval_docs
        batch_size = batch["labels"].shape[0]
        nll, ret = self.nll(batch, n_docs, "mean")
        self.log(f"{prefix}/loss", nll, batch_size=batch_size, sync_dist=True)
        preds = self.answer(batch, ret)
        scores = self.task.scores(
            preds, batch["answers"], inputs=batch["questions"], gold_passage_ids=batch["gold_passage_ids"]
        )
        for name, values in scores.items():
            known = [v for v in values if v is not None]  # factuality: None where an output states no fact
            if known:
                self.log(
                    f"{prefix}/{name}",
                    torch.tensor(known).mean(),
                    batch_size=len(known),
                    sync_dist=True,
                    prog_bar=name == self.task.primary,
                )
        if self.task.needs_corpus_scores:
            kept = self._outputs.setdefault(prefix, ([], []))
            kept[0].extend(preds)
            kept[1].extend(batch["answers"])
        records = self.records(batch, preds, ret)
        if ret is not None:
            texts = [[p["text"] for p in r["passages"]] for r in records]
            hits = metrics.retrieval_hits(ret["passage_ids"], texts, batch["gold_passage_ids"], batch["answers"])
            for k in sorted({1, n_docs}):
                self.log(f"{prefix}/recall@{k}", metrics.recall_at_k(hits, k).mean(), batch_size=batch_size, sync_dist=True)
            self.log(f"{prefix}/mrr", metrics.reciprocal_rank(hits).mean(), batch_size=batch_size, sync_dist=True)
            self.log(f"{prefix}/doc_entropy", metrics.doc_entropy(ret["doc_scores"]).mean(), batch_size=batch_size, sync_dist=True)
            self.log(f"{prefix}/distinct_passages", metrics.distinct_share(ret["rows"]), batch_size=batch_size, sync_dist=True)
            provenance = batch.get("provenance") or [[] for _ in preds]
            kilt = self.task.provenance_scores(ret["passage_ids"], provenance, scores, sorted({1, n_docs}))
            for name, values in kilt.items():
                known = [v for v in values if v is not None]
                self.log(f"{prefix}/{name}", torch.tensor(known).mean(), batch_size=len(known), sync_dist=True)
            scores = {**scores, **kilt}
        for i, (record, answers) in enumerate(zip(records, batch["answers"])):
            record.update(answers=answers, **{n: v[i] for n, v in scores.items() if v[i] is not None})
        return records

    def _log_corpus_scores(self, prefix: str) -> None:
        """Split-level metrics (BLEU) from the outputs the split's batches kept."""
        preds, answers = self._outputs.pop(prefix, ([], []))
        if preds:
            for name, value in self.task.corpus_scores(preds, answers).items():
                self.log(f"{prefix}/{name}", value, batch_size=len(preds))

    def answer(self, batch: dict, ret: dict | None) -> list[str]:
        """Decoded answers of a batch, with the mode's decoder; or the likeliest of the task's candidates."""
        candidates = self.task.candidates()
        if candidates:
            ids = [self.tokenizer(" " + c, add_special_tokens=False)["input_ids"] + [self.eos_id] for c in candidates]
            best = self.candidate_nll(batch, ret, ids).argmin(dim=1).tolist()
            return [candidates[i] for i in best]
        generated = self.generate(batch, ret)
        return [p.strip() for p in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def records(self, batch: dict, preds: list[str], ret: dict | None) -> list[dict]:
        """One record per question (test predictions and rag-predict alike): the answer and the passages read,
        each with its score and p(z|x)."""
        out = []
        for i, pred in enumerate(preds):
            record: dict = {"id": batch["ids"][i], "question": batch["questions"][i], "prediction": pred}
            if ret is not None:
                scores = ret["doc_scores"][i].float()
                probs = torch.softmax(scores, dim=-1).tolist()
                record["passages"] = [
                    {"id": p.id, "title": p.title, "text": p.text, "score": round(s, 5), "p": round(q, 5)}
                    for p, s, q in zip(self.retriever.passages(ret["rows"][i].tolist()), scores.tolist(), probs)
                ]
            out.append(record)
        return out

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = self._evaluate(batch, "val")
        if len(self.val_samples) < self.sample_table_size:
            self.val_samples.extend(records[: self.sample_table_size - len(self.val_samples)])

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Metrics under the batch's split name (``test``, ``test_seen``, ...: the data module names it)."""
        split = batch["split"]
        self._predictions.setdefault(split, []).extend(self._evaluate(batch, split))

    def on_validation_epoch_start(self) -> None:
        self.val_samples = []

    def on_validation_epoch_end(self) -> None:
        self._log_corpus_scores("val")

    def on_test_epoch_start(self) -> None:
        self._predictions = {}
        self._outputs = {}

    def on_test_epoch_end(self) -> None:
        for split in list(self._outputs):
            self._log_corpus_scores(split)
        if self.predictions_dir is None:
            return
        for split, records in sorted(self._predictions.items()):
            if self.trainer.world_size > 1:
                gathered: list[list[dict]] = [None] * self.trainer.world_size  # type: ignore[list-item]
                torch.distributed.all_gather_object(gathered, records)
                records = [r for part in gathered for r in part]
            if self.trainer.is_global_zero:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                write_text_atomic(Path(self.predictions_dir) / f"predictions_{split}.jsonl", text)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        ret = self.retrieve(batch, self.cfg.eval_docs) if self.mode != Mode.closed_book else None
        return self.records(batch, self.answer(batch, ret), ret)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which generator vocabulary the weights were trained with (see check_tokenizer)."""
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = vocabulary_fingerprint(self.tokenizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_tokenizer(checkpoint, "the checkpoint to resume from")

    def check_tokenizer(self, checkpoint: dict[str, Any], what: str) -> None:
        """Weights trained with one generator vocabulary read garbage through another of the same size (a data
        set rebuilt with other templates trains another tokenizer): refuse instead of answering wrongly.
        Checkpoints written before the record existed are not checked."""
        recorded = checkpoint.get(TOKENIZER_KEY)
        if recorded is None or self.tokenizer is None:
            return
        if recorded != vocabulary_fingerprint(self.tokenizer):
            raise ConfigError(
                f"{what} was trained with another generator tokenizer than this run loads (its vocabulary differs: "
                "the data set was rebuilt since, e.g. by a rag_lightning version whose world format changed the "
                "training questions). Fix: evaluate or resume with the data the run was trained on (the "
                "rag_lightning version and data options of its config_resolved.yaml), or train again"
            )

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = _lr_lambda(self.cfg.optim.scheduler, self.cfg.optim.warmup_steps, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over what trains (``model.optim``); freezes the retriever's side where it does not train."""
        opt = self.cfg.optim
        groups = _param_groups(self.generator, opt.lr, opt.weight_decay)
        trains_question_encoder = not self.cfg.freeze_question_encoder and not self.sparse_retrieval
        if trains_question_encoder and self.mode != Mode.closed_book and opt.question_encoder_lr > 0:
            groups += _param_groups(self.question_encoder, opt.question_encoder_lr, opt.weight_decay)
            if self.context_encoder is not None:  # the retriever's two sides learn at one rate
                groups += _param_groups(self.context_encoder, opt.question_encoder_lr, opt.weight_decay)
        else:
            self.question_encoder.requires_grad_(False)
            if self.context_encoder is not None:
                self.context_encoder.requires_grad_(False)
        precision = str(getattr(self._trainer, "precision", "32-true"))  # no trainer: a direct call
        fused = _use_fused(opt.fused, groups, precision)
        return torch.optim.AdamW(groups, betas=tuple(opt.betas), eps=opt.eps, fused=fused)

    # ---------------------------------------------------------------- export
    def export_pretrained(self, directory: str | Path, question_tokenizer: Any = None) -> Path:
        """Save question encoder and generator with save_pretrained (safetensors), each with its tokenizer:
        the generator's, and ``question_tokenizer`` (the encoder's, which the module does not hold) when given."""
        directory = Path(directory)
        self.question_encoder.save_pretrained(directory / "question_encoder")
        if question_tokenizer is not None:
            question_tokenizer.save_pretrained(directory / "question_encoder")
        self.generator.save_pretrained(directory / "generator")
        self.tokenizer.save_pretrained(directory / "generator")
        if self.context_encoder is not None:  # trained too: rag-index with model/question_encoder=path uses it
            self.context_encoder.save_pretrained(directory / "context_encoder")
            if question_tokenizer is not None:
                question_tokenizer.save_pretrained(directory / "context_encoder")
        return directory


def _view(ret: dict) -> dict:
    """The generator's ``question_view`` keyword of a retrieval result (none unless the generator reads one)."""
    view = ret.get("question_view")
    return {} if view is None else {"question_view": view}


def _freeze_question_encoder_bottom(encoder: nn.Module, n_top: int) -> None:
    """freeze_bottom, with its refusals named after the config key."""
    try:
        freeze_bottom(encoder, n_top)
    except TypeError as err:
        raise ConfigError(f"model.question_encoder_trainable_layers needs a DPR question encoder: {err}") from None
    except ValueError as err:
        raise ConfigError(
            f"model.question_encoder_{err} for this question encoder (null trains every layer and the embeddings)"
        ) from None


def _use_fused(choice: bool | None, groups: list[dict], precision: str) -> bool:
    """``model.optim.fused``: null picks the fused AdamW kernel wherever it runs and Lightning can clip with it
    (not under fp16 loss scaling, whose unscaling a fused step does itself)."""
    params = [p for g in groups for p in g["params"]]
    supported = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if choice is None:
        return supported and bool(params) and not precision.startswith("16")
    if choice and not supported:
        raise ConfigError("model.optim.fused=true needs every trained weight on cpu or cuda; set it to null or false")
    return choice


def _param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def _lr_lambda(kind: str, warmup: int, total: int):
    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(1.0 - progress, 0.0)

    return schedule

