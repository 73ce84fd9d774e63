"""Shared helpers for the RAG-core tests: tiny random models and transformers' RAG classes around them.

The reference classes wrap the *same* generator / question-encoder modules, so any difference in the numbers
comes from the marginalisation or decoding code, not the weights. No retriever: every call passes
``context_input_ids``, ``context_attention_mask`` and ``doc_scores`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

BOS, PAD, EOS = 0, 1, 2
VOCAB = 64


def bart_config(**overrides) -> BartConfig:
    """A 1+1-layer BART, dropout off. ``init_std`` is large so random models prefer different tokens for
    different passages (with the default 0.02 every context decodes to the same repeated token)."""
    kwargs = {
        "vocab_size": VOCAB,
        "d_model": 24,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 64,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "init_std": 0.3,
        "bos_token_id": BOS,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "decoder_start_token_id": EOS,
        "forced_eos_token_id": EOS,
    }
    kwargs.update(overrides)
    return BartConfig(**kwargs)


def dpr_config() -> DPRConfig:
    return DPRConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_generator(seed: int = 0, eos_bias: float = 0.0, **overrides) -> BartForConditionalGeneration:
    """Random-init float32 BART in eval mode; ``eos_bias`` raises EOS's logit so answers end early."""
    torch.manual_seed(seed)
    generator = BartForConditionalGeneration(bart_config(**overrides)).eval()
    with torch.no_grad():
        generator.final_logits_bias[0, EOS] += eos_bias
    return generator


def tiny_question_encoder(seed: int = 1) -> DPRQuestionEncoder:
    torch.manual_seed(seed)
    return DPRQuestionEncoder(dpr_config()).eval()


def reference(
    kind: str,
    generator: BartForConditionalGeneration,
    question_encoder: DPRQuestionEncoder,
    n_docs: int,
    label_smoothing: float = 0.0,
) -> RagTokenForGeneration | RagSequenceForGeneration:
    """transformers' RAG model of ``kind`` ("token" / "sequence") around the given modules.

    Label smoothing is read from the config by transformers 5 (not a forward argument), so it is set there.
    """
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=n_docs, label_smoothing=label_smoothing
    )
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    return cls(config=config, question_encoder=question_encoder, generator=generator).eval()


def contexts(
    batch: int, n_docs: int, length: int = 9, seed: int = 0, padded: bool = True
) -> tuple[Tensor, Tensor]:
    """Random (B*K, S) context ids, BOS .. EOS framed, right-padded (pad token where the mask is 0) unless
    ``padded`` is False."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch * n_docs, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (batch * n_docs,), generator=gen)
    if not padded:
        lengths.fill_(length)
    positions = torch.arange(length)
    ids[:, 0] = BOS
    ids[torch.arange(batch * n_docs), lengths - 1] = EOS
    mask = (positions < lengths.unsqueeze(1)).long()
    return ids.masked_fill(mask.eq(0), PAD), mask


def decoder_inputs(batch: int, length: int = 7, seed: int = 0, bos_first: bool = False) -> Tensor:
    """Teacher-forcing decoder inputs ``[EOS(start), (BOS), tokens..., EOS, PAD...]`` of varied lengths >= 2."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    ids[:, 0] = EOS
    if bos_first:
        ids[:, 1] = BOS
    ends = torch.randint(3, length, (batch,), generator=gen)
    ends[0] = length - 1  # one row without padding
    rows = torch.arange(batch)
    ids[rows, ends] = EOS
    return ids.masked_fill(torch.arange(length) > ends.unsqueeze(1), PAD)


def doc_scores(batch: int, n_docs: int, seed: int = 0, scale: float = 2.0) -> Tensor:
    return torch.randn(batch, n_docs, generator=torch.Generator().manual_seed(seed)) * scale
