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

With ``config.copy_continuation`` the pointer also sees, at each step, which source positions follow an
occurrence of the token just emitted (the decoder's input), weighted by a learned function of the decoder
state.  A model trained from scratch otherwise has to learn from positions alone to step one token to the
right after copying the first piece of a name, and tends to land one piece off ("Khartoum" -> "artoum").
The feature needs only the current decoder input, so cached step-by-step decoding is unchanged.

With ``config.question_match_separator`` (the token ids of the context separator ``" //"``) the encoder adds
a learned embedding to every token that also occurs on the other side of the first separator: a passage
word the question uses, a question word the passage uses.  This is DrQA's exact-match feature; it tells a
model trained from scratch where in the passage the question's subject and relation are named, which it
otherwise has to discover through attention alone. ``config.question_match_unique`` also tells apart a
matching token that occurs once on its side from one that repeats (see ``question_match_feature``).
``config.question_match_distance`` (D > 0, with the unique mark) also tells each token how far it stands after,
and how far before, the nearest such once-occurring match on its side (1..D; further or none: 0), a learned
embedding for each.  In "The currency of Taiwan is the New Taiwan Dollar" the answer starts a few tokens after
the relation word the question names; the distance says so for any country, so the pointer can learn where the
answer stands instead of which answers it saw for which country (the shortcut a model trained from scratch
takes for entities it was trained on, and which fails for held-out ones).

With ``config.question_view_dim`` (the question encoder's width) the encoder also takes ``question_view``
(N, question_view_dim), one vector per context: the retriever's vector of the question, projected and added
to the first position's embedding.  A generator trained from scratch knows a relation only by the words of
its training phrasings; the pretrained question encoder places a paraphrase near them, and the projection
hands that to the reader ("How many people call X home?" next to "What is the population of X?").
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput


def continuation_feature(source_ids: torch.Tensor, decoder_input_ids: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """(N, T, S) float: 1 where the source token ``lag`` positions before i equals the decoder input at step t."""
    previous = torch.full_like(source_ids, -1)
    previous[:, lag:] = source_ids[:, :-lag]
    return (previous[:, None, :] == decoder_input_ids[:, :, None]).float()


def bigram_continuation_feature(
    source_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    history: torch.Tensor | None = None,
    follows: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T, S) float: 1 where the two source tokens before position i equal the last two tokens emitted.

    ``history`` (N, 1) is the token emitted before ``decoder_input_ids[:, 0]`` (cached decoding feeds one
    token at a time); without it the first step has no predecessor and its feature is 0.  Where the unigram
    feature fires after every comma of every number, this one fires only after the comma that follows the
    piece just copied ("2,724,900": after "724 ," only "900" continues). ``follows`` is the unigram
    feature when the caller has it already."""
    previous = previous_tokens(decoder_input_ids, history)
    if follows is None:
        follows = continuation_feature(source_ids, decoder_input_ids)
    return follows * continuation_feature(source_ids, previous, lag=2)


def previous_tokens(decoder_input_ids: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """(N, T): the token emitted before each decoder input; -2 (no token) before the first without history."""
    before = torch.full_like(decoder_input_ids[:, :1], -2) if history is None else history.to(decoder_input_ids)
    return torch.cat([before, decoder_input_ids[:, :-1]], dim=1)


def separator_start(input_ids: torch.Tensor, separator: list[int]) -> torch.Tensor:
    """(N,) the position of the first ``separator`` in each row, S where there is none."""
    n, s = input_ids.shape
    m = len(separator)
    found = torch.ones(n, s - m + 1, dtype=torch.bool, device=input_ids.device)
    for j, token in enumerate(separator):
        found &= input_ids[:, j : s - m + 1 + j] == token
    has = found.any(dim=1)
    return torch.where(has, found.float().argmax(dim=1), torch.full_like(has, s, dtype=torch.long))


def question_match_feature(
    input_ids: torch.Tensor,
    separator: list[int],
    special_ids: list[int],
    *,
    mark_unique: bool = False,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, S) long: 1 for a token whose id also occurs on the other side of the first ``separator``.

    With ``mark_unique`` a matching token that occurs only once on its own side gets 2 instead (DrQA's
    term-frequency feature, reduced to what matters here): in a passage that names its subject eight
    times, the one matching word that occurs once is the relation the question asks about.
    Rows without the separator get all zeros; special tokens and the separator itself never match.
    ``start``: ``separator_start(input_ids, separator)`` when the caller has it already."""
    s, m = input_ids.shape[1], len(separator)
    first = separator_start(input_ids, separator) if start is None else start
    positions = torch.arange(s, device=input_ids.device)[None, :]
    before = positions < first[:, None]
    after = positions >= first[:, None] + m  # rows without the separator: first = S, nothing after
    ordinary = torch.ones_like(input_ids, dtype=torch.bool)
    for token in special_ids:
        ordinary &= input_ids != token
    same = input_ids[:, :, None] == input_ids[:, None, :]
    in_after = (same & (after & ordinary)[:, None, :]).any(dim=-1)
    in_before = (same & (before & ordinary)[:, None, :]).any(dim=-1)
    match = ((before & in_after) | (after & in_before)) & ordinary
    if not mark_unique:
        return match.long()
    count_before = (same & before[:, None, :]).sum(dim=-1)
    count_after = (same & after[:, None, :]).sum(dim=-1)
    count = torch.where(before, count_before, count_after)  # occurrences on the token's own side
    return match.long() * (1 + (count == 1).long())


def match_distance_feature(
    match: torch.Tensor, start: torch.Tensor, separator_length: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each token stands after and before the nearest once-occurring match (level 2) on its side.

    match (N, S) from ``question_match_feature(..., mark_unique=True)``; start (N,) from ``separator_start``
    and separator_length the separator's tokens: they split the two sides.
    Returns two (N, S) long tensors, ``after`` and ``before``: the distance 1..limit to the nearest level-2
    token before (after) the token on its own side, 0 where there is none within ``limit``; a level-2 token
    counts only the others, and the separator's own tokens get 0."""
    n, s = match.shape
    positions = torch.arange(s, device=match.device)[None, :].expand(n, s)
    start = start[:, None]
    side = (positions >= start).long() + (positions >= start + separator_length).long()  # 0 q, 1 sep, 2 passage

    def since_last(marks: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        # the position of the last mark strictly before each token (-1: none), then the distance to it
        seen = torch.where(marks, positions, torch.full_like(positions, -1))
        last = torch.cummax(seen, dim=1).values
        last = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
        distance = positions - last
        same_side = side.gather(1, last.clamp_min(0)) == side
        ok = (last >= 0) & same_side & (side != 1) & (distance <= limit)
        return torch.where(ok, distance, torch.zeros_like(distance))

    unique = match == 2
    after = since_last(unique, side)
    before = since_last(unique.flip(1), side.flip(1)).flip(1)
    return after, before


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

    def __init__(
        self,
        encoder: nn.Module,
        match_embedding: nn.Embedding | None,
        config: BartConfig,
        view_projection: nn.Linear | None = None,
        distance_embeddings: tuple[nn.Embedding, nn.Embedding] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.match_embedding = match_embedding
        self.distance_embeddings = distance_embeddings
        self.view_projection = view_projection
        self.separator = list(getattr(config, "question_match_separator", None) or [])
        self.mark_unique = bool(getattr(config, "question_match_unique", False))
        self.special_ids = [i for i in (config.pad_token_id, config.bos_token_id, config.eos_token_id) if i is not None]

    def forward(self, input_ids=None, attention_mask=None, question_view=None, **kwargs) -> BaseModelOutput:
        kwargs.pop("return_dict", None)
        if (self.view_projection is None) != (question_view is None):
            raise ValueError(
                "this generator reads the question encoder's view: pass question_view (one vector per context)"
                if question_view is None
                else "question_view was given, but this generator has no view projection (question_view_dim)"
            )
        if self.match_embedding is not None or question_view is not None:
            embeds = self.encoder.embed_tokens(input_ids)
            if self.match_embedding is not None:
                start = separator_start(input_ids, self.separator)  # shared by both features
                match = question_match_feature(
                    input_ids, self.separator, self.special_ids, mark_unique=self.mark_unique, start=start
                )
                embeds = embeds + self.match_embedding(match)
                if self.distance_embeddings is not None:
                    after_table, before_table = self.distance_embeddings
                    after, before = match_distance_feature(
                        match, start, len(self.separator), after_table.num_embeddings - 1
                    )
                    embeds = embeds + after_table(after) + before_table(before)
            if question_view is not None:
                first = torch.zeros_like(embeds)
                first[:, 0] = self.view_projection(question_view.to(embeds.dtype))
                embeds = embeds + first
            out = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True, **kwargs)
        else:
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
        self.copy_continue = nn.Linear(d, 1) if getattr(config, "copy_continuation", False) else None
        bigram = getattr(config, "copy_continuation_bigram", False)
        self.copy_continue_bigram = nn.Linear(d, 1) if bigram else None
        separator = getattr(config, "question_match_separator", None)
        levels = 3 if getattr(config, "question_match_unique", False) else 2
        self.match_embedding = nn.Embedding(levels, d) if separator else None
        distance = int(getattr(config, "question_match_distance", 0) or 0)
        if distance and not (separator and levels == 3):
            raise ValueError("question_match_distance needs question_match_separator and question_match_unique")
        self.match_after = nn.Embedding(distance + 1, d) if distance else None
        self.match_before = nn.Embedding(distance + 1, d) if distance else None
        view_dim = getattr(config, "question_view_dim", None)
        self.question_view = nn.Linear(view_dim, d) if view_dim else None
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' generate feeds one new token per step; the bigram feature also needs the one before."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        given = inputs["decoder_input_ids"].shape[1]
        if self.copy_continue_bigram is not None and given < input_ids.shape[1]:
            inputs["copy_history"] = input_ids[:, -given - 1 : -given]
        return inputs

    def get_encoder(self, *args, **kwargs) -> nn.Module:
        distance = (self.match_after, self.match_before) if self.match_after is not None else None
        return _EncoderWithIds(self.model.encoder, self.match_embedding, self.config, self.question_view, distance)

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
        copy_history=None,
        question_view=None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            view = {} if question_view is None else {"question_view": question_view}
            encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, **view)
        states = encoder_outputs[0]
        hidden, source_ids = self._split(states)
        if attention_mask is None:
            attention_mask = (source_ids != self.config.pad_token_id).long()
        cache = cache if cache is not None else kwargs.get("past_key_values")
        later_cached_step = cache is not None and cache.get_seq_length() > 0
        if self.copy_continue_bigram is not None and copy_history is None and later_cached_step:
            raise ValueError(
                "copy_continuation_bigram needs copy_history (the token before decoder_input_ids) when "
                "decoding with a cache"
            )
        out = self.model(
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=(hidden,),
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
        )
        dec = out.last_hidden_state
        vocab_logits = self.lm_head(dec) + self.final_logits_bias.to(dec.device)
        scores = self.copy_query(dec) @ self.copy_key(hidden).transpose(1, 2) / math.sqrt(dec.shape[-1])
        if self.copy_continue is not None or self.copy_continue_bigram is not None:
            if decoder_input_ids is None:
                raise ValueError("copy_continuation needs decoder_input_ids")
            follows = continuation_feature(source_ids, decoder_input_ids)
            if self.copy_continue is not None:
                scores = scores + self.copy_continue(dec) * follows.to(scores.dtype)
            if self.copy_continue_bigram is not None:
                follows2 = bigram_continuation_feature(source_ids, decoder_input_ids, copy_history, follows)
                scores = scores + self.copy_continue_bigram(dec) * follows2.to(scores.dtype)
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
