"""The DPR stage's data: mined training examples, the corpus and the held-out questions, as batches of token ids.

Passages come pre-tokenised from the corpus store (the context encoder's ``[CLS] title [SEP] text [SEP]``),
questions are tokenised once here; a batch only gathers and pads. A training batch holds every question's
positive and hard negatives once each (a passage two questions share is one column), and ``positive`` says
which column is each question's: the in-batch negatives of a question are all the other columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rag_lightning.errors import UserError
from rag_lightning.padding import pad_right
from rag_lightning.retrieval.bm25 import BM25Index, MinedExample, MiningReport, mine
from rag_lightning.retrieval.store import CorpusStore

log = logging.getLogger(__name__)


class NoPositivesError(UserError, ValueError):
    """A QA set where no question has a positive passage: neither gold ids in the corpus nor an answer in BM25's
    top passages."""


@dataclass
class TrainItem:
    question_ids: list[int]
    positive: int
    negatives: list[int]
    other_positives: list[int] = field(default_factory=list)  # the example's other gold rows: never negatives


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _question_ids(tokenizer: Any, questions: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]


def mine_split(
    path: str | Path,
    examples: Sequence[Any],
    index: BM25Index,
    store: CorpusStore,
    *,
    n_negatives: int,
    depth: int,
    negative_candidates: Sequence[Sequence[int]] | None = None,
) -> tuple[list[MinedExample], MiningReport]:
    """Positives and hard negatives of a QA file's examples; a file where no example has a positive is an error."""
    mined, report = mine(index, store, examples, n_negatives=n_negatives, depth=depth,
                         negative_candidates=negative_candidates)
    if not mined:
        raise NoPositivesError(
            f"{path}: none of its {report.examples} questions has a positive passage: no gold_passage_ids in the "
            f"corpus and no answer string in the top {depth} BM25 passages. Fix: check that the QA file belongs to "
            "this corpus (data.corpus_file), add gold_passage_ids, or raise dpr.mining_depth"
        )
    if report.skipped:
        log.warning(
            "%s: %d of %d questions skipped, no positive passage (first: %s)",
            path, report.skipped, report.examples, ", ".join(report.skipped_ids),
        )
    return mined, report


def train_dataset(mined: Sequence[MinedExample], tokenizer: Any, max_question_length: int) -> ListDataset:
    ids = _question_ids(tokenizer, [m.question for m in mined], max_question_length)
    return ListDataset([TrainItem(q, m.positive, m.negatives, [r for r in m.gold_rows if r != m.positive])
                        for q, m in zip(ids, mined, strict=True)])


class TrainCollator:
    """Question ids, the batch's passages (each row once: positives first, then hard negatives) and each
    question's positive column; for ``dpr.corpus_negatives``, each question's positive corpus row and its
    other gold rows."""

    def __init__(self, store: CorpusStore, question_pad_id: int, passage_pad_id: int,
                 passage_tokens: bool = True) -> None:
        """``passage_tokens=False`` (a fixed context encoder, whose passage vectors are cached) leaves the
        passages' token ids out of the batch: nothing would encode them."""
        self.store, self.question_pad_id, self.passage_pad_id = store, question_pad_id, passage_pad_id
        self.passage_tokens = passage_tokens

    def __call__(self, items: Sequence[TrainItem]) -> dict:
        column: dict[int, int] = {}
        for row in [i.positive for i in items] + [r for i in items for r in i.negatives]:
            column.setdefault(row, len(column))
        q_ids, q_mask = pad_right([i.question_ids for i in items], self.question_pad_id)
        batch = {"question_input_ids": q_ids, "question_attention_mask": q_mask}
        if self.passage_tokens:
            p_ids, p_mask = pad_right([self.store.ctx_tokens(r) for r in column], self.passage_pad_id)
            batch.update(passage_input_ids=p_ids, passage_attention_mask=p_mask)
        return batch | {
            "positive": torch.tensor([column[i.positive] for i in items], dtype=torch.int64),
            "passage_rows": torch.tensor(list(column), dtype=torch.int64),
            "positive_rows": torch.tensor([i.positive for i in items], dtype=torch.int64),
            "other_positive_rows": [list(i.other_positives) for i in items],
        }


def train_loader(
    dataset: ListDataset, store: CorpusStore, batch_size: int, pad_ids: tuple[int, int], passage_tokens: bool = True
) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      collate_fn=TrainCollator(store, *pad_ids, passage_tokens=passage_tokens))


def corpus_loader(store: CorpusStore, batch_size: int, pad_id: int) -> DataLoader:
    """Every passage of the store, in batches of similar length (little padding); each batch names its rows."""
    order = np.argsort(store.ctx_lengths(), kind="stable")
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def collate(chunk: list[np.ndarray]) -> dict:
        rows = chunk[0]
        ids, mask = pad_right([store.ctx_tokens(int(r)) for r in rows], pad_id)
        return {"passage_input_ids": ids, "passage_attention_mask": mask, "rows": torch.from_numpy(rows.astype(np.int64))}

    return DataLoader(ListDataset(chunks), batch_size=1, shuffle=False, collate_fn=collate)


def val_loader(
    path: str | Path,
    examples: Sequence[Any],
    store: CorpusStore,
    tokenizer: Any,
    *,
    max_question_length: int,
    batch_size: int,
    pad_id: int,
) -> tuple[DataLoader, dict[str, int]]:
    """Held-out questions with their gold rows (every gold passage counts as a hit); questions without a gold
    passage in this corpus are left out and counted."""
    kept: list[tuple[str, list[int]]] = []
    for e in examples:
        rows = []
        for pid in e.gold_passage_ids:
            try:
                rows.append(store.row_of(pid))
            except KeyError:
                continue
        if rows:
            kept.append((e.question, rows))
    counts = {"questions": len(examples), "kept": len(kept)}
    if not kept:
        raise NoPositivesError(
            f"{path}: none of its {len(examples)} questions names a gold passage of this corpus, so retrieval "
            "cannot be measured on it. Fix: add gold_passage_ids (or DPR positive_ctxs) or set data.val_file=null"
        )
    if len(kept) < len(examples):
        log.warning("%s: %d of %d questions name no gold passage of the corpus; left out of validation",
                    path, len(examples) - len(kept), len(examples))
    ids = _question_ids(tokenizer, [q for q, _ in kept], max_question_length)
    items = list(zip(ids, [rows for _, rows in kept], strict=True))

    def collate(batch: list[tuple[list[int], list[int]]]) -> dict:
        q_ids, q_mask = pad_right([q for q, _ in batch], pad_id)
        return {"question_input_ids": q_ids, "question_attention_mask": q_mask, "positive_rows": [r for _, r in batch]}

    return DataLoader(ListDataset(items), batch_size=batch_size, shuffle=False, collate_fn=collate), counts


@torch.no_grad()
def dense_candidates(
    question_encoder: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    passage_vectors: torch.Tensor,
    *,
    depth: int,
    max_question_length: int,
    batch_size: int = 128,
) -> list[list[int]]:
    """The top ``depth`` corpus rows of each question by inner product with the (starting) encoders: the
    ranking of the dense index, for dense hard negatives."""
    from rag_lightning.models.encoders import encode_texts

    was_training = question_encoder.training
    question_encoder.eval()
    out: list[list[int]] = []
    pad = int(tokenizer.pad_token_id or 0)
    try:
        for start in range(0, len(questions), batch_size):
            ids, mask = pad_right(_question_ids(tokenizer, questions[start : start + batch_size], max_question_length), pad)
            q = encode_texts(question_encoder, ids, mask).float()
            out += torch.topk(q @ passage_vectors.T, min(depth, len(passage_vectors)), dim=1).indices.tolist()
    finally:
        question_encoder.train(was_training)
    return out


def interleave(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per example, the rows of two rankings taken in turns (first's best, second's best, ...), each once:
    `negatives=mixed`."""
    out = []
    for a, b in zip(first, second, strict=True):
        merged = [r for pair in zip(a, b) for r in pair] + list(a[len(b):]) + list(b[len(a):])
        out.append(list(dict.fromkeys(merged)))
    return out
