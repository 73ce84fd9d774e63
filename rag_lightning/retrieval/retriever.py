"""Top-k passages for question vectors, and the generator's contexts assembled from pre-tokenised arrays.

Context layout (generator ids, ``<s>`` = bos, ``</s>`` = eos)::

    question_first (default):  <s> Q // T / X </s>
    passage_first:             <s> T / X // Q </s>     (transformers' RagRetriever order)

where ``Q`` are the question's ids from :func:`rag_lightning.data.pieces.piece_ids` (the tokens of
``" " + question``), ``//`` the separator's ids (tokens of ``" //"``) and ``T / X`` the store's passage ids
(tokens of ``" " + title + " / " + text``). For byte-level BPE the ids equal those of tokenising
``" " + question + " // " + title + " / " + text`` in one go. Only the passage is truncated to fit
``max_context_length``, so a long passage can never cut the question off (with passage-first strings truncated
at the end, the question is the first thing lost).

Hybrid retrieval (``index.hybrid=true``, :class:`HybridScoring`): the dense index and a BM25 index of the same
store. Candidates are the dense top-m and the BM25 top-m of each question; each is scored
``q·d + w * BM25(question, d)`` (q·d exact, from the stored passage vectors; BM25 optionally divided by the
question's best BM25 score), and the best k are returned. The BM25 part is a constant per (question, passage) (:attr:`Retrieved.lexical`): the
module adds it to its differentiable ``bmm(q, vectors)``, so the question encoder keeps its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rag_lightning.config import CONTEXT_LAYOUTS, ConfigError
from rag_lightning.data.pieces import SEPARATOR
from rag_lightning.padding import pad_right
from rag_lightning.retrieval.distributed import rescore, top_k
from rag_lightning.retrieval.faiss_index import IndexStateError, PassageIndex
from rag_lightning.retrieval.store import CorpusStore

if TYPE_CHECKING:
    from rag_lightning.retrieval.bm25 import BM25Index


@dataclass
class Retrieved:
    """The top-k of a batch: rows in the store, index scores, exact passage vectors, passage ids."""

    rows: torch.Tensor  # (B, k) int64
    scores: torch.Tensor  # (B, k) float32, as returned by the index
    vectors: torch.Tensor  # (B, k, d) float32 on the questions' device
    passage_ids: list[list[str]]
    # hybrid retrieval: the constant BM25 part of ``scores`` (B, k), w * normalised BM25; None otherwise
    lexical: torch.Tensor | None = None


@dataclass(frozen=True)
class PassageText:
    """A passage as a person reads it (predictions, provenance)."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class HybridScoring:
    """How BM25 joins dense retrieval (``index.hybrid_*``): a passage's score is ``q·d + weight * BM25``, the
    BM25 score divided by the question's best one (``norm="max"``: in [0, weight] whatever the corpus and
    question length, so one weight fits all questions) or raw (``norm="none"``); candidates: the top
    ``candidates`` of each retriever."""

    bm25: BM25Index
    weight: float
    candidates: int
    norm: str = "max"

    def bonus(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(raw BM25 scores, their weighted and normalised part of the hybrid score), both (B, N) float32."""
        raw = self.bm25.scores(questions)
        scaled = raw
        if self.norm == "max":
            best = raw.max(axis=1, keepdims=True) if raw.shape[1] else np.zeros((len(raw), 1), np.float32)
            scaled = np.divide(raw, best, out=np.zeros_like(raw), where=best > 0)
        return raw, (self.weight * scaled).astype(np.float32)


class Searcher(Protocol):
    """What finds the top-k rows: the index itself, or a search spread over DDP ranks."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class Retriever:
    """The retrieval API the rest of the framework uses; nothing outside `retrieval/` touches the store or
    the index. Searches, reads passage vectors and texts by row, maps passage ids to rows, and builds the
    generator's inputs without decoding or re-tokenising any string.

    ``searcher`` finds the rows (default: the index; under DDP a
    :class:`~rag_lightning.retrieval.distributed.DistributedSearch`); everything else is the same.
    """

    def __init__(
        self,
        index: PassageIndex | BM25Index,
        store: CorpusStore,
        *,
        max_context_length: int,
        layout: str = "question_first",
        separator: str = SEPARATOR,
        title_separator: str = " / ",
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        searcher: Searcher | None = None,
        hybrid: HybridScoring | None = None,
    ) -> None:
        if layout not in CONTEXT_LAYOUTS:
            raise ConfigError(f"context.layout={layout!r} is not one of {', '.join(CONTEXT_LAYOUTS)}")
        if len(index) != len(store):
            raise IndexStateError(
                f"the index holds {len(index)} passages but the corpus store {store.dir} holds {len(store)}; "
                "rebuild the index (rag-index)"
            )
        if title_separator != store.title_separator:
            raise ConfigError(
                f"title_separator={title_separator!r} differs from {store.title_separator!r} that the corpus "
                f"store {store.dir} was tokenised with; rebuild the store or use the store's separator"
            )
        if hybrid is not None and (getattr(index, "sparse", False) or len(hybrid.bm25) != len(store)):
            raise IndexStateError(
                f"hybrid retrieval needs a dense index and a BM25 index of the {len(store)} passages of {store.dir}; "
                f"got a {index.index_type} index and a BM25 index of {len(hybrid.bm25)}: rebuild them (rag-index index=hybrid)"
            )
        if separator != f" {separator.strip()} ":
            raise ValueError(f"separator={separator!r} must start and end with one space")
        self.index, self.store, self.layout = index, store, layout
        self.searcher: Searcher = searcher if searcher is not None else index
        self.hybrid = hybrid
        self.max_context_length = max_context_length
        self.separator_ids = store.gen_piece_ids(separator)
        # BART's special tokens of the store's generator tokenizer unless given
        self.bos_id = store.gen_token_id("<s>") if bos_id is None else bos_id
        self.eos_id = store.gen_token_id("</s>") if eos_id is None else eos_id
        self.pad_id = store.gen_token_id("<pad>") if pad_id is None else pad_id
        if max_context_length < len(self.separator_ids) + 3:
            raise ConfigError(f"context.max_length={max_context_length} leaves no room for a question")

    def __len__(self) -> int:
        """Passages in the corpus."""
        return len(self.store)

    @property
    def sparse(self) -> bool:
        """True for an index that scores question texts (BM25: :meth:`retrieve_texts`), not vectors."""
        return bool(getattr(self.index, "sparse", False))

    # ---- the API -------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(
        self, question_vectors: torch.Tensor, k: int, questions: Sequence[str] | None = None
    ) -> Retrieved:
        """Top-``k`` passages per question. No gradient flows through the search: recompute the document
        scores as ``bmm(q, vectors)`` (plus ``lexical`` in hybrid retrieval) to train the question encoder.
        Hybrid retrieval needs the question texts too (``questions``). Under DDP with a sharded searcher this
        is a collective: every rank must call it."""
        q = question_vectors.detach().to("cpu", torch.float32).numpy()
        if self.hybrid is not None:
            return self._retrieve_hybrid(q, k, questions, question_vectors.device)
        scores, rows = self.searcher.search(q, k)
        if (rows < 0).any():
            raise RuntimeError(
                f"the {self.index.index_type} index found fewer than k={k} passages for some questions; "
                "raise index.nprobe / index.ef_search or lower k"
            )
        return self._result(torch.from_numpy(np.asarray(rows)), torch.from_numpy(np.asarray(scores)),
                            question_vectors.device)

    def _retrieve_hybrid(
        self, q: np.ndarray, k: int, questions: Sequence[str] | None, device: torch.device
    ) -> Retrieved:
        """Dense top-m and BM25 top-m of each question, ranked by q·d + the BM25 part (ties: lower row)."""
        if questions is None or len(questions) != len(q):
            raise ValueError(
                f"hybrid retrieval (index.hybrid=true) scores the question texts too: pass questions= "
                f"({len(q)} question vectors, {'no' if questions is None else len(questions)} texts)"
            )
        if not 0 < k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the number of passages ({len(self)})")
        m = min(max(self.hybrid.candidates, k), len(self))
        _, dense_rows = self.searcher.search(q, m)  # the collective under DDP: every rank calls it
        raw, bonus = self.hybrid.bonus(questions)
        from rag_lightning.retrieval.bm25 import top_rows

        _, lexical_rows = top_rows(raw, m)
        rows = np.full((len(q), 2 * m), -1, dtype=np.int64)
        for b, (dense, lexical) in enumerate(zip(np.asarray(dense_rows), lexical_rows)):
            union = np.unique(np.concatenate([dense[dense >= 0], lexical]))
            rows[b, : len(union)] = union
        safe = np.where(rows >= 0, rows, 0)
        scores = rescore(q, rows, self.index.vectors) + np.take_along_axis(bonus, safe, axis=1)
        scores, rows = top_k(scores, rows, k)
        lexical_part = np.take_along_axis(bonus, rows, axis=1)
        return self._result(torch.from_numpy(rows), torch.from_numpy(scores.astype(np.float32)), device,
                            torch.from_numpy(lexical_part).to(device))

    def retrieve_texts(self, questions: Sequence[str], k: int) -> Retrieved:
        """Top-``k`` passages per question text from a sparse (BM25) index; scores are BM25 scores and
        ``vectors`` are empty (B, k, 0): there is nothing to differentiate."""
        if not self.sparse:
            raise TypeError(f"the {self.index.index_type} index searches question vectors: use retrieve()")
        scores, rows = self.index.search_texts(list(questions), k)
        return self._result(torch.from_numpy(rows), torch.from_numpy(scores), torch.device("cpu"))

    def vectors(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The exact passage vectors of ``rows`` (any shape), float32 on the CPU: shape rows.shape + (d,)."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if self.sparse:
            return torch.zeros(*rows.shape, 0)
        flat = np.asarray(self.index.vectors[rows.reshape(-1).numpy()], dtype=np.float32)
        return torch.from_numpy(flat).reshape(*rows.shape, -1)

    def passage_inputs(self, rows: torch.Tensor | Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The context encoder's inputs of ``rows`` (flattened): token ids (R, L) from the store, right-padded
        with ``pad_id``, and their attention mask; for re-encoding passages with a context encoder in training."""
        flat = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).tolist()
        return pad_right([self.store.ctx_tokens(int(r)) for r in flat], pad_id)

    def swap_index(self, index: PassageIndex, searcher: Searcher | None = None) -> None:
        """Search ``index`` from now on (a refreshed index of the same corpus; ``searcher``: its search under
        DDP, default the index itself). The swap is one assignment each: a search sees the old or the new."""
        if len(index) != len(self.store):
            raise IndexStateError(
                f"the new index holds {len(index)} passages but the corpus store {self.store.dir} holds {len(self.store)}"
            )
        self.index, self.searcher = index, searcher if searcher is not None else index

    def rows_of(self, passage_ids: Sequence[str]) -> list[int | None]:
        """The store row of each passage id; None for an id outside this corpus."""
        rows: list[int | None] = []
        for pid in passage_ids:
            try:
                rows.append(self.store.row_of(pid))
            except KeyError:
                rows.append(None)
        return rows

    def passages(self, rows: Sequence[int]) -> list[PassageText]:
        """Id, title and text of each row, for predictions and provenance."""
        return [
            PassageText(self.store.passage_id(int(r)), self.store.title(int(r)), self.store.text(int(r)))
            for r in rows
        ]

    def with_gold(
        self,
        found: Retrieved,
        gold_passage_ids: Sequence[Sequence[str]],
        question_vectors: torch.Tensor | None,
        questions: Sequence[str] | None = None,
    ) -> Retrieved:
        """``found`` with each example's first gold passage in its last slot when the search missed it.

        The training-time curriculum: every step then carries a passage that holds the answer, so the
        generator learns to read before it has to cope with retrieval misses.  Examples without a gold id,
        or with one outside this corpus, keep what the search found. A sparse index scores the new rows
        with the question texts (``questions``), a dense one with ``question_vectors`` (hybrid: both)."""
        rows = found.rows.clone()
        firsts = self.rows_of([gold[0] if gold else "" for gold in gold_passage_ids])
        for b, (gold, row) in enumerate(zip(gold_passage_ids, firsts)):
            if gold and row is not None and row not in rows[b].tolist():
                rows[b, -1] = row
        if torch.equal(rows, found.rows):
            return found
        if self.sparse:
            scores = torch.from_numpy(self.index.score_rows(list(questions or []), rows.numpy()))
            return self._result(rows, scores, found.vectors.device)
        q = question_vectors.detach().to("cpu", torch.float32)
        scores = torch.einsum("bd,bkd->bk", q, self.vectors(rows))
        lexical = None
        if self.hybrid is not None:
            if questions is None:
                raise ValueError("hybrid retrieval (index.hybrid=true) scores the question texts too: pass questions=")
            lexical = torch.from_numpy(np.take_along_axis(self.hybrid.bonus(list(questions))[1], rows.numpy(), axis=1))
            scores = scores + lexical
            lexical = lexical.to(found.vectors.device)
        return self._result(rows, scores, found.vectors.device, lexical)

    def _result(
        self, rows: torch.Tensor, scores: torch.Tensor, device: torch.device, lexical: torch.Tensor | None = None
    ) -> Retrieved:
        """The one place a retrieval result is built: vectors and ids read for the rows found."""
        return Retrieved(
            rows=rows,
            scores=scores,
            vectors=self.vectors(rows).to(device),
            passage_ids=[[self.store.passage_id(int(r)) for r in row] for row in rows.tolist()],
            lexical=lexical,
        )

    def build_contexts(
        self,
        question_token_ids: Sequence[Sequence[int]],
        rows: torch.Tensor,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator inputs (B*k, L) and attention mask: contexts of example b at rows b*k .. b*k+k-1,
        right-padded with ``pad_id`` to the longest context of the batch (ids default to the retriever's)."""
        bos_id = self.bos_id if bos_id is None else bos_id
        eos_id = self.eos_id if eos_id is None else eos_id
        pad_id = self.pad_id if pad_id is None else pad_id
        if None in (bos_id, eos_id, pad_id):
            raise ValueError(
                "the store's generator tokenizer has no <s>, </s> or <pad>: pass bos/eos/pad ids"
            )
        rows_np = rows.detach().cpu().numpy()
        if rows_np.ndim != 2 or rows_np.shape[0] != len(question_token_ids):
            raise ValueError(
                f"rows must be (B, k) with B={len(question_token_ids)}, got {tuple(rows_np.shape)}"
            )
        sep = np.asarray(self.separator_ids, dtype=np.int64)
        budget = self.max_context_length - 2 - len(sep)  # room for question + passage
        contexts: list[np.ndarray] = []
        for question, example_rows in zip(question_token_ids, rows_np, strict=True):
            q = np.asarray(question, dtype=np.int64)[:budget]  # cut only a question longer than everything
            room = budget - len(q)
            for row in example_rows:
                passage = self.store.gen_tokens(int(row))[:room]
                parts = (q, sep, passage) if self.layout == "question_first" else (passage, sep, q)
                contexts.append(np.concatenate([[bos_id], *parts, [eos_id]]).astype(np.int64))
        return pad_right(contexts, pad_id)
