"""RAG decoders (Lewis et al., 2020, section 2.5) on top of a Hugging Face encoder-decoder generator.

* :func:`rag_token_generate`: greedy or beam search where every step's next-token distribution is the
  mixture ``log sum_z p(z|x) p(y_i|x,z,y_<i)`` over the K passages.
* :func:`rag_sequence_generate`: beam search per passage, then the candidates are ranked by the full
  marginal likelihood ("thorough") or by the paper's Fast Decoding approximation ("fast").

The generator's encoder runs once on the B*K contexts; decoding then feeds one token per step and reuses the
decoder's KV cache (transformers ``Cache`` objects), reordering only its self-attention part on beam
selection (the cross-attention part is the same for all beams of an example). The search follows
transformers' ``generate`` step for step (same top-2*beams expansion, length penalty, early-stopping
heuristic, min-length / forced BOS / forced EOS processors), so the outputs match
``RagTokenForGeneration.generate`` and ``RagSequenceForGeneration.generate`` on the same inputs.

Returned sequences start with the decoder start token and are padded with the pad token after EOS, like
transformers' ones. The functions run under ``torch.no_grad`` and leave the module's train/eval mode alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from rag_lightning.models.marginalize import sequence_nll_per_example, shift_targets
from rag_lightning.models.word_completion import AnswerStartsAtWord, CopiedWordCompletion, WordPieces

FromConfig = Literal["config"]
_NEG = -1.0e9  # transformers' "never pick this beam" offset; kept identical so ties break the same way


@dataclass
class RagGenerationOutput:
    """Token ids (N, L) and one score per sequence (N,).

    ``scores`` is the log-likelihood the decoder assigns to each returned sequence (unprocessed log-probs,
    not length-normalised): for RAG-Token the sum of the per-step mixture log-probs; for RAG-Sequence the
    ranking score, ``log sum_z p(z|x) p(y|x,z)`` ("thorough") or its Fast Decoding approximation ("fast").
    """

    sequences: Tensor
    scores: Tensor


@dataclass
class _Hypotheses:
    """Finished hypotheses of a search over N rows: R per row."""

    sequences: Tensor  # (N, R, L), starts with the decoder start token, pad after EOS
    token_logprobs: Tensor  # (N, R, L) unprocessed log-prob of each generated token, 0 elsewhere


@dataclass
class _Processors:
    """The logits processors transformers builds from a BART generation config, in its order."""

    eos_token_id: int | None
    min_new_tokens: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | None
    max_new_tokens: int
    no_repeat_ngram_size: int = 0
    complete_words: CopiedWordCompletion | None = None  # not a transformers processor: ours, off by default
    start_at_word: AnswerStartsAtWord | None = None  # ours too, off by default

    def __call__(self, logprobs: Tensor, step: int, prefixes: Tensor | None = None) -> Tensor:
        """``step`` counts generated tokens so far (0 when choosing the first one); ``prefixes`` (R, t) are the
        hypotheses' tokens so far (the decoder start included, as transformers counts them)."""
        if self.no_repeat_ngram_size > 0 and prefixes is not None:
            logprobs = ban_repeated_ngrams(logprobs, prefixes, self.no_repeat_ngram_size)
        if self.eos_token_id is not None and step < self.min_new_tokens:
            logprobs = logprobs.clone()
            logprobs[:, self.eos_token_id] = -float("inf")
        if self.complete_words is not None and prefixes is not None:
            logprobs = self.complete_words(logprobs, prefixes)
        if self.start_at_word is not None and prefixes is not None:
            logprobs = self.start_at_word(logprobs, prefixes)
        if self.forced_bos_token_id is not None and step == 0:
            logprobs = _force(logprobs, self.forced_bos_token_id)
        if self.forced_eos_token_id is not None and step == self.max_new_tokens - 1:
            logprobs = _force(logprobs, self.forced_eos_token_id)
        return logprobs


def ban_repeated_ngrams(logprobs: Tensor, prefixes: Tensor, n: int) -> Tensor:
    """Every token that would complete an n-gram already in its row's prefix gets -inf (transformers'
    ``no_repeat_ngram_size``): logprobs (R, V), prefixes (R, t)."""
    length = prefixes.shape[1]
    if length < n:
        return logprobs
    grams = prefixes.unfold(1, n, 1)  # (R, t - n + 1, n)
    seen = grams[:, :, :-1] == prefixes[:, length - n + 1 :].unsqueeze(1)  # the last n - 1 tokens, earlier
    repeats = seen.all(dim=-1)  # (R, t - n + 1); all-true for n = 1: every earlier token is banned
    banned = torch.zeros(logprobs.shape[0], logprobs.shape[1] + 1, dtype=torch.bool, device=logprobs.device)
    # an n-gram that does not repeat marks the spare last column, which is dropped
    banned.scatter_(1, torch.where(repeats, grams[:, :, -1], logprobs.shape[1]), True)
    return logprobs.masked_fill(banned[:, :-1], -float("inf"))


def _force(logprobs: Tensor, token: int) -> Tensor:
    """Every token impossible but ``token``, which gets log-prob 0 (what transformers' forced processors do)."""
    forced = torch.full_like(logprobs, -float("inf"))
    forced[:, token] = 0.0
    return forced


# ----------------------------------------------------------------------------------------------- helpers
def _config_value(generator: nn.Module, name: str) -> int | None:
    """A token id from the generator's generation config, else its model config."""
    for source in (getattr(generator, "generation_config", None), generator.config):
        value = getattr(source, name, None) if source is not None else None
        if value is not None:
            return value
    return None


def _resolve(
    value: int | None | FromConfig, generator: nn.Module, name: str, *, none_is_default: bool
) -> int | None:
    if value == "config" or (value is None and none_is_default):
        return _config_value(generator, name)
    return value


def _cache_kwarg(generator: nn.Module) -> str:
    """transformers 5 calls the decoder cache ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(generator).forward).parameters else "past_key_values"


def _expand_rows(tensor: Tensor, n_rows: int, num_beams: int, n_mix: int) -> Tensor:
    """(n_rows*n_mix, ...) -> (n_rows*num_beams*n_mix, ...), rows ordered (row, beam, mix)."""
    shaped = tensor.view(n_rows, 1, n_mix, *tensor.shape[1:])
    return shaped.expand(n_rows, num_beams, n_mix, *tensor.shape[1:]).reshape(-1, *tensor.shape[1:])


def _encode(generator: nn.Module, input_ids: Tensor, attention_mask: Tensor, question_view: Tensor | None) -> Tensor:
    view = {} if question_view is None else {"question_view": question_view}  # a copy head's reader input
    return generator.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **view)[0]


Step = Callable[[Tensor, Tensor | None], Tensor]


def _mixture_step(
    generator: nn.Module, encoder_hidden: Tensor, encoder_mask: Tensor, doc_logprobs: Tensor, num_beams: int
) -> Step:
    """Incremental decoder for N search rows, each a mixture of M contexts with weights ``doc_logprobs`` (N, M).

    The returned ``step(prefixes, reorder)`` feeds the last token of each of the N*num_beams hypotheses
    (``prefixes`` (N*num_beams, t), the tokens so far; a copy head's bigram feature also gets the one before),
    first moving the KV cache rows to the hypotheses' parents (``reorder``, flat indices, or None), and
    returns ``log sum_m p(m) p(. | context m, prefix)`` as (N*num_beams, V) float32.
    """
    n_rows, n_mix = doc_logprobs.shape
    hidden = _expand_rows(encoder_hidden, n_rows, num_beams, n_mix)
    mask = _expand_rows(encoder_mask, n_rows, num_beams, n_mix)
    weights = doc_logprobs.float().repeat_interleave(num_beams, dim=0).unsqueeze(-1)  # (N*nb, M, 1)
    encoder_outputs = BaseModelOutput(last_hidden_state=hidden)
    cache_name = _cache_kwarg(generator)
    mix_offsets = torch.arange(n_mix, device=hidden.device)
    state: dict[str, object] = {"cache": None}
    takes_history = "copy_history" in inspect.signature(type(generator).forward).parameters

    def step(prefixes: Tensor, reorder: Tensor | None) -> Tensor:
        tokens = prefixes[:, -1]
        extra = {}
        if takes_history and prefixes.shape[1] > 1:
            extra["copy_history"] = prefixes[:, -2].repeat_interleave(n_mix).unsqueeze(1)
        cache = state["cache"]
        if reorder is not None and cache is not None:
            rows = (reorder.unsqueeze(1) * n_mix + mix_offsets).reshape(-1)
            # cross-attention keys/values depend only on (example, passage), identical across beams
            target = getattr(cache, "self_attention_cache", cache)
            target.reorder_cache(rows)
        out = generator(
            attention_mask=mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=tokens.repeat_interleave(n_mix).unsqueeze(1),
            use_cache=True,
            return_dict=True,
            **{cache_name: cache},
            **extra,
        )
        state["cache"] = getattr(out, cache_name, None)
        logprobs = out.logits[:, -1].float().log_softmax(dim=-1)
        if n_mix == 1:
            return logprobs + weights[:, 0]
        return (logprobs.view(-1, n_mix, logprobs.shape[-1]) + weights).logsumexp(dim=1)

    return step


# ------------------------------------------------------------------------------------------------ search
def _greedy(
    step: Step,
    n_rows: int,
    start: int,
    eos: int | None,
    pad: int,
    max_new_tokens: int,
    processors: _Processors,
    device,
) -> _Hypotheses:
    """Greedy search, finished rows padded (transformers' ``_sample`` without sampling)."""
    sequences = torch.full((n_rows, 1), start, dtype=torch.long, device=device)
    token_logprobs = torch.zeros(n_rows, 1, device=device)
    unfinished = torch.ones(n_rows, dtype=torch.bool, device=device)
    for cur in range(max_new_tokens):
        raw = step(sequences, None)
        tokens = processors(raw, cur, sequences).argmax(dim=-1)
        tokens = torch.where(unfinished, tokens, pad)
        chosen = torch.where(unfinished, raw.gather(1, tokens[:, None]).squeeze(1), 0.0)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        token_logprobs = torch.cat([token_logprobs, chosen[:, None]], dim=1)
        if eos is not None:
            unfinished &= tokens.ne(eos)
        if not unfinished.any():
            break
    return _Hypotheses(sequences.unsqueeze(1), token_logprobs.unsqueeze(1))


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor[n, index[n, j]] for (N, A, ...) tensors and (N, J) indices."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def _beam_search(
    step: Step,
    n_rows: int,
    num_beams: int,
    num_return: int,
    start: int,
    eos: int | None,
    pad: int,
    max_new_tokens: int,
    processors: _Processors,
    length_penalty: float,
    early_stopping: bool | str,
    device,
) -> _Hypotheses:
    """Beam search with transformers' semantics (``GenerationMixin._beam_search``), N independent rows.

    Each step expands the top 2*num_beams continuations; the best num_beams that do not end (EOS or length
    limit) keep running, the ones among the top num_beams that end compete for the num_beams finished slots
    by ``score / generated_length ** length_penalty``. A row stops once no running beam can beat its worst
    finished one (the default ``early_stopping=False`` heuristic).
    """
    total = max_new_tokens + 1
    keep = 2 * num_beams
    seqs = torch.full((n_rows, num_beams, total), pad, dtype=torch.long, device=device)
    seqs[:, :, 0] = start
    tok_lp = torch.zeros(n_rows, num_beams, total, device=device)
    run_scores = torch.zeros(n_rows, num_beams, device=device)
    run_scores[:, 1:] = _NEG
    fin_seqs, fin_tok_lp = seqs.clone(), tok_lp.clone()
    fin_scores = torch.full((n_rows, num_beams), _NEG, device=device)
    fin_done = torch.zeros(n_rows, num_beams, dtype=torch.bool, device=device)
    fin_len = torch.zeros(n_rows, num_beams, dtype=torch.long, device=device)
    improvable = torch.ones(n_rows, 1, dtype=torch.bool, device=device)
    top_slots = torch.arange(keep, device=device) < num_beams
    beam_offsets = torch.arange(n_rows, device=device).unsqueeze(1) * num_beams
    reorder = None

    for cur in range(1, total):
        prefixes = seqs[:, :, :cur].reshape(n_rows * num_beams, cur)
        raw = step(prefixes, reorder)  # (N*nb, V)
        vocab = raw.shape[-1]
        processed = processors(raw, cur - 1, prefixes).view(n_rows, num_beams, vocab) + run_scores.unsqueeze(-1)
        top_scores, top_index = processed.view(n_rows, -1).topk(keep, dim=1)
        parent, token = top_index // vocab, top_index % vocab
        cand_seqs = _gather(seqs, parent)
        cand_seqs[:, :, cur] = token
        cand_tok_lp = _gather(tok_lp, parent)
        cand_tok_lp[:, :, cur] = raw.view(n_rows, num_beams, vocab)[
            torch.arange(n_rows, device=device).unsqueeze(1), parent, token
        ]
        ends = torch.full_like(token, cur + 1 >= total, dtype=torch.bool)
        if eos is not None:
            ends |= token.eq(eos)

        # the best num_beams continuations that do not end keep running
        running = top_scores + ends.float() * _NEG
        chosen = running.topk(num_beams, dim=1).indices
        seqs, tok_lp, run_scores = (
            _gather(cand_seqs, chosen),
            _gather(cand_tok_lp, chosen),
            _gather(running, chosen),
        )
        reorder = (_gather(parent, chosen) + beam_offsets).reshape(-1)

        # ending continuations among the top num_beams compete for the finished slots
        just_done = ends & top_slots
        normed = top_scores / float(cur) ** length_penalty
        normed = normed + (fin_done.all(dim=1, keepdim=True) & (early_stopping is True)).float() * _NEG
        normed = normed + (~improvable).float() * _NEG
        normed = normed + (~just_done).float() * _NEG
        merged = torch.cat([fin_scores, normed], dim=1).topk(num_beams, dim=1).indices
        fin_seqs = _gather(torch.cat([fin_seqs, cand_seqs], dim=1), merged)
        fin_tok_lp = _gather(torch.cat([fin_tok_lp, cand_tok_lp], dim=1), merged)
        fin_scores = _gather(torch.cat([fin_scores, normed], dim=1), merged)
        fin_done = _gather(torch.cat([fin_done, just_done], dim=1), merged)
        fin_len = _gather(torch.cat([fin_len, torch.full_like(token, cur)], dim=1), merged)

        hypothetical = total - 1 if (early_stopping == "never" and length_penalty > 0.0) else cur
        best_running = run_scores[:, :1] / float(hypothetical) ** length_penalty
        worst_done = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_done).any(dim=1, keepdim=True)
        all_full = bool(fin_done.all()) and early_stopping is True
        if not improvable.any() or all_full or bool(ends.all()):
            break

    length = 1 + int(fin_len[:, :num_return].max())
    return _Hypotheses(fin_seqs[:, :num_return, :length], fin_tok_lp[:, :num_return, :length])


def _search(
    step: Step,
    n_rows: int,
    num_beams: int,
    num_return: int,
    ids: dict[str, int | None],
    max_new_tokens: int,
    processors: _Processors,
    length_penalty: float,
    early_stopping: bool | str,
    device,
) -> _Hypotheses:
    if num_beams == 1:
        return _greedy(step, n_rows, ids["start"], ids["eos"], ids["pad"], max_new_tokens, processors, device)
    return _beam_search(
        step, n_rows, num_beams, num_return, ids["start"], ids["eos"], ids["pad"], max_new_tokens, processors,
        length_penalty, early_stopping, device,
    )  # fmt: skip


def _setup(
    generator: nn.Module,
    context_input_ids: Tensor,
    doc_scores: Tensor,
    *,
    n_docs: int,
    num_beams: int,
    num_return_sequences: int,
    max_new_tokens: int,
    min_new_tokens: int,
    no_repeat_ngram_size: int,
    decoder_start_token_id: int | None,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    forced_bos_token_id: int | None | FromConfig,
    forced_eos_token_id: int | None | FromConfig,
) -> tuple[dict[str, int | None], _Processors]:
    """Validates shapes and options; fills token ids missing in the call from the generator's config."""
    if context_input_ids.shape[0] != doc_scores.shape[0] * n_docs or doc_scores.shape[1] != n_docs:
        raise ValueError(
            f"expected context_input_ids (B*{n_docs}, S) and doc_scores (B, {n_docs}), got "
            f"{tuple(context_input_ids.shape)} and {tuple(doc_scores.shape)}"
        )
    if num_beams < 1 or max_new_tokens < 1 or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            "need num_beams >= 1, max_new_tokens >= 1 and 1 <= num_return_sequences <= num_beams"
        )
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {no_repeat_ngram_size}")
    ids = {
        "start": _resolve(decoder_start_token_id, generator, "decoder_start_token_id", none_is_default=True),
        "bos": _resolve(bos_token_id, generator, "bos_token_id", none_is_default=True),
        "eos": _resolve(eos_token_id, generator, "eos_token_id", none_is_default=True),
        "pad": _resolve(pad_token_id, generator, "pad_token_id", none_is_default=True),
    }
    if isinstance(ids["eos"], (list, tuple)):
        if len(ids["eos"]) != 1:
            raise ValueError(f"a single eos_token_id is supported, got {ids['eos']}")
        ids["eos"] = ids["eos"][0]
    if ids["start"] is None or ids["pad"] is None:
        raise ValueError(
            "decoder_start_token_id and pad_token_id must be given or set in the generator's config"
        )
    processors = _Processors(
        eos_token_id=ids["eos"],
        min_new_tokens=min_new_tokens,
        forced_bos_token_id=_resolve(
            forced_bos_token_id, generator, "forced_bos_token_id", none_is_default=False
        ),
        forced_eos_token_id=_resolve(
            forced_eos_token_id, generator, "forced_eos_token_id", none_is_default=False
        ),
        max_new_tokens=max_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    return ids, processors


# ------------------------------------------------------------------------------------------------ public
@torch.no_grad()
def rag_token_generate(
    generator: nn.Module,
    context_input_ids: Tensor,
    context_attention_mask: Tensor,
    doc_scores: Tensor,
    *,
    n_docs: int,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    decoder_start_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    forced_bos_token_id: int | None | FromConfig = "config",
    forced_eos_token_id: int | None | FromConfig = "config",
    word_pieces: WordPieces | None = None,
    start_at_word: WordPieces | None = None,
    question_view: Tensor | None = None,
    return_scores: bool = False,
) -> Tensor | RagGenerationOutput:
    """RAG-Token decoding: greedy (``num_beams=1``) or beam search over the per-step passage mixture.

    Token ids left as None come from the generator's config; ``forced_*_token_id`` default to the config
    too (BART sets ``forced_eos_token_id``) and ``None`` switches them off. ``no_repeat_ngram_size`` > 0 never
    repeats an n-gram of that size within a hypothesis (transformers' option of the same name).
    ``max_new_tokens`` counts the tokens after the decoder start (transformers' ``max_length`` is one more).
    ``word_pieces`` switches on the rule that finishes a word copied from the passages, ``start_at_word`` the
    rule that the answer's first token begins with a space (models/word_completion.py); ``question_view`` (B*n_docs, d), the question vectors of a generator that
    reads them (models/copy_generator.py). Returns (B*R, L) token ids, or a :class:`RagGenerationOutput` with their mixture log-likelihoods when ``return_scores``.
    """
    ids, processors = _setup(
        generator, context_input_ids, doc_scores, n_docs=n_docs, num_beams=num_beams,
        num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size, decoder_start_token_id=decoder_start_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id,
    )  # fmt: skip
    batch = doc_scores.shape[0]
    if word_pieces is not None:
        processors.complete_words = CopiedWordCompletion.from_contexts(
            context_input_ids, context_attention_mask, batch, word_pieces, num_beams
        )
    if start_at_word is not None:
        processors.start_at_word = AnswerStartsAtWord(start_at_word, (ids["start"], ids["bos"]))
    hidden = _encode(generator, context_input_ids, context_attention_mask, question_view)
    step = _mixture_step(generator, hidden, context_attention_mask, doc_scores.log_softmax(dim=-1), num_beams)
    hyps = _search(
        step, batch, num_beams, num_return_sequences, ids, max_new_tokens, processors, length_penalty, early_stopping,
        context_input_ids.device,
    )  # fmt: skip
    sequences = hyps.sequences.flatten(0, 1)
    if not return_scores:
        return sequences
    return RagGenerationOutput(sequences, hyps.token_logprobs.flatten(0, 1).sum(dim=-1))


@torch.no_grad()
def rag_sequence_generate(
    generator: nn.Module,
    context_input_ids: Tensor,
    context_attention_mask: Tensor,
    doc_scores: Tensor,
    *,
    n_docs: int,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    mode: str = "thorough",
    dedupe: bool = True,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    exclude_bos_score: bool = True,
    decoder_start_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    forced_bos_token_id: int | None | FromConfig = "config",
    forced_eos_token_id: int | None | FromConfig = "config",
    score_batch_size: int | None = None,
    word_pieces: WordPieces | None = None,
    start_at_word: WordPieces | None = None,
    question_view: Tensor | None = None,
    return_scores: bool = False,
) -> Tensor | RagGenerationOutput:
    """RAG-Sequence decoding: ``num_beams`` beams per passage, candidates ranked by ``p(y|x)``.

    ``mode="thorough"`` scores every candidate of an example under every one of its passages (one batched
    decoder pass over all (candidate, passage) pairs, encoder outputs reused; ``score_batch_size`` candidates
    per pass bounds memory). ``mode="fast"`` is the paper's Fast Decoding: ``p(y|x,z)`` is the beam's own
    (unprocessed, un-normalised) log-likelihood when passage z's beam produced y and 0 otherwise, so no pass
    beyond the beam search. As in transformers, a leading BOS is not scored (``exclude_bos_score``) and
    ``dedupe`` keeps the first copy of candidates several passages produced. ``word_pieces``: as in
    :func:`rag_token_generate`, each passage's beams finishing words copied from that passage; ``start_at_word``
    as there;
    ``no_repeat_ngram_size`` and ``question_view`` as there. Returns
    (B*R, L) token ids, best first, or a :class:`RagGenerationOutput` with the ranking log-scores when
    ``return_scores``.
    """
    if mode not in ("thorough", "fast"):
        raise ValueError(f"mode must be 'thorough' or 'fast', got {mode!r}")
    ids, processors = _setup(
        generator, context_input_ids, doc_scores, n_docs=n_docs, num_beams=num_beams,
        num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size, decoder_start_token_id=decoder_start_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id,
    )  # fmt: skip
    if exclude_bos_score and ids["bos"] is None:
        exclude_bos_score = False  # nothing to exclude, as in transformers
    batch, device = doc_scores.shape[0], context_input_ids.device
    if word_pieces is not None:
        processors.complete_words = CopiedWordCompletion.from_contexts(
            context_input_ids, context_attention_mask, batch * n_docs, word_pieces, num_beams
        )
    if start_at_word is not None:
        processors.start_at_word = AnswerStartsAtWord(start_at_word, (ids["start"], ids["bos"]))
    hidden = _encode(generator, context_input_ids, context_attention_mask, question_view)
    no_mixing = torch.zeros(batch * n_docs, 1, device=device)
    step = _mixture_step(generator, hidden, context_attention_mask, no_mixing, num_beams)
    hyps = _search(
        step, batch * n_docs, num_beams, num_beams, ids, max_new_tokens, processors, length_penalty, early_stopping,
        device,
    )  # fmt: skip
    length = hyps.sequences.shape[-1]
    # passage-major candidates per example, the order transformers stacks them in
    candidates = hyps.sequences.view(batch, n_docs * num_beams, length)
    same = candidates.unsqueeze(2).eq(candidates.unsqueeze(1)).all(dim=-1)  # (B, C, C)
    earlier_copy = (same & torch.ones_like(same).tril(diagonal=-1)).any(dim=-1)
    keep = ~earlier_copy if dedupe else torch.ones_like(earlier_copy)
    # transformers skips the BOS score only when every candidate of the example starts with it
    skip_bos = exclude_bos_score & candidates[:, :, 1].eq(ids["bos"]).all(dim=1, keepdim=True).expand_as(keep)
    doc_logprobs = doc_scores.float().log_softmax(dim=-1)

    if mode == "fast":
        token_lp = hyps.token_logprobs.view(batch, n_docs * num_beams, length)
        first = torch.where(skip_bos, token_lp[:, :, 1], 0.0)
        own = token_lp.sum(dim=-1) - first + doc_logprobs.repeat_interleave(num_beams, dim=1)
        # log sum over the passages whose beams produced the candidate of p(z|x) p(y|x,z)
        scores = torch.where(same, own.unsqueeze(1), -float("inf")).logsumexp(dim=-1)
    else:
        scores = _thorough_scores(
            generator, hidden, context_attention_mask, doc_scores, candidates, keep, skip_bos, ids["pad"],
            score_batch_size,
        )  # fmt: skip
    scores = scores.masked_fill(~keep, -float("inf"))
    best_scores, best = scores.topk(num_return_sequences, dim=1)
    sequences = _gather(candidates, best).flatten(0, 1)
    if not return_scores:
        return sequences
    return RagGenerationOutput(sequences, best_scores.flatten())


def _thorough_scores(
    generator: nn.Module,
    hidden: Tensor,
    context_attention_mask: Tensor,
    doc_scores: Tensor,
    candidates: Tensor,
    keep: Tensor,
    skip_bos: Tensor,
    pad_token_id: int,
    score_batch_size: int | None,
) -> Tensor:
    """log sum_z p(z|x) p(y|x,z) of the kept candidates (B, C, L) under all K passages of their example.

    The kept candidates of all examples are packed and scored in one decoder pass (or chunks of
    ``score_batch_size`` candidates) over all (candidate, passage) pairs, the encoder states picked by
    index; the others get -inf.
    """
    batch, n_cand, length = candidates.shape
    n_docs = doc_scores.shape[1]
    picked = keep.reshape(-1).nonzero().squeeze(1)
    flat, owners, skips = (
        candidates.reshape(-1, length)[picked],
        picked // n_cand,
        skip_bos.reshape(-1)[picked],
    )
    chunk = score_batch_size or max(len(picked), 1)
    doc_offsets = torch.arange(n_docs, device=flat.device)
    scores = []
    for lo in range(0, len(picked), chunk):
        cand, owner = flat[lo : lo + chunk], owners[lo : lo + chunk]
        rows = (owner.unsqueeze(1) * n_docs + doc_offsets).reshape(-1)
        logits = generator(
            attention_mask=context_attention_mask.index_select(0, rows),
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
            decoder_input_ids=cand.repeat_interleave(n_docs, dim=0),
            use_cache=False,
            return_dict=True,
        ).logits
        nll = sequence_nll_per_example(
            logits, doc_scores.index_select(0, owner), shift_targets(cand, pad_token_id), pad_token_id,
            skips[lo : lo + chunk],
        )  # fmt: skip
        scores.append(-nll)
    out = torch.full((batch * n_cand,), -float("inf"), device=candidates.device)
    out[picked] = torch.cat(scores)
    return out.view(batch, n_cand)
