"""The seq2seq generator (BART): random init from a config for offline runs, or pretrained by name/path."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, PreTrainedTokenizerBase

from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration

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
    `copy: true` adds the pointer-generator copy head (models/copy_generator.py).
    """
    model_class = CopyBartForConditionalGeneration if cfg.get("copy", False) else BartForConditionalGeneration
    if cfg.kind == "pretrained":
        model = model_class.from_pretrained(cfg.name_or_path, trust_remote_code=False)
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
            **arch,
        )
        model = model_class(config)
    else:
        raise ValueError(
            f"model.generator.kind={cfg.kind!r} is not one of {', '.join(GENERATOR_KINDS)}"
        )
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the generator's vocabulary ({model.config.vocab_size}) is smaller than its tokenizer's "
            f"({len(tokenizer)}); set model.generator.tokenizer to the tokenizer the model was trained with"
        )
    return model
