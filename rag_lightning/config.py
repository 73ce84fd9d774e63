"""Structured configs: typed schemas for the model and training sections, checked at start.

The YAML files under ``conf/`` stay the source of defaults; these dataclasses are the schemas they are
validated against (registered in Hydra's ConfigStore too, for ``--info`` and tooling).  A typo, a wrong
type or an out-of-range value fails before any model is built, with the full key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value is missing, misspelt or out of range; the message names the key and the fix."""


class Mode(str, Enum):
    rag_token = "rag_token"
    rag_sequence = "rag_sequence"
    closed_book = "closed_book"


class SequenceDecoding(str, Enum):
    thorough = "thorough"
    fast = "fast"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    question_encoder_lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 300
    scheduler: str = "linear"  # linear | cosine | constant

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.lr", self.lr)
        _at_least(f"{prefix}.question_encoder_lr", self.question_encoder_lr, 0.0)
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _one_of(f"{prefix}.scheduler", self.scheduler, ("linear", "cosine", "constant"))


@dataclass
class DecodingConfig:
    num_beams: int = 1
    max_new_tokens: int = 24
    sequence_mode: SequenceDecoding = SequenceDecoding.fast

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.num_beams", self.num_beams)
        _positive(f"{prefix}.max_new_tokens", self.max_new_tokens)


@dataclass
class ModelConfig:
    """The `model` section; `question_encoder` and `generator` are their own config groups."""

    mode: Mode = Mode.rag_token
    n_docs: int = 5
    eval_n_docs: int | None = None  # None: same as n_docs
    freeze_question_encoder: bool = False
    # the question encoder stays frozen for this many optimizer steps while the generator learns to read
    question_encoder_warmup_steps: int = 0
    # joint training updates only the top N layers of the question encoder (null: every layer and the
    # embeddings); the frozen bottom's states are computed once per question
    question_encoder_trainable_layers: int | None = None
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    loss_reduction: str = "token_mean"
    # weight of the retriever's contrastive (DPR) loss on gold passages; 0 turns the multi-task term off
    retrieval_loss_weight: float = 0.0
    # training-time augmentation: swap answers between examples in contexts and targets (models/augment.py)
    answer_swap_prob: float = 0.0
    # curriculum: for this many training steps a missed gold passage takes the last retrieved slot
    gold_passage_steps: int = 0
    gradient_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    question_encoder: Any = None
    generator: Any = None

    def check(self, prefix: str = "model") -> None:
        _positive(f"{prefix}.n_docs", self.n_docs)
        if self.eval_n_docs is not None:
            _positive(f"{prefix}.eval_n_docs", self.eval_n_docs)
        _at_least(f"{prefix}.question_encoder_warmup_steps", self.question_encoder_warmup_steps, 0)
        _at_least(f"{prefix}.gold_passage_steps", self.gold_passage_steps, 0)
        if self.question_encoder_trainable_layers is not None:
            _positive(f"{prefix}.question_encoder_trainable_layers", self.question_encoder_trainable_layers)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"{prefix}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _one_of(f"{prefix}.loss_reduction", self.loss_reduction, ("token_mean", "mean", "sum"))
        _at_least(f"{prefix}.retrieval_loss_weight", self.retrieval_loss_weight, 0.0)
        if not 0.0 <= self.answer_swap_prob <= 1.0:
            raise ConfigError(f"{prefix}.answer_swap_prob={self.answer_swap_prob} must be in [0, 1]")
        self.optim.check(f"{prefix}.optim")
        self.decoding.check(f"{prefix}.decoding")


@dataclass
class DataLoaderConfig:
    global_batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0

    def check(self, prefix: str) -> None:
        _positive(f"{prefix}.global_batch_size", self.global_batch_size)
        _positive(f"{prefix}.eval_batch_size", self.eval_batch_size)
        _at_least(f"{prefix}.num_workers", self.num_workers, 0)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _typed(schema: type, node: DictConfig, key: str) -> Any:
    """Merge `node` onto `schema` (unknown keys and wrong types fail) and build the dataclass."""
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        merged = OmegaConf.merge(OmegaConf.structured(schema), resolved)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        full_key = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        reason = str(err).splitlines()[0]
        raise ConfigError(f"config key {full_key}: {reason}") from None


def model_config(cfg: DictConfig) -> ModelConfig:
    """The typed, range-checked `model` section."""
    model = _typed(ModelConfig, cfg.model, "model")
    model.check()
    return model


def dataloader_config(cfg: DictConfig) -> DataLoaderConfig:
    loader = _typed(DataLoaderConfig, cfg.loader, "loader")
    loader.check("loader")
    return loader


def validate(cfg: DictConfig, corpus_size: int | None = None) -> ModelConfig:
    """Check the composed config before anything heavy starts; returns the typed model section."""
    for key in ("data", "model", "trainer", "loader"):
        if key not in cfg:
            raise ConfigError(f"config has no `{key}` section; compose from conf/train.yaml")
    model = model_config(cfg)
    dataloader_config(cfg)
    if corpus_size is not None:
        for key, k in (("model.n_docs", model.n_docs), ("model.eval_n_docs", model.eval_n_docs)):
            if k is not None and model.mode != Mode.closed_book and k > corpus_size:
                raise ConfigError(f"{key}={k} is larger than the corpus ({corpus_size} passages)")
    return model


def register_configs() -> None:
    """Make the schemas visible to Hydra (e.g. `rag-train --info config` and `schema/model`)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="model", node=ModelConfig)
    store.store(group="schema", name="dataloader", node=DataLoaderConfig)
