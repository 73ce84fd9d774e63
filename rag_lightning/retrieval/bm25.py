"""BM25 over the corpus store's passages (title + text) with the bm25s library.

Three users: ``index=bm25``, a fixed sparse retriever for the paper's BM25 ablation (doc scores are the BM25
scores of the question text; the question encoder is unused), and the DPR training stage, which takes its
positives (where the QA set names no gold passage) and its hard negatives from it (:func:`mine`).

An index directory holds bm25s' own files (``BM25.save``: the sparse score matrix, vocabulary, parameters)
and ``bm25_manifest.json``: corpus hash, passage count, the BM25 parameters and tokenisation, the bm25s
version. The directory is written beside its final place and renamed into it with the manifest inside, so
a killed build leaves nothing half-written where the index is expected; a later run refuses an index whose
manifest differs from what it asks for, with the command that rebuilds it.

Tokenisation is bm25s' own (lower case, words of two or more letters or digits, English stopwords by
default, no stemming). ``index.bm25_min_word_chars=1`` keeps one-character words (the digit
of "atomic number 7") and ``index.bm25_ngram=2`` indexes each pair of neighbouring
words too (after stopword removal), so "atomic number 18" matches the passage that says "number 18", not the
passages that mention 18 elsewhere ("group 18"). ``index.bm25_whole_numbers=true`` keeps a number with inner
separators as one token (an atomic weight 26.98, a population 1,526,000), so a question's bare 26 matches only
passages where 26 stands alone. ``index.bm25_adjacent_pairs=true`` forms pairs only of words next to each other
in the text: a stopword between two words breaks their pair, so "capital city of Kazakhstan" does not match "a
city in Kazakhstan" through a pair "city kazakhstan" that neither text has. All four are build-time keys, recorded in the manifest only when
they differ from bm25s' defaults (indexes built before they existed stay valid). Ranking ties go to the lower corpus row, so every search is deterministic.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_lightning.config import ConfigError, IndexConfig
from rag_lightning.metrics import has_answer
from rag_lightning.retrieval.faiss_index import IndexCorruptError, IndexMismatchError, IndexMissingError
from rag_lightning.retrieval.store import CorpusStore, manifest_differences

try:
    import bm25s
except ImportError as err:  # pragma: no cover - the bm25 extra is in dev, so tests always have it
    raise ConfigError(
        "BM25 (index=bm25, rag-train-retriever) needs the bm25s library: pip install -e '.[bm25]'"
    ) from err

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "bm25_manifest.json"
SEARCH_CHUNK = 256  # questions scored at once: (chunk, N) float32 in memory


def passage_text(store: CorpusStore, row: int) -> str:
    """What BM25 indexes of a passage: its title, then its text."""
    title = store.title(row)
    return f"{title} {store.text(row)}" if title else store.text(row)


def token_pattern(min_word_chars: int = 2, whole_numbers: bool = False) -> str:
    r"""The regular expression of a word. min_word_chars=2 is bm25s' (and scikit-learn's) default,
    (?u)\b\w\w+\b; whole_numbers puts first a number with inner separators (55.845, 9,733,276), so it is
    one token instead of 55 and 845, which would match every question that names 55."""
    word = rf"\b\w{{{min_word_chars},}}\b"
    return rf"(?u)\b\d+(?:[.,]\d+)+\b|{word}" if whole_numbers else f"(?u){word}"


def _tokenize(
    texts: Sequence[str],
    stopwords: str | None,
    ngram: int = 1,
    min_word_chars: int = 2,
    whole_numbers: bool = False,
    adjacent_pairs: bool = False,
) -> list[list[str]]:
    pattern = token_pattern(min_word_chars, whole_numbers)
    words = bm25s.tokenize(list(texts), stopwords=stopwords, token_pattern=pattern, return_ids=False,
                           show_progress=False)
    if ngram < 2:
        return words
    if not adjacent_pairs:  # n-grams of the words left after stopword removal
        return [w + _ngrams([w], ngram) for w in words]
    every = bm25s.tokenize(list(texts), stopwords=None, token_pattern=pattern, return_ids=False, show_progress=False)
    return [kept + _ngrams(_runs(all_words, set(all_words) - set(kept)), ngram) for kept, all_words in zip(words, every)]


def _runs(words: Sequence[str], stop: set[str]) -> list[list[str]]:
    """The stretches of ``words`` between stopwords: only words next to each other in the text form n-grams."""
    runs: list[list[str]] = [[]]
    for word in words:
        if word in stop:
            runs.append([])
        else:
            runs[-1].append(word)
    return runs


def _ngrams(runs: Sequence[Sequence[str]], ngram: int) -> list[str]:
    return [" ".join(r[i : i + n]) for n in range(2, ngram + 1) for r in runs for i in range(len(r) - n + 1)]


def bm25_expectation(store: CorpusStore, cfg: IndexConfig) -> dict[str, Any]:
    """What a BM25 index must have been built from to serve this store and ``index`` section."""
    return {
        "index_type": "bm25",
        "corpus_hash": store.corpus_hash,
        "passages": len(store),
        "k1": float(cfg.bm25_k1),
        "b": float(cfg.bm25_b),
        "method": cfg.bm25_method,
        "stopwords": cfg.bm25_stopwords,
        "text": "title + ' ' + text",
        # recorded only when not bm25s' defaults, so the indexes built before these keys existed stay valid
        **({"ngram": int(cfg.bm25_ngram)} if cfg.bm25_ngram != 1 else {}),
        **({"min_word_chars": int(cfg.bm25_min_word_chars)} if cfg.bm25_min_word_chars != 2 else {}),
        **({"whole_numbers": True} if cfg.bm25_whole_numbers else {}),
        **({"adjacent_pairs": True} if cfg.pairs_adjacent else {}),
    }


class BM25Index:
    """A bm25s model over the rows of a corpus store; searched with question texts."""

    sparse = True  # the Retriever scores question texts with it, not question vectors

    def __init__(self, model: bm25s.BM25, manifest: Mapping[str, Any]) -> None:
        self.model, self.manifest = model, dict(manifest)
        self.index_type = "bm25"
        self.stopwords = self.manifest.get("stopwords")
        self._n = int(self.manifest["passages"])
        self.ngram = int(self.manifest.get("ngram", 1))
        self.min_word_chars = int(self.manifest.get("min_word_chars", 2))
        self.whole_numbers = bool(self.manifest.get("whole_numbers", False))
        self.adjacent_pairs = bool(self.manifest.get("adjacent_pairs", False))

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, store: CorpusStore, cfg: IndexConfig) -> BM25Index:
        """Tokenise every passage of ``store`` (title + text) and index it with the ``index`` section's k1, b, method."""
        expect = bm25_expectation(store, cfg)
        tokens = _tokenize([passage_text(store, r) for r in range(len(store))], cfg.bm25_stopwords,
                           cfg.bm25_ngram, cfg.bm25_min_word_chars, cfg.bm25_whole_numbers, cfg.bm25_adjacent_pairs)
        model = bm25s.BM25(k1=cfg.bm25_k1, b=cfg.bm25_b, method=cfg.bm25_method)
        model.index(tokens, show_progress=False)
        return cls(model, {**expect, "format_version": FORMAT_VERSION, "bm25s_version": bm25s.__version__})

    def save(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write bm25s' files and the manifest into a temporary sibling, then rename it into ``directory``."""
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.model.save(str(tmp), show_progress=False)
            (tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2, sort_keys=True))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return self.manifest

    # ---- loading --------------------------------------------------------------------------------
    @staticmethod
    def check(
        directory: str | os.PathLike[str], *, expect: Mapping[str, Any], rebuild_command: str = "rag-index index=bm25"
    ) -> dict[str, Any]:
        """The manifest of a usable BM25 index built for ``expect``; else an IndexStateError that says why."""
        d = Path(directory)
        hint = f"Rebuild it with: {rebuild_command}   (or delete {d})"
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise IndexMissingError(f"no BM25 index in {d} ({MANIFEST_FILE} is missing). {hint}") from None
        except (OSError, ValueError) as err:
            raise IndexCorruptError(f"{d / MANIFEST_FILE} is unreadable ({err}). {hint}") from err
        differences = manifest_differences(manifest, {"format_version": FORMAT_VERSION, **expect})
        if differences:
            lines = "\n  - ".join(differences)
            raise IndexMismatchError(f"the BM25 index in {d} was built for other inputs:\n  - {lines}\n{hint}")
        return manifest

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, expect: Mapping[str, Any], rebuild_command: str = "rag-index index=bm25"
    ) -> BM25Index:
        manifest = cls.check(directory, expect=expect, rebuild_command=rebuild_command)
        try:
            model = bm25s.BM25.load(str(directory), mmap=True, show_progress=False, verbosity=0)
        except (OSError, ValueError, KeyError) as err:
            raise IndexCorruptError(
                f"bm25s cannot read {directory}: {err}. Rebuild it with: {rebuild_command}   (or delete {directory})"
            ) from err
        if int(model.scores["num_docs"]) != int(manifest["passages"]):
            raise IndexCorruptError(
                f"{directory} indexes {model.scores['num_docs']} passages, its manifest {manifest['passages']}. "
                f"Rebuild it with: {rebuild_command}"
            )
        return cls(model, manifest)

    # ---- searching ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        """BM25 scores (B, N) float32 of every passage for each question (0 for a question with no known word)."""
        out = np.zeros((len(questions), self._n), dtype=np.float32)
        for i, tokens in enumerate(_tokenize(questions, self.stopwords, self.ngram, self.min_word_chars,
                                                 self.whole_numbers, self.adjacent_pairs)):
            if tokens:
                out[i] = self.model.get_scores(tokens)
        return out

    def search_texts(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` passages per question: scores (B, k) float32 and rows (B, k) int64, best first, ties
        to the lower row."""
        if not 0 < k <= self._n:
            raise ValueError(f"k={k} must be between 1 and the number of indexed passages ({self._n})")
        parts = [top_rows(self.scores(questions[start : start + SEARCH_CHUNK]), k)
                 for start in range(0, len(questions), SEARCH_CHUNK)]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def score_rows(self, questions: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """BM25 scores (B, k) of given rows (B, k) for each question."""
        return np.take_along_axis(self.scores(questions), np.asarray(rows, dtype=np.int64), axis=1)


def top_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row of (B, N) scores: scores (B, k) float32 and rows (B, k) int64, best first,
    ties to the lower row."""
    n = scores.shape[1]
    all_scores, all_rows = [], []
    # candidates: every row scoring at least the k-th best, then the exact tie rule on them
    kth = np.partition(scores, n - k, axis=1)[:, n - k]
    for row_scores, threshold in zip(scores, kth):
        candidates = np.flatnonzero(row_scores >= threshold)
        order = np.lexsort((candidates, -row_scores[candidates]))[:k]
        all_rows.append(candidates[order])
        all_scores.append(row_scores[candidates[order]])
    if not all_rows:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.stack(all_scores).astype(np.float32), np.stack(all_rows).astype(np.int64)


# ------------------------------------------------------------------------------------------ mining
@dataclass
class MinedExample:
    """A training question with its positive passage row and hard-negative rows (best BM25 first)."""

    id: str
    question: str
    positive: int
    negatives: list[int]
    gold_rows: list[int] = field(default_factory=list)  # every gold passage of the example in the corpus


@dataclass
class MiningReport:
    """What mining kept and skipped (logged by the DPR stage)."""

    examples: int = 0
    gold_positives: int = 0  # positives named by the QA set
    bm25_positives: int = 0  # positives found by BM25 (no gold passage named, or none in this corpus)
    skipped: int = 0  # no gold passage and no answer in the top `depth` BM25 passages
    short_negatives: int = 0  # examples with fewer hard negatives than asked within `depth`
    skipped_ids: list[str] = field(default_factory=list)  # the first few


def mine(
    index: BM25Index,
    store: CorpusStore,
    examples: Sequence[Any],
    *,
    n_negatives: int,
    depth: int = 100,
    negative_candidates: Sequence[Sequence[int]] | None = None,
) -> tuple[list[MinedExample], MiningReport]:
    """DPR's positives and BM25 hard negatives for QA examples (``id``, ``question``, ``answers``,
    ``gold_passage_ids``, optionally ``hard_negative_ids``).

    Positive: the first gold passage found in the corpus; without one, the highest-ranked BM25 passage (of
    the top ``depth``) that contains an answer, else the example is skipped and counted. Hard negatives:
    the QA set's own hard negatives first (those in the corpus that hold no answer), then the
    highest-ranked BM25 passages that are neither gold nor contain an answer string.
    ``negative_candidates`` (one ranked row list per example, e.g. from a dense index) replaces BM25's
    ranking for the hard negatives, with the same filter.
    """
    if negative_candidates is not None and len(negative_candidates) != len(examples):
        raise ValueError(f"{len(negative_candidates)} candidate lists for {len(examples)} examples")
    depth = min(depth, len(index))
    report = MiningReport()
    mined: list[MinedExample] = []
    for start in range(0, len(examples), SEARCH_CHUNK):
        chunk = examples[start : start + SEARCH_CHUNK]
        _, ranked = index.search_texts([e.question for e in chunk], depth)
        for offset, (example, rows) in enumerate(zip(chunk, ranked.tolist())):
            report.examples += 1
            gold_rows = [r for r in (_row(store, pid) for pid in example.gold_passage_ids) if r is not None]
            answers = example.answers
            texts: dict[int, bool] = {}

            def holds_answer(row: int, answers: Sequence[str] = answers, texts: dict[int, bool] = texts) -> bool:
                if row not in texts:
                    texts[row] = has_answer(passage_text(store, row), answers)
                return texts[row]

            if gold_rows:
                positive = gold_rows[0]
                report.gold_positives += 1
            else:
                positive = next((r for r in rows if holds_answer(r)), None)
                if positive is None:
                    report.skipped += 1
                    if len(report.skipped_ids) < 5:
                        report.skipped_ids.append(example.id)
                    continue
                report.bm25_positives += 1
            given = [r for r in (_row(store, p) for p in getattr(example, "hard_negative_ids", ())) if r is not None]
            negatives: list[int] = []
            ranked_negatives = rows if negative_candidates is None else list(negative_candidates[start + offset])
            for r in [*given, *ranked_negatives]:
                if len(negatives) == n_negatives:
                    break
                if r != positive and r not in gold_rows and r not in negatives and not holds_answer(r):
                    negatives.append(r)
            if len(negatives) < n_negatives:
                report.short_negatives += 1
            mined.append(MinedExample(example.id, example.question, positive, negatives, gold_rows))
    return mined, report


def _row(store: CorpusStore, passage_id: str) -> int | None:
    try:
        return store.row_of(passage_id)
    except KeyError:
        return None
