"""Train only the top layers of a DPR question encoder, with the frozen bottom's states computed once.

Joint training back-propagates into the question encoder on every step. For MiniLM on 2 CPU cores a full
pass (forward, backward, AdamW over 22.7M weights, half of them the word embeddings) costs more than the
small generator's step. Freezing the embeddings and the lower layers keeps their states a function of
the question alone, so they are computed once per question (without dropout) and only the top layers
run per step. ``encode_top(encode_bottom(x))`` equals the encoder's ``pooler_output`` in eval mode.

DPR pools the [CLS] state, so of the last layer only [CLS]'s row is needed: keys and values of every token,
but one query, one attention output and one feed-forward pass. ``cls_only=True`` computes just that (about
a sixth of the last layer's cost on passages of ~100 tokens), the same vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


def inner_bert(encoder: nn.Module) -> nn.Module:
    """The BertModel inside a DPRQuestionEncoder or DPRContextEncoder."""
    for name in ("question_encoder", "ctx_encoder"):
        inner = getattr(encoder, name, None)
        if inner is not None and hasattr(inner, "bert_model"):
            return inner.bert_model
    raise TypeError(f"{type(encoder).__name__} is not a DPR encoder with a BERT inside")


def _projection(encoder: nn.Module) -> nn.Module | None:
    inner = getattr(encoder, "question_encoder", None) or getattr(encoder, "ctx_encoder", None)
    return getattr(inner, "encode_proj", None)


def n_layers(encoder: nn.Module) -> int:
    return len(inner_bert(encoder).encoder.layer)


def _split(encoder: nn.Module, trainable_layers: int) -> tuple[nn.Module, nn.ModuleList, nn.ModuleList]:
    """The BERT inside ``encoder``, its frozen bottom layers and its ``trainable_layers`` top layers."""
    bert = inner_bert(encoder)
    depth = len(bert.encoder.layer)
    if not 1 <= trainable_layers <= depth:
        raise ValueError(f"trainable_layers={trainable_layers} must be in [1, {depth}]")
    cut = depth - trainable_layers
    return bert, bert.encoder.layer[:cut], bert.encoder.layer[cut:]


def freeze_bottom(encoder: nn.Module, trainable_layers: int) -> None:
    """Stop gradients to the embeddings and to all but the top ``trainable_layers`` transformer layers."""
    bert, bottom, _ = _split(encoder, trainable_layers)
    bert.embeddings.requires_grad_(False)
    bottom.requires_grad_(False)


def _mask(bert: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor):
    return create_bidirectional_mask(config=bert.config, inputs_embeds=states, attention_mask=attention_mask)


@torch.no_grad()
def encode_bottom(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, trainable_layers: int
) -> torch.Tensor:
    """Hidden states (B, L, d) after the embeddings and the frozen layers, computed without dropout."""
    bert, bottom, _ = _split(encoder, trainable_layers)
    was_training = bert.training
    bert.eval()
    try:
        states = bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        mask = _mask(bert, states, attention_mask)
        for layer in bottom:
            states = layer(states, mask)
    finally:
        bert.train(was_training)
    return states


def cls_row_of_layer(layer: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The output (B, 1, d) of a BertLayer at [CLS] only: [CLS] attends to every unmasked token, then the
    feed-forward block runs on that one row. Dropout as the layer applies it, in the layer's mode."""
    attention = layer.attention.self
    batch, length, _ = states.shape
    heads, width = attention.num_attention_heads, attention.attention_head_size
    cls = states[:, :1]
    query = attention.query(cls).view(batch, 1, heads, width).transpose(1, 2)
    key = attention.key(states).view(batch, length, heads, width).transpose(1, 2)
    value = attention.value(states).view(batch, length, heads, width).transpose(1, 2)
    keep = attention_mask.bool()[:, None, None, :]
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=keep, dropout_p=attention.dropout.p if layer.training else 0.0,
        scale=attention.scaling,
    )
    attended = layer.attention.output(attended.transpose(1, 2).reshape(batch, 1, heads * width), cls)
    return layer.output(layer.intermediate(attended), attended)


def encode_top(
    encoder: nn.Module,
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    trainable_layers: int,
    cls_only: bool = False,
) -> torch.Tensor:
    """Vectors (B, d) from bottom states: the top layers (in the encoder's mode), then [CLS] as DPR pools.
    ``cls_only``: the last layer computed at [CLS] only (:func:`cls_row_of_layer`), the same vector."""
    bert, _, top = _split(encoder, trainable_layers)
    mask = _mask(bert, states, attention_mask)
    last = len(top) - 1 if cls_only else len(top)
    for layer in top[:last]:
        states = layer(states, mask)
    if cls_only:
        states = cls_row_of_layer(top[last], states, attention_mask)
    pooled = states[:, 0, :]
    projection = _projection(encoder)
    return projection(pooled) if projection is not None else pooled
