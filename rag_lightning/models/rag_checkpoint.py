"""transformers RAG checkpoints, both ways.

In: a `RagTokenForGeneration` / `RagSequenceForGeneration` directory (or hub name) initialises our question
encoder and generator, with its tokenizers (`question_encoder_tokenizer/`, `generator_tokenizer/`, as
`RagTokenizer` saves them). A RAG checkpoint holds no context encoder; unless one is named, ours starts from the
question encoder's weights (as `minilm` and `tiny` start both encoders from the same weights).

Out: our question encoder and generator as a directory that `RagTokenForGeneration.from_pretrained` (or
`RagSequenceForGeneration`, by the mode) and `RagTokenizer.from_pretrained` load. The weights are the same
modules, so transformers' loss and generated ids on the same contexts and doc scores are ours (the math agrees:
tests/test_marginalize.py, tests/test_decoding.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoTokenizer,
    BartForConditionalGeneration,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedTokenizerBase,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

QUESTION_TOKENIZER_DIR = "question_encoder_tokenizer"
GENERATOR_TOKENIZER_DIR = "generator_tokenizer"
RAG_CLASSES = {"rag_token": RagTokenForGeneration, "rag_sequence": RagSequenceForGeneration}


def _local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).is_dir()


def load_rag(name_or_path: str | Path) -> RagTokenForGeneration:
    """The whole RAG model of a checkpoint (token or sequence: the weights are the same), without retriever."""
    return RagTokenForGeneration.from_pretrained(str(name_or_path), local_files_only=_local(name_or_path)).eval()


def rag_question_encoder(name_or_path: str | Path) -> DPRQuestionEncoder:
    return load_rag(name_or_path).rag.question_encoder


def context_encoder_like(question_encoder: DPRQuestionEncoder) -> DPRContextEncoder:
    """A DPR context encoder with the question encoder's shape and weights."""
    context = DPRContextEncoder(question_encoder.config)
    context.ctx_encoder.load_state_dict(question_encoder.question_encoder.state_dict(), strict=True)
    return context.eval()


def rag_generator(
    name_or_path: str | Path, model_class: type[BartForConditionalGeneration] = BartForConditionalGeneration,
    **config_extra: Any,
) -> BartForConditionalGeneration:
    """The checkpoint's BART generator; with ``model_class`` a subclass (the copy head), its own new layers start
    from their initialisation and every BART weight from the checkpoint."""
    generator = load_rag(name_or_path).rag.generator
    if model_class is type(generator) and not config_extra:
        return generator
    config = generator.config
    for key, value in config_extra.items():
        setattr(config, key, value)
    model = model_class(config)
    missing, unexpected = model.load_state_dict(generator.state_dict(), strict=False)
    own = {name for name, _ in model.named_parameters()} - {name for name, _ in generator.named_parameters()}
    if unexpected or set(missing) - own:
        raise ValueError(f"{name_or_path}: the generator does not fit {model_class.__name__}: missing "
                         f"{sorted(set(missing) - own)[:8]}, unexpected {sorted(unexpected)[:8]}")
    return model.eval()


def rag_tokenizer(name_or_path: str | Path, which: str) -> PreTrainedTokenizerBase:
    """The checkpoint's question encoder (``which="question"``) or generator tokenizer."""
    subfolder = QUESTION_TOKENIZER_DIR if which == "question" else GENERATOR_TOKENIZER_DIR
    return AutoTokenizer.from_pretrained(str(name_or_path), subfolder=subfolder, local_files_only=_local(name_or_path),
                                         trust_remote_code=False)


def save_rag(
    question_encoder: DPRQuestionEncoder,
    generator: nn.Module,
    question_tokenizer: PreTrainedTokenizerBase,
    generator_tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    *,
    mode: str,
    n_docs: int,
    label_smoothing: float = 0.0,
    exclude_bos_score: bool = False,
) -> Path:
    """Write a directory `RagTokenForGeneration` / `RagSequenceForGeneration` (by ``mode``) and `RagTokenizer`
    load with `from_pretrained`. Refuses what transformers' RAG cannot hold: the copy head, closed book."""
    if mode not in RAG_CLASSES:
        raise ValueError(f"mode {mode!r} has no transformers RAG class (only {', '.join(RAG_CLASSES)})")
    if type(generator) is not BartForConditionalGeneration:
        raise ValueError(
            f"the generator is a {type(generator).__name__}: transformers' RAG would load it as plain BART and "
            "drop its own layers (the copy head); train without model.generator.copy to export a RAG checkpoint"
        )
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=n_docs, label_smoothing=label_smoothing,
        exclude_bos_score=exclude_bos_score,
    )
    model = RAG_CLASSES[mode](config=config, question_encoder=question_encoder, generator=generator)
    directory = Path(directory)
    model.save_pretrained(directory)
    RagTokenizer(question_encoder=question_tokenizer, generator=generator_tokenizer).save_pretrained(str(directory))
    return directory
