"""The DPR stage (Karpukhin et al., 2020): question and context encoders trained contrastively.

The loss is DPR's: for each question, the negative log-likelihood of its positive passage among all passages
of the batch (every question's positive and hard negatives: in-batch negatives plus hard ones), scored by
inner product. :func:`dpr_loss` is that, on tensors; :class:`DPRModule` wires the encoders to it and
measures retrieval on the whole corpus at validation: the corpus is re-encoded by the context encoder as
validation dataloader 0, then the held-out questions (dataloader 1) are scored against every passage.
With ``corpus_negatives`` every passage of the corpus is in each question's softmax: the fixed context
encoder's vectors, or a :class:`~rag_lightning.models.passage_bank.PassageBank` of the trained one's.
The store, the index and the mining live in ``retrieval/`` (``retrieval/dpr_data.py`` builds the batches).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from rag_lightning.config import RetrieverTrainingConfig
from rag_lightning.models.encoder_split import freeze_bottom
from rag_lightning.models.encoders import encode_texts
from rag_lightning.models.module import _lr_lambda, _param_groups
from rag_lightning.models.passage_bank import PassageBank


def dpr_loss(question_vectors: torch.Tensor, passage_vectors: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over questions of -log softmax(q_i · p_j over all passages j of the batch)[positive_i].

    question_vectors (B, d); passage_vectors (M, d): every passage of the batch (positives, in-batch and hard
    negatives, each once); positive (B,) int64: the column of each question's positive passage.
    """
    scores = question_vectors.float() @ passage_vectors.float().T
    return torch.nn.functional.cross_entropy(scores, positive)


def corpus_dpr_loss(
    question_vectors: torch.Tensor,
    corpus_vectors: torch.Tensor,
    positive_rows: torch.Tensor,
    other_positive_rows: Sequence[Sequence[int]] = (),
) -> torch.Tensor:
    """:func:`dpr_loss` with every passage of the corpus as a negative: the exact retrieval softmax.

    Affordable only while the passage side is fixed (its vectors computed once): then a question's negatives
    are all the passages it is ranked against at test time, not the few of its batch. corpus_vectors (N, d);
    positive_rows (B,) the corpus row of each question's positive; other_positive_rows: per question, its
    other gold rows, left out of its softmax (they are right answers, not negatives).
    """
    scores = _leave_out_other_gold(question_vectors.float() @ corpus_vectors.float().T, positive_rows,
                                   other_positive_rows)
    return torch.nn.functional.cross_entropy(scores, positive_rows)


def _leave_out_other_gold(
    scores: torch.Tensor, positive_rows: torch.Tensor, other_positive_rows: Sequence[Sequence[int]]
) -> torch.Tensor:
    for i, rows in enumerate(other_positive_rows):
        others = [r for r in rows if r != int(positive_rows[i])]
        if others:
            scores[i, others] = float("-inf")
    return scores


@torch.no_grad()
def hardest_negatives(
    scores: torch.Tensor, positive_rows: torch.Tensor, other_positive_rows: Sequence[Sequence[int]], n: int
) -> torch.Tensor:
    """(B, n) corpus rows scoring highest for each question among its negatives (never its positive or another
    of its gold rows). scores (B, N) of the questions against the corpus."""
    scores = _leave_out_other_gold(scores.detach().float().clone(), positive_rows, other_positive_rows)
    scores[torch.arange(len(positive_rows)), positive_rows] = float("-inf")
    return scores.topk(min(n, scores.shape[1] - 1), dim=1).indices


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of same-shape tensors whose backward keeps the gradient of the local part: every rank's
    gradient w.r.t. the gathered tensor is summed (all_reduce, which gloo supports) and the local slice
    returned."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gathered_dpr_loss(
    question_vectors: torch.Tensor, passage_vectors: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """:func:`dpr_loss` under DDP: each rank's questions against the passages of every rank.

    Passage vectors are gathered across ranks (padded to the largest count, the padding masked out), the
    gradient kept for the local part and summed over the ranks' losses in backward. With DDP's averaging of
    gradients over W ranks of equal question counts this equals, loss and gradients, the single-process
    :func:`dpr_loss` on the concatenated batch. Without a process group of several ranks: :func:`dpr_loss`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dpr_loss(question_vectors, passage_vectors, positive)
    rank, world = dist.get_rank(), dist.get_world_size()
    count = torch.tensor([passage_vectors.shape[0]], device=passage_vectors.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    width = int(max(c.item() for c in counts))
    padded = torch.cat([passage_vectors, passage_vectors.new_zeros(width - passage_vectors.shape[0], passage_vectors.shape[1])])
    everything = _GatherWithGrad.apply(padded)
    scores = question_vectors.float() @ everything.float().T
    real = torch.cat([torch.arange(width, device=scores.device) < c.item() for c in counts])
    scores = scores.masked_fill(~real, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, positive + rank * width)


def rank_metrics(scores: torch.Tensor, positives: Sequence[Sequence[int]], ks: Sequence[int]) -> dict[str, float]:
    """recall@k and MRR of questions against the whole corpus: scores (Q, N); positives: the corpus rows
    that count as a hit for each question. Rank of a question = 1 + passages scoring above its best positive
    (ties count in the question's favour)."""
    ranks = []
    for row, pos in zip(scores, positives, strict=True):
        best = row[list(pos)].max()
        ranks.append(int((row > best).sum()) + 1)
    r = torch.tensor(ranks, dtype=torch.float)
    out = {f"recall@{k}": float((r <= k).float().mean()) for k in sorted(set(ks))}
    out["mrr"] = float((1.0 / r).mean())
    return out


class DPRModule(L.LightningModule):
    """Question and context encoders (or one shared encoder) trained with :func:`dpr_loss`."""

    def __init__(
        self,
        question_encoder: nn.Module,
        context_encoder: nn.Module | None,
        config: RetrieverTrainingConfig,
        passage_vectors: torch.Tensor | None = None,
        bank: PassageBank | None = None,
    ) -> None:
        """``passage_vectors`` (N, d): the fixed context encoder's vectors of every corpus row, given when
        ``config.train_context_encoder`` is false (a buffer outside the checkpoint). ``bank``: the states the
        trained context encoder's vectors are refreshed from, given when ``config.corpus_negatives`` is true too."""
        super().__init__()
        self.question_encoder = question_encoder
        # shared weights: the question encoder encodes passages too (exported as a DPRContextEncoder copy)
        self.context_encoder = context_encoder if not config.shared_encoder else None
        self.cfg = config
        if not config.train_context_encoder:
            if passage_vectors is None or self.context_encoder is None:
                raise ValueError("train_context_encoder=false needs the context encoder and its passage vectors")
            self.context_encoder.requires_grad_(False)
            self.register_buffer("passage_vectors", passage_vectors.float(), persistent=False)
        self.bank = bank if self.uses_bank else None
        if self.uses_bank:
            if bank is None or self.context_encoder is None:
                raise ValueError("corpus_negatives with a trained context encoder needs its passage bank")
            freeze_bottom(self.context_encoder, bank.layers)
            self.register_buffer("passage_vectors", bank.vectors(self.context_encoder), persistent=False)
        self.bank_refresh_s = 0.0
        self._bank_step = 0  # the step whose weights the bank's vectors come from
        if config.trainable_layers is not None:
            for encoder in (self.question_encoder, None if self.uses_bank else self.context_encoder):
                if encoder is not None:
                    freeze_bottom(encoder, config.trainable_layers)
        self._corpus: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._questions: list[torch.Tensor] = []
        self._positives: list[list[int]] = []
        self._val_start = 0.0
        self._encode_s = 0.0
        self.train()
        self.save_hyperparameters({"dpr": json.loads(json.dumps(asdict(config), default=str))})

    @property
    def uses_bank(self) -> bool:
        """The passage side trains against the whole corpus, through the bank (``dpr.bank``)."""
        return self.cfg.corpus_negatives and self.cfg.train_context_encoder

    @property
    def passage_encoder(self) -> nn.Module:
        return self.context_encoder if self.context_encoder is not None else self.question_encoder

    def encode_questions(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encode_texts(self.question_encoder, ids, mask)

    def encode_passages(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encode_texts(self.passage_encoder, ids, mask)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.encode_questions(batch["question_input_ids"], batch["question_attention_mask"])
        size = q.shape[0]
        if self.cfg.corpus_negatives:  # every rank holds the whole corpus: no gathering needed
            p, target, accuracy_name = self.passage_vectors, batch["positive_rows"], "train/corpus_accuracy"
            if self.uses_bank:
                p = self._bank_with_fresh_rows(q, batch)
            loss = corpus_dpr_loss(q, p, target, batch["other_positive_rows"])
        else:
            if self.cfg.train_context_encoder:
                p = self.encode_passages(batch["passage_input_ids"], batch["passage_attention_mask"])
            else:
                p = self.passage_vectors[batch["passage_rows"]]
            target, accuracy_name = batch["positive"], "train/in_batch_accuracy"  # among the local passages
            loss = gathered_dpr_loss(q, p, target)
            self.log("train/passages_per_batch", float(p.shape[0]), batch_size=size)
        with torch.no_grad():
            accuracy = ((q @ p.T).argmax(dim=-1) == target).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log(accuracy_name, accuracy, batch_size=size)
        return loss

    # ---------------------------------------------------------------- the passage bank (dpr.bank)
    def _bank_with_fresh_rows(self, q: torch.Tensor, batch: dict) -> torch.Tensor:
        """The bank with each question's positive and its ``fresh_negatives`` hardest bank negatives encoded
        again, with gradient: their columns carry the context encoder's gradient, the rest are constants."""
        assert self.bank is not None
        self.bank = self.bank.to(self.passage_vectors.device)
        positives = batch["positive_rows"]
        negatives = hardest_negatives(q.detach().float() @ self.passage_vectors.T, positives, batch["other_positive_rows"],
                                      self.cfg.bank.fresh_negatives)
        rows = torch.unique(torch.cat([positives, negatives.flatten()]))
        fresh = self.bank.encode(self.context_encoder, rows).float()
        self.log("train/fresh_passages", float(len(rows)), batch_size=q.shape[0])
        return self.passage_vectors.index_copy(0, rows, fresh)

    def refresh_bank(self) -> None:
        """Every passage's vector recomputed from the bank's states by the current context encoder."""
        if self.bank is None:
            return
        start = time.perf_counter()
        self.bank = self.bank.to(self.passage_vectors.device)
        self.passage_vectors.copy_(self.bank.vectors(self.context_encoder, self.cfg.eval_batch_size))
        self._bank_step = self.global_step
        self.bank_refresh_s += time.perf_counter() - start

    def _refresh_bank_if_stale(self) -> None:
        if self.bank is not None and self._bank_step != self.global_step:
            self.refresh_bank()

    def on_train_start(self) -> None:
        self._refresh_bank_if_stale()  # a resumed run: the bank from its restored weights

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if self.global_step % self.cfg.bank.refresh_steps == 0:
            self._refresh_bank_if_stale()

    # ---------------------------------------------------------------- validation on the whole corpus
    def on_validation_epoch_start(self) -> None:
        self._corpus, self._questions, self._positives = [], [], []
        self._val_start = time.perf_counter()
        self._refresh_bank_if_stale()  # the passage side as the context encoder stands now

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "rows" in batch:  # dataloader 0: the corpus, re-encoded by the current context encoder
            vectors = self.encode_passages(batch["passage_input_ids"], batch["passage_attention_mask"])
            self._corpus.append((batch["rows"].cpu(), vectors.float().cpu()))
            self._encode_s = time.perf_counter() - self._val_start
            return
        self._questions.append(self.encode_questions(batch["question_input_ids"], batch["question_attention_mask"]).float().cpu())
        self._positives.extend(batch["positive_rows"])

    def on_validation_epoch_end(self) -> None:
        if not self._questions:
            return
        if not self.cfg.train_context_encoder or self.uses_bank:  # fixed passages, or the bank just refreshed
            corpus = self.passage_vectors.cpu()
            rows = torch.arange(len(corpus))
        elif self._corpus:
            rows = torch.cat([r for r, _ in self._corpus])
            vectors = torch.cat([v for _, v in self._corpus])
            corpus = torch.empty_like(vectors)
            corpus[rows] = vectors  # encoding batches are sorted by length: back into corpus order
        else:
            return
        scores = torch.cat(self._questions) @ corpus.T
        results = rank_metrics(scores, self._positives, self.cfg.eval_ks)
        for name, value in results.items():
            self.log(f"val/{name}", value)
        self.log("val/passages", float(len(rows)))
        if self.cfg.train_context_encoder and not self.uses_bank:
            self.log("val/corpus_encode_s", self._encode_s)
        self._corpus, self._questions = [], []

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        cfg = self.cfg
        groups = _param_groups(self.question_encoder, cfg.lr, cfg.weight_decay)
        if self.context_encoder is not None and cfg.train_context_encoder:
            lr = cfg.bank.context_lr if self.uses_bank and cfg.bank.context_lr is not None else cfg.lr
            groups += _param_groups(self.context_encoder, lr, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.scheduler, cfg.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- export
    def export_encoders(self, directory: str | Path, tokenizer: Any) -> Path:
        """Both encoders with save_pretrained (DPRQuestionEncoder, DPRContextEncoder; safetensors), each with
        the tokenizer, under ``directory/{question_encoder,context_encoder}``."""
        from rag_lightning.models.rag_checkpoint import context_encoder_like

        directory = Path(directory)
        context = self.context_encoder if self.context_encoder is not None else context_encoder_like(self.question_encoder)
        for name, model in (("question_encoder", self.question_encoder), ("context_encoder", context)):
            model.save_pretrained(directory / name)
            tokenizer.save_pretrained(directory / name)
        return directory
