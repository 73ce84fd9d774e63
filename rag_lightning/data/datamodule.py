"""RagDataModule: QA sets tokenised once, batched for every stage (fit, validate, test, predict)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from rag_lightning.config import ConfigError
from rag_lightning.data.readers import QAExample, read_qa
from rag_lightning.data.tasks import Task
from rag_lightning.padding import pad_right

log = logging.getLogger(__name__)


@dataclass
class EncodedQA:
    """One QA example with its token ids for both tokenizers (computed once, at setup)."""

    example: QAExample
    input_text: str  # what the task makes of the example (the question; a claim; a dialogue history)
    question_encoder_ids: list[int]  # retriever tokenizer, with [CLS] ... [SEP]
    question_generator_ids: list[int]  # generator tokenizer, no special tokens
    target_ids: list[int]  # generator tokenizer: the task's target (the first answer) + </s>


class QADataset(Dataset):
    def __init__(self, items: Sequence[EncodedQA]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedQA:
        return self.items[i]


def encode_examples(
    examples: Sequence[QAExample],
    question_tokenizer: PreTrainedTokenizerBase,
    generator_tokenizer: PreTrainedTokenizerBase,
    *,
    max_question_length: int,
    max_answer_length: int,
    task: Task | None = None,
) -> list[EncodedQA]:
    """Tokenise the task's inputs for both models and its target, in one batched call each."""
    task = task or Task()

    def fits(text: str) -> bool:
        return len(question_tokenizer(text)["input_ids"]) <= max_question_length and len(
            generator_tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        ) <= max_question_length

    inputs = [task.input_text(ex, fits) for ex in examples]
    # every generator-side piece starts with one space (see data/pieces.py), so the question
    # ids placed in a context and the answer ids copied from a passage tokenise as they do inside text
    questions = [" " + task.generator_text(text) for text in inputs]
    q_enc = question_tokenizer(inputs, truncation=True, max_length=max_question_length)["input_ids"]
    q_gen = generator_tokenizer(  # one token more than kept, to tell the inputs that were cut
        questions, add_special_tokens=False, truncation=True, max_length=max_question_length + 1
    )["input_ids"]
    cut = [ex.id for ex, ids in zip(examples, q_gen, strict=True) if len(ids) > max_question_length]
    if cut:
        log.warning(
            "%d question(s) longer than max_question_length=%d tokens were cut to it (first: %s); raise "
            "max_question_length=... to keep more",
            len(cut),
            max_question_length,
            cut[0],
        )
        q_gen = [ids[:max_question_length] for ids in q_gen]
    answers = [" " + task.target_text(ex) if ex.answers else "" for ex in examples]
    a_gen = generator_tokenizer(
        answers, add_special_tokens=False, truncation=True, max_length=max_answer_length - 1
    )["input_ids"]
    eos = generator_tokenizer.eos_token_id
    return [
        EncodedQA(ex, text, list(qe), list(qg), list(a) + [eos])
        for ex, text, qe, qg, a in zip(examples, inputs, q_enc, q_gen, a_gen, strict=True)
    ]


class SameRelationAnswers:
    """The distinct answers of each relation of a training set, for answer swapping within a relation.

    A swapped example's answer is replaced, in its passages and its target, by another answer of its relation (a
    capital by a capital, a population by a population), so the passage still reads as a fact of the world and
    only reading it gives the new answer: what a model must do when its index is swapped for one with new facts.
    """

    def __init__(self, items: Sequence[EncodedQA]) -> None:
        pools: dict[str, dict[tuple[int, ...], int]] = {}
        for it in items:
            if it.example.relation and len(it.target_ids) > 1:
                pool = pools.setdefault(it.example.relation, {})
                pool.setdefault(tuple(it.target_ids[:-1]), len(pool))  # the answer without </s>
        self._index = pools
        self._answers = {relation: list(pool) for relation, pool in pools.items()}

    def __len__(self) -> int:
        return len(self._answers)

    def relation_sizes(self) -> dict[str, int]:
        return {relation: len(answers) for relation, answers in self._answers.items()}

    def draw(self, item: EncodedQA) -> list[int]:
        """Another answer of the item's relation, drawn uniformly (torch's generator, so seeded runs repeat);
        [] when the relation has no other answer."""
        answers = self._answers.get(item.example.relation, [])
        own = self._index.get(item.example.relation, {}).get(tuple(item.target_ids[:-1]))
        choices = len(answers) - (own is not None)
        if choices < 1:
            return []
        j = int(torch.randint(choices, ()))
        if own is not None and j >= own:
            j += 1
        return list(answers[j])


class Collator:
    """Pads a list of EncodedQA into the tensors a RAG step needs; strings ride along for metrics, and
    ``split`` names the split the batch comes from (the prefix of its metrics). With ``swap_pool`` each batch
    also carries ``swap_answers``: per example, another answer of its relation (token ids, [] for none)."""

    def __init__(
        self,
        question_pad_id: int,
        generator_pad_id: int,
        decoder_start_id: int,
        split: str = "",
        swap_pool: SameRelationAnswers | None = None,
    ) -> None:
        self.question_pad_id = question_pad_id
        self.generator_pad_id = generator_pad_id
        self.decoder_start_id = decoder_start_id
        self.split = split
        self.swap_pool = swap_pool

    def __call__(self, items: Sequence[EncodedQA]) -> dict:
        q_ids, q_mask = pad_right([it.question_encoder_ids for it in items], self.question_pad_id)
        qg_ids, qg_mask = pad_right([it.question_generator_ids for it in items], self.generator_pad_id)
        labels, _ = pad_right([it.target_ids for it in items], self.generator_pad_id)
        decoder_input_ids = torch.full_like(labels, self.generator_pad_id)
        decoder_input_ids[:, 0] = self.decoder_start_id
        decoder_input_ids[:, 1:] = labels[:, :-1]
        batch = {
            "question_input_ids": q_ids,
            "question_attention_mask": q_mask,
            "question_generator_ids": qg_ids,
            "question_generator_mask": qg_mask,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
            "ids": [it.example.id for it in items],
            "questions": [it.input_text for it in items],
            "answers": [list(it.example.answers) for it in items],
            "gold_passage_ids": [list(it.example.gold_passage_ids) for it in items],
            "provenance": [[list(pages) for pages in it.example.provenance] for it in items],
            "split": self.split,
        }
        if self.swap_pool is not None:
            batch["swap_answers"] = [self.swap_pool.draw(it) for it in items]
        return batch


class RagDataModule(L.LightningDataModule):
    """QA sets for fit, and loaders of any named split, QA file or list of questions for test and predict.

    Stage state is passed explicitly: ``trainer.fit(module, datamodule=dm)``, then
    ``trainer.test(module, dataloaders=dm.test_loader("test_seen"))`` or ``dm.predict_loader(questions)``.
    The per-device training batch is the global batch / world size.
    """

    def __init__(
        self,
        *,
        files: dict[str, str | None],
        question_tokenizer: PreTrainedTokenizerBase,
        generator_tokenizer: PreTrainedTokenizerBase,
        global_batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        max_question_length: int = 64,
        max_answer_length: int = 32,
        skip_bad_rows: bool = False,
        task: Task | None = None,
        extra_train_files: dict[str, str] | None = None,
        same_relation_swaps: bool = False,
    ) -> None:
        """``same_relation_swaps``: training batches carry, per example, another answer of its relation (the
        donors of ``model.answer_swap_donors=relation``); the train questions must name their relation."""
        super().__init__()
        self.task = task or Task()
        self.files = dict(files)  # split name -> QA file: train, val, test, test_seen, ...
        self.extra_train_files = dict(extra_train_files or {})  # name -> file, mixed into train (multi-task)
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_question_length = max_question_length
        self.max_answer_length = max_answer_length
        self.skip_bad_rows = skip_bad_rows
        self.same_relation_swaps = same_relation_swaps
        self._datasets: dict[tuple[str, str], QADataset] = {}

    def dataset(self, split: str, path: str | None = None) -> QADataset:
        """The encoded split (from ``path`` when given, else the split's configured file), read once."""
        path = path or self.files.get(split)
        if not path:
            raise ConfigError(f"no QA file is configured for split {split!r} (data.{split}_file)")
        if not Path(path).is_file():
            raise ConfigError(f"QA file for split {split!r} not found: {path}")
        if (split, path) not in self._datasets:
            self._datasets[split, path] = self._encode(read_qa(path, skip_bad_rows=self.skip_bad_rows))
        return self._datasets[split, path]

    def _encode(self, examples: Sequence[QAExample]) -> QADataset:
        return QADataset(
            encode_examples(
                examples,
                self.question_tokenizer,
                self.generator_tokenizer,
                max_question_length=self.max_question_length,
                max_answer_length=self.max_answer_length,
                task=self.task,
            )
        )

    def per_device_batch_size(self) -> int:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"loader.global_batch_size={self.global_batch_size} is not divisible by the world size "
                f"({world_size} processes); choose a multiple of {world_size}"
            )
        return self.global_batch_size // world_size

    def _loader(
        self,
        dataset: QADataset,
        split: str,
        batch_size: int,
        shuffle: bool,
        swap_pool: SameRelationAnswers | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=Collator(
                self.question_tokenizer.pad_token_id,
                self.generator_tokenizer.pad_token_id,
                self.generator_tokenizer.eos_token_id,  # BART starts decoding from </s>
                split,
                swap_pool,
            ),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataset(self) -> QADataset:
        """The train split: the train file and every extra training file, one dataset the loader shuffles."""
        if not self.extra_train_files:
            return self.dataset("train")
        parts = {"train": self.dataset("train")}
        parts.update({name: self.dataset(f"train.{name}", path) for name, path in self.extra_train_files.items()})
        log.info("training on %s", " + ".join(f"{len(part):,} ({name})" for name, part in parts.items()))
        return QADataset([item for part in parts.values() for item in part.items])

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        pool = self.swap_pool(dataset) if self.same_relation_swaps else None
        return self._loader(dataset, "train", self.per_device_batch_size(), shuffle=True, swap_pool=pool)

    def swap_pool(self, dataset: QADataset) -> SameRelationAnswers:
        """The train set's answers by relation; an error naming the file when no train question has one."""
        pool = SameRelationAnswers(dataset.items)
        if not pool:
            raise ConfigError(
                f"model.answer_swap_donors=relation swaps answers within a relation, but no question of the train "
                f"file {self.files.get('train')} names one. Fix: give each row a \"relation\" string (the kind of "
                "fact asked, e.g. \"capital\"), or model.answer_swap_donors=batch"
            )
        sizes = pool.relation_sizes()
        log.info(
            "answer swapping within relations: %d relations, %d distinct answers (fewest: %s)",
            len(sizes),
            sum(sizes.values()),
            min(sizes.items(), key=lambda kv: kv[1]),
        )
        return pool

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), "val", self.eval_batch_size, shuffle=False)

    def test_loader(self, split: str, path: str | None = None) -> DataLoader:
        """The named split (its configured file, or ``path``), in order; its metrics are named after it."""
        return self._loader(self.dataset(split, path), split, self.eval_batch_size, shuffle=False)

    def predict_loader(self, questions: Sequence[str]) -> DataLoader:
        """Questions without answers, for rag-predict."""
        examples = [QAExample(f"q{i}", q, [], []) for i, q in enumerate(questions)]
        return self._loader(self._encode(examples), "predict", self.eval_batch_size, shuffle=False)
