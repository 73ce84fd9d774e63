"""Answer metrics (SQuAD-style EM/F1) and retrieval metrics (recall@k, MRR)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1, the maximum over the gold answers."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def has_answer(text: str, answers: Sequence[str]) -> bool:
    """True when ``text`` contains one of ``answers`` as whole words, after SQuAD normalisation (DPR's rule)."""
    padded = f" {normalize_answer(text)} "
    return any(f" {a} " in padded for a in map(normalize_answer, answers) if a)


def retrieval_hits(
    retrieved_ids: Sequence[Sequence[str]],
    retrieved_texts: Sequence[Sequence[str]],
    gold_ids: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
) -> torch.Tensor:
    """(B, K) bool: passage k of example b is relevant.

    Relevant means a gold passage where the QA set names gold ids; otherwise, as DPR measures it, a
    passage that contains one of the answers (after normalisation).
    """
    rows = []
    for ids, texts, gold, ans in zip(retrieved_ids, retrieved_texts, gold_ids, answers, strict=True):
        if gold:
            gold_set = set(gold)
            rows.append([pid in gold_set for pid in ids])
        else:
            rows.append([has_answer(t, ans) for t in texts])
    return torch.tensor(rows, dtype=torch.bool)


def recall_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) float: 1 where a relevant passage is among the first k."""
    return hits[:, :k].any(dim=1).float()


def reciprocal_rank(hits: torch.Tensor) -> torch.Tensor:
    """(B,) float: 1/rank of the first relevant passage, 0 if none was retrieved."""
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float)
    rr = hits.float() / ranks
    return rr.max(dim=1).values if hits.shape[1] else torch.zeros(hits.shape[0])


def doc_entropy(doc_scores: torch.Tensor) -> torch.Tensor:
    """(B,) entropy of p(z|x); near 0 everywhere signals a retriever that collapsed onto one passage."""
    log_p = torch.log_softmax(doc_scores.float(), dim=-1)
    return -(log_p.exp() * log_p).nan_to_num(0.0).sum(dim=-1)


def distinct_share(rows: torch.Tensor) -> float:
    """Share of distinct passages among all retrieved in a batch (1.0: no passage repeats)."""
    return rows.unique().numel() / max(rows.numel(), 1)
