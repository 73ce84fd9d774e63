"""BART with a pointer-generator copy head: p(y_t) = g p_vocab(y_t) + (1 - g) sum_{i: x_i = y_t} a_ti.

A generator trained from scratch on a small corpus memorises frequent answers instead of reading; a copy
head lets it emit any token of its context (a rare city name, a population figure) by pointing at it.
RAG needs nothing else from the generator than p(y_t | x, z, y_<t), so both marginalisations and both
decoders work unchanged: `logits` here are the mixture's log-probabilities (log_softmax leaves them as
they are).

The pointer needs the source token ids at every decoding step, also when decoders pass only cached
encoder outputs.  The encoder therefore returns its hidden states with one extra channel that holds the
token ids (float32, exact below 2**24); any expansion or reordering a decoder applies to encoder outputs
carries the ids along.  The extra channel is stripped before the decoder sees the states.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput


def copy_mixture_log_probs(
    vocab_logits: torch.Tensor,
    copy_attention: torch.Tensor,
    source_ids: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """log(g p_vocab + (1 - g) p_copy), computed in float32.

    vocab_logits (N, T, V); copy_attention (N, T, S), each row a distribution over source positions;
    source_ids (N, S) the token at each source position; gate (N, T) the probability of generating.
    """
    vocab_log_p = torch.log_softmax(vocab_logits.float(), dim=-1)
    copy_p = torch.zeros_like(vocab_log_p)
    index = source_ids[:, None, :].expand(-1, copy_attention.shape[1], -1)
    copy_p.scatter_add_(-1, index, copy_attention.float())
    gate = gate.float().clamp(1e-6, 1 - 1e-6)[..., None]
    return torch.logaddexp(vocab_log_p + gate.log(), copy_p.clamp_min(1e-20).log() + (1 - gate).log())


class _EncoderWithIds(nn.Module):
    """The BART encoder, returning its states with the source token ids as one more channel."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> BaseModelOutput:
        kwargs.pop("return_dict", None)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        states = torch.cat([out.last_hidden_state.float(), input_ids[..., None].float()], dim=-1)
        return BaseModelOutput(last_hidden_state=states)


class CopyBartForConditionalGeneration(BartForConditionalGeneration):
    """BART whose output distribution mixes generating from the vocabulary with copying from the input."""

    def __init__(self, config: BartConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.copy_query = nn.Linear(d, d, bias=False)
        self.copy_key = nn.Linear(d, d, bias=False)
        self.copy_gate = nn.Linear(2 * d, 1)
        self.post_init()

    def get_encoder(self, *args, **kwargs) -> nn.Module:
        return _EncoderWithIds(self.model.encoder)

    def _split(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if states.shape[-1] != self.config.d_model + 1:
            raise ValueError(
                "CopyBart needs encoder outputs from its own get_encoder() (states with a token-id channel)"
            )
        hidden = states[..., :-1].to(self.lm_head.weight.dtype)
        return hidden, states[..., -1].round().long()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache=None,
        use_cache=None,
        labels=None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        states = encoder_outputs[0]
        hidden, source_ids = self._split(states)
        if attention_mask is None:
            attention_mask = (source_ids != self.config.pad_token_id).long()
        out = self.model(
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=(hidden,),
            cache=cache if cache is not None else kwargs.get("past_key_values"),
            use_cache=use_cache,
            return_dict=True,
        )
        dec = out.last_hidden_state
        vocab_logits = self.lm_head(dec) + self.final_logits_bias.to(dec.device)
        scores = self.copy_query(dec) @ self.copy_key(hidden).transpose(1, 2) / math.sqrt(dec.shape[-1])
        scores = scores.float().masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        context = attention.to(hidden.dtype) @ hidden
        gate = torch.sigmoid(self.copy_gate(torch.cat([dec, context], dim=-1))).squeeze(-1)
        logits = copy_mixture_log_probs(vocab_logits, attention, source_ids, gate)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(
                logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=self.config.pad_token_id
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            encoder_last_hidden_state=states,
        )
