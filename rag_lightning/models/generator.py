"""The seq2seq generator (BART): random init from a config for offline runs, or pretrained by name/path."""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoConfig,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from rag_lightning.config import ConfigError, GeneratorConfig
from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
from rag_lightning.data.pieces import SEPARATOR, piece_ids
from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration


def generator_tokenizer(cfg: GeneratorConfig) -> PreTrainedTokenizerBase:
    """The generator's tokenizer: a local tokenizer dir (the world set trains one) or the model's own."""
    if cfg.kind == "pretrained" and not cfg.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=False)
    if cfg.kind == "rag" and not cfg.tokenizer:
        from rag_lightning.models.rag_checkpoint import rag_tokenizer

        return rag_tokenizer(cfg.name_or_path, "generator")
    return load_generator_tokenizer(cfg.tokenizer)


def build_generator(
    cfg: GeneratorConfig, tokenizer: PreTrainedTokenizerBase, question_dim: int | None = None
) -> BartForConditionalGeneration:
    """A BART generator whose special-token ids agree with `tokenizer`.

    `question_dim` (the question encoder's width) sizes the projection of `cfg.question_view`.
    `kind: random` builds the architecture in `cfg.config` from scratch (the offline default: no model
    hub); `kind: pretrained` loads `cfg.name_or_path`, a hub name or a local `save_pretrained` directory;
    `kind: rag` the generator of a transformers RAG checkpoint (models/rag_checkpoint.py).
    The copy head and its features are options of GeneratorConfig (see models/copy_generator.py).
    """
    model_class = CopyBartForConditionalGeneration if cfg.copy else BartForConditionalGeneration
    extra: dict[str, Any] = {"copy_continuation": True} if cfg.copy_continuation else {}
    if cfg.copy_continuation_bigram:
        extra["copy_continuation_bigram"] = True
    if cfg.question_match:  # the separator the retriever puts between question and passage
        extra["question_match_separator"] = piece_ids(tokenizer, SEPARATOR)
        if cfg.question_match_unique:
            extra["question_match_unique"] = True
        if cfg.question_match_distance:
            extra["question_match_distance"] = int(cfg.question_match_distance)
    if cfg.question_view:
        if not question_dim:
            raise ValueError("model.generator.question_view needs the question encoder's width (question_dim)")
        extra["question_view_dim"] = int(question_dim)
    if cfg.kind == "pretrained":
        # the copy head's options go into the loaded config (from_pretrained would pass unknown keywords to
        # __init__); a plain BART checkpoint then gets the head's new layers from their initialisation
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=False)
        for key, value in extra.items():
            setattr(config, key, value)
        model = model_class.from_pretrained(cfg.name_or_path, config=config, trust_remote_code=False)
    elif cfg.kind == "rag":
        from rag_lightning.models.rag_checkpoint import rag_generator

        model = rag_generator(cfg.name_or_path, model_class, **extra)
    else:
        ids = {
            "vocab_size": len(tokenizer),  # a larger one in cfg.config wins (the bart-base-shaped benchmark's)
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_bos_token_id": None,
            "forced_eos_token_id": tokenizer.eos_token_id,
        }
        config = BartConfig(**{**ids, **extra, **cfg.config})
        model = model_class(config)
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"the generator's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
            f"({len(tokenizer)}); set model.generator.tokenizer to the tokenizer the model was trained with"
        )
    return model
