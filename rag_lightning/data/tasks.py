"""Tasks: how a task's inputs and targets are built from its examples, and how its outputs are scored.

The RagModule is task-agnostic: it computes losses, retrieves and generates. A task (chosen by the `task`
config group) decides what the generator reads and writes and which metrics run:

- ``qa``: the question in, its first answer out; SQuAD-style EM/F1 (`val/em`, `val/f1`).
- ``verification`` (FEVER): a claim in, its label (SUPPORTS / REFUTES) generated as text, scored by accuracy;
  ``constrained_decoding`` scores each label and picks the likeliest instead of decoding freely.
- ``generation``: free text, BLEU and BLEU-1 (sacrebleu, corpus-level) and ROUGE-L (torchmetrics); ``factuality``
  checks the numbers and names a generated text states against the example's gold passages (read from
  ``corpus_file`` on first use): the share found there, per output that states any beyond its input.
- ``dialogue`` (Wizard of Wikipedia): the history, one turn per line, newest last, cut from the oldest turn
  to fit the input length; scored like generation. ``generator_turns`` gives the generator only the newest
  turns (the retriever still reads the history).

Wherever examples carry KILT provenance (pages per gold output), the KILT metrics run beside the task's
own: R-precision and recall@k of the retrieved pages, and the KILT scores (a downstream point counts only
where R-precision is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rag_lightning import metrics
from rag_lightning.config import ConfigError, TaskConfig
from rag_lightning.data.readers import QAExample, read_corpus

PER_EXAMPLE = {
    "em": metrics.exact_match,
    "f1": metrics.f1_score,
    "accuracy": lambda prediction, answers: max((metrics.accuracy(prediction, a) for a in answers), default=0.0),
    "rougeL": metrics.rouge_l,
}
CORPUS = {"bleu": metrics.bleu, "bleu1": metrics.bleu1}
NEEDS_EVIDENCE = ("factuality",)  # per-example metrics that read the gold passages' text


class Task:
    """Inputs, targets and scores of one task (see the module docstring)."""

    def __init__(self, config: TaskConfig | None = None, corpus_file: str | None = None) -> None:
        self.cfg = config or TaskConfig()
        self.name = self.cfg.name
        self.primary = self.cfg.monitor  # on the progress bar; picks the best checkpoint (conf/callbacks)
        self.corpus_file = corpus_file  # where `factuality` reads gold passages (the retriever may be absent)
        self._texts: dict[str, str] | None = None

    # ------------------------------------------------------------------ inputs and targets
    def input_text(self, example: QAExample, fits: Callable[[str], bool] | None = None) -> str:
        """What the retriever and the generator read; ``fits`` says whether a text fits the input length."""
        if self.name != "dialogue":
            return example.question.strip()
        turns = [t.strip() for t in example.question.split(self.cfg.turn_separator) if t.strip()]
        return fit_history(turns, fits or (lambda _: True))

    def generator_text(self, input_text: str) -> str:
        """What the generator reads of ``input_text``: all of it, or a dialogue's newest ``generator_turns``."""
        if self.name != "dialogue" or not self.cfg.generator_turns:
            return input_text
        return "\n".join(input_text.split("\n")[-self.cfg.generator_turns :])

    def target_text(self, example: QAExample) -> str:
        """What the generator learns to write: the first answer (the label, for verification)."""
        return example.answers[0].strip() if example.answers else ""

    def candidates(self) -> list[str] | None:
        """The outputs decoding is restricted to, or None for free decoding."""
        return list(self.cfg.labels) if self.cfg.constrained_decoding else None

    # ------------------------------------------------------------------ scores
    def scores(
        self,
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
        *,
        inputs: Sequence[str] | None = None,
        gold_passage_ids: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, list[float | None]]:
        """Per-example metric values (their mean over the values that are not None is the split's score), by
        metric name. ``factuality`` needs the inputs and gold passage ids (None where an output states no fact
        beyond its input, or the example names no gold passage)."""
        out: dict[str, list[float | None]] = {
            name: [PER_EXAMPLE[name](p, a) for p, a in zip(predictions, answers, strict=True)]
            for name in self.cfg.metrics
            if name in PER_EXAMPLE
        }
        if "factuality" in self.cfg.metrics:
            given = inputs if inputs is not None else [""] * len(predictions)
            gold = gold_passage_ids if gold_passage_ids is not None else [[] for _ in predictions]
            out["factuality"] = [
                metrics.factuality(p, self.passage_texts(ids), text) if ids else None
                for p, text, ids in zip(predictions, given, gold, strict=True)
            ]
        return out

    def passage_texts(self, passage_ids: Sequence[str]) -> list[str]:
        """The texts of the named passages of ``corpus_file`` (read once, on first use; unknown ids skipped)."""
        if self._texts is None:
            if not self.corpus_file:
                raise ConfigError(
                    "task.metrics has 'factuality', which reads the gold passages, but no corpus file is known. "
                    "Fix: set data.corpus_file, or drop factuality from task.metrics"
                )
            self._texts = {p.id: p.text for p in read_corpus(self.corpus_file)}
        return [self._texts[i] for i in passage_ids if i in self._texts]

    def corpus_scores(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
        """Metrics of a whole split that are not means of per-example values (BLEU)."""
        return {name: CORPUS[name](predictions, answers) for name in self.cfg.metrics if name in CORPUS}

    @property
    def needs_corpus_scores(self) -> bool:
        return any(name in CORPUS for name in self.cfg.metrics)

    def provenance_scores(
        self,
        retrieved: Sequence[Sequence[str]],
        provenance: Sequence[Sequence[Sequence[str]]],
        downstream: dict[str, list[float | None]],
        ks: Sequence[int],
    ) -> dict[str, list[float | None]]:
        """KILT metrics per example (None where an example has no provenance): `rprec`, `page_recall@k` and
        `kilt_<metric>` for each per-example downstream metric (its value where R-precision is 1, else 0).
        Empty when the task turns them off or no example has provenance."""
        if not self.cfg.kilt_metrics or not any(any(prov) for prov in provenance):
            return {}
        out: dict[str, list[float | None]] = {"rprec": []}
        out.update({f"page_recall@{k}": [] for k in ks})
        downstream = {name: values for name, values in downstream.items() if name not in NEEDS_EVIDENCE}
        out.update({f"kilt_{name}": [] for name in downstream})
        for i, (passages, prov) in enumerate(zip(retrieved, provenance, strict=True)):
            if not any(prov):
                for values in out.values():
                    values.append(None)
                continue
            pages = metrics.ranked_pages(passages)
            rprec = metrics.r_precision(pages, prov)
            out["rprec"].append(rprec)
            for k in ks:
                out[f"page_recall@{k}"].append(metrics.page_recall_at_k(pages, prov, k))
            for name, values in downstream.items():
                value = values[i]
                out[f"kilt_{name}"].append(None if value is None else value * float(rprec == 1.0))
        return out


def fit_history(turns: Sequence[str], fits: Callable[[str], bool]) -> str:
    """The newest turns that fit, oldest dropped first, joined newest last; the newest turn alone is kept
    whole even when it does not fit (the tokenizer then cuts it)."""
    kept: list[str] = []
    for turn in reversed(turns):
        candidate = [turn, *kept]
        if kept and not fits("\n".join(candidate)):
            break
        kept = candidate
    return "\n".join(kept)


def build_task(config: TaskConfig | None = None, corpus_file: str | None = None) -> Task:
    return Task(config, corpus_file)
