"""The seq2seq generator (BART): random init from a config for offline runs, or pretrained by name/path."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, PreTrainedTokenizerBase

from rag_lightning.config import ConfigError
from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration
from rag_lightning.retrieval.retriever import SEPARATOR
from rag_lightning.retrieval.store import piece_ids

GENERATOR_KINDS = ("random", "pretrained")


def load_generator_tokenizer_for(cfg: Any) -> PreTrainedTokenizerBase:
    """The generator's tokenizer: a local tokenizer dir (the world set trains one) or the model's own."""
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer

    if cfg.kind == "pretrained" and not cfg.get("tokenizer"):
        return AutoTokenizer.from_pretrained(cfg.name_or_path, trust_remote_code=False)
    return load_generator_tokenizer(cfg.tokenizer)


def build_generator(cfg: Any, tokenizer: PreTrainedTokenizerBase) -> BartForConditionalGeneration:
    """A BART generator whose special-token ids agree with `tokenizer`.

    `kind: random` builds the architecture in `cfg.config` from scratch (the offline default: no model
    hub); `kind: pretrained` loads `cfg.name_or_path`, a hub name or a local `save_pretrained` directory.
    `copy: true` adds the pointer-generator copy head (models/copy_generator.py), and
    `copy_continuation: true` its feature for stepping along a name being copied (and
    `copy_continuation_bigram: true` the same on the last two tokens emitted), and
    `question_match: true` its encoder's exact-match feature between question and passage, and
    `question_match_unique: true` that feature's mark for a matching token that occurs once on its side.
    """
    copy = bool(cfg.get("copy", False))
    continuation = bool(cfg.get("copy_continuation", False))
    bigram = bool(cfg.get("copy_continuation_bigram", False))
    match = bool(cfg.get("question_match", False))
    unique = bool(cfg.get("question_match_unique", False))
    for key, on in (("copy_continuation", continuation), ("copy_continuation_bigram", bigram), ("question_match", match)):
        if on and not copy:
            raise ConfigError(f"model.generator.{key}=true needs model.generator.copy=true")
    if unique and not match:
        raise ConfigError("model.generator.question_match_unique=true needs model.generator.question_match=true")
    model_class = CopyBartForConditionalGeneration if copy else BartForConditionalGeneration
    extra: dict[str, Any] = {"copy_continuation": True} if continuation else {}
    if bigram:
        extra["copy_continuation_bigram"] = True
    if match:  # the separator the retriever puts between question and passage
        extra["question_match_separator"] = piece_ids(tokenizer, SEPARATOR)
        if unique:
            extra["question_match_unique"] = True
    if cfg.kind == "pretrained":
        model = model_class.from_pretrained(cfg.name_or_path, trust_remote_code=False, **extra)
    elif cfg.kind == "random":
        arch = dict(cfg.config)
        config = BartConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_bos_token_id=None,
            forced_eos_token_id=tokenizer.eos_token_id,
            **extra,
            **arch,
        )
        model = model_class(config)
    else:
        raise ConfigError(
            f"model.generator.kind={cfg.kind!r} is not one of {', '.join(GENERATOR_KINDS)}"
        )
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the generator's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
            f"({len(tokenizer)}); set model.generator.tokenizer to the tokenizer the model was trained with"
        )
    return model
