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


# ----------------------------------------------------------------------------- task metrics (libraries)
def accuracy(prediction: str, label: str) -> float:
    """1.0 when the generated label is the gold label (verification: SUPPORTS / REFUTES), after stripping."""
    return float(prediction.strip() == label.strip())


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of the predictions against every reference of each example."""
    import sacrebleu

    width = max((len(r) for r in references), default=0)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score) if width else 0.0


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (torchmetrics' ROUGE, no stemming, as KILT scores it), the best over the references."""
    from torchmetrics.functional.text.rouge import rouge_score

    if not references or not prediction.strip():
        return 0.0
    scores = rouge_score(prediction, [list(references)], rouge_keys="rougeL", accumulate="best")
    return float(scores["rougeL_fmeasure"])


# ----------------------------------------------------------------------------- KILT provenance metrics
def page_of(passage_id: str) -> str:
    """The page a passage belongs to: passage ids are `<page id>-<n>` (world: `country-fra-1`; KILT: `<wikipedia_id>-<n>`)."""
    return passage_id.rsplit("-", 1)[0]


def ranked_pages(passage_ids: Sequence[str]) -> list[str]:
    """Pages of the retrieved passages, in rank order, each once (KILT ranks pages, not passages)."""
    return list(dict.fromkeys(page_of(p) for p in passage_ids))


def r_precision(pages: Sequence[str], provenance: Sequence[Sequence[str]]) -> float:
    """KILT's R-precision: for each gold output's set of R pages, the share of the first R retrieved pages in
    it; the best output counts (0 without provenance)."""
    best = 0.0
    for gold in provenance:
        gold_set = set(gold)
        if gold_set:
            best = max(best, sum(p in gold_set for p in pages[: len(gold_set)]) / len(gold_set))
    return best


def page_recall_at_k(pages: Sequence[str], provenance: Sequence[Sequence[str]], k: int) -> float:
    """KILT's recall@k: each distinct gold evidence set counts once, complete when its last page has been
    retrieved, and holds that place in the rank; the share of evidence sets complete within the first k places."""
    sets: list[set[str]] = []
    for gold in provenance:
        if set(gold) and set(gold) not in sets:
            sets.append(set(gold))
    if not sets:
        return 0.0
    remaining = [set(s) for s in sets]
    rank: list[object] = []
    for page in pages:
        found = False
        for i, evidence in enumerate(remaining):
            if page in evidence:
                found = True
                partial = f"evidence set {i}"  # a string: an int would compare equal to False
                if partial in rank:
                    rank.remove(partial)
                evidence.discard(page)
                rank.append(True if not evidence else partial)
        if not found:
            rank.append(False)
    return sum(1 for r in rank[:k] if r is True) / len(sets)


def bleu1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-1 (sacrebleu with ``max_ngram_order=1``: unigram precision times the brevity penalty,
    0-100), the paper's Jeopardy measure beside BLEU-4, against every reference of each example."""
    from sacrebleu.metrics import BLEU

    width = max((len(r) for r in references), default=0)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return float(BLEU(max_ngram_order=1).corpus_score(list(predictions), streams).score) if width else 0.0


# ----------------------------------------------------------------------------- factuality of generated text
_NUMBER = r"\d+(?:[.,]\d+)*"
_TOKEN = re.compile(rf"{_NUMBER}|[\w'’\-]+|\S")
# capitalised words that start sentences or questions without naming anything
_NOT_NAMES = frozenset({
    "the", "this", "that", "these", "those", "it", "its", "a", "an", "and", "or", "in", "on", "of", "at", "by",
    "for", "to", "from", "with", "people", "there", "here", "what", "which", "who", "whom", "whose", "how",
    "when", "where", "why", "yes", "no", "also",
})  # fmt: skip


def _fold(text: str) -> str:
    """Case- and accent-insensitive form, so "N'Djamena" matches "n'djamena" and "Sant Julià" "Sant Julia"."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def generated_facts(text: str) -> list[str]:
    """The checkable facts a sentence states: its numbers ("66,078,000", "1.008") and its names (runs of
    capitalised words, "Flying Fish Cove"; leading function words such as a sentence-initial "The" dropped),
    each once, in order."""
    facts: list[str] = []
    run: list[str] = []

    def close() -> None:
        while run and run[0].casefold() in _NOT_NAMES:
            run.pop(0)
        if run:
            facts.append(" ".join(run))
        run.clear()

    for match in _TOKEN.finditer(text):
        token = match.group()
        if re.fullmatch(_NUMBER, token):
            close()
            facts.append(token)
        elif token[0].isalpha() and token[0].isupper():
            if run and text[match.start() - 1] != " ":
                close()  # "Europe/Moscow": two names
            run.append(token)
        else:
            close()
    close()
    return list(dict.fromkeys(facts))


def _states(folded_text: str, fact: str) -> bool:
    """Whether a folded text holds the fact as a whole number or as whole words."""
    value = re.escape(_fold(fact))
    number = re.fullmatch(_NUMBER, fact) is not None
    # a number stands whole (66 is not in 66,078,000); a name as whole words
    pattern = rf"(?<![\w.,]){value}(?!\w|[.,]\d)" if number else rf"(?<!\w){value}(?!\w)"
    return re.search(pattern, folded_text) is not None


def factuality(prediction: str, evidence: Sequence[str], given: str = "") -> float | None:
    """The share of the facts (numbers, names) ``prediction`` states, beyond those ``given`` (the input it
    answers), that a gold passage holds; None when it states none (no fact to check)."""
    folded_given = _fold(given)
    facts = [f for f in generated_facts(prediction) if not (given and _states(folded_given, f))]
    if not facts:
        return None
    folded = _fold("\n".join(evidence))
    return sum(_states(folded, f) for f in facts) / len(facts)


def scores_by_category(
    records: Sequence[dict], category_of: dict[str, str], names: Sequence[str] = ("em", "f1")
) -> dict[str, dict[str, float]]:
    """Per category (e.g. the world set's ``relation``): the number of records and the mean of each score
    in ``names`` over them. ``records`` are prediction records (``id`` and the scores); ``category_of`` maps
    an id to its category, and records whose id it lacks are left out. Sorted by category."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        category = category_of.get(str(record["id"]))
        if category is not None:
            groups.setdefault(category, []).append(record)
    out: dict[str, dict[str, float]] = {}
    for category, members in sorted(groups.items()):
        row: dict[str, float] = {"n": len(members)}
        for name in names:
            known = [float(r[name]) for r in members if r.get(name) is not None]
            if known:
                row[name] = sum(known) / len(known)
        out[category] = row
    return out
