"""RAG-Token and RAG-Sequence decoders against transformers' ``generate`` and a hand-worked example."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from rag_reference import (
    BOS,
    EOS,
    PAD,
    contexts,
    doc_scores,
    reference,
    tiny_generator,
    tiny_question_encoder,
)
from torch import nn

from rag_lightning.models.decoding import RagGenerationOutput, rag_sequence_generate, rag_token_generate
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll, shift_targets

BATCH, N_DOCS, NEW_TOKENS = 2, 3, 8


def make(seed: int, eos_bias: float, padded: bool = True, n_docs: int = N_DOCS):
    generator = tiny_generator(seed=seed, eos_bias=eos_bias)
    ctx, mask = contexts(BATCH, n_docs, seed=seed, padded=padded)
    return generator, ctx, mask, doc_scores(BATCH, n_docs, seed=seed)


# ---------------------------------------------------------------------------------------------- RAG-Token
@pytest.mark.parametrize(
    ("seed", "eos_bias", "num_beams", "num_return", "extra", "ends_early"),
    [
        (0, 0.0, 1, 1, {}, False),
        (0, 3.0, 1, 1, {}, True),
        (0, 0.0, 3, 1, {}, False),
        (0, 3.0, 4, 2, {}, True),
        (3, 1.0, 3, 3, {"min_new_tokens": 3, "forced_bos_token_id": BOS}, True),
        (3, 1.0, 2, 1, {"length_penalty": 0.5, "early_stopping": True}, True),
    ],
)
def test_rag_token_matches_transformers(seed, eos_bias, num_beams, num_return, extra, ends_early):
    generator, ctx, mask, scores = make(seed, eos_bias)
    model = reference("token", generator, tiny_question_encoder(), N_DOCS)
    hf_extra = dict(extra)
    if "min_new_tokens" in hf_extra:  # transformers' min_length counts the decoder start token
        hf_extra["min_length"] = hf_extra.pop("min_new_tokens") + 1
    ref = model.generate(
        context_input_ids=ctx,
        context_attention_mask=mask,
        doc_scores=scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_length=NEW_TOKENS + 1,  # RagTokenForGeneration ignores max_new_tokens
        **hf_extra,
    )
    ours = rag_token_generate(
        generator,
        ctx,
        mask,
        scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=NEW_TOKENS,
        **extra,
    )
    assert torch.equal(ours, ref)
    # some cases finish hypotheses (EOS) before the length limit, the others run to it
    first_eos = ours[:, 1:].eq(EOS).float().argmax(dim=1)
    assert bool(first_eos.lt(NEW_TOKENS - 1).any()) == ends_early


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_scores_are_the_mixture_log_likelihood(num_beams):
    generator, ctx, mask, scores = make(1, 2.5)
    out = rag_token_generate(
        generator,
        ctx,
        mask,
        scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        max_new_tokens=NEW_TOKENS,
        return_scores=True,
    )
    assert isinstance(out, RagGenerationOutput) and out.scores.shape == (BATCH,)
    with torch.no_grad():
        logits = generator(
            input_ids=ctx, attention_mask=mask, decoder_input_ids=out.sequences.repeat_interleave(N_DOCS, 0)
        ).logits
    expected = -rag_token_nll(logits, scores, shift_targets(out.sequences, PAD), pad_token_id=PAD)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-5)


class CallRecorder:
    """Wraps a generator's forward and its encoder to record how decoding drives them."""

    def __init__(self, generator: nn.Module):
        self.decoder_lengths: list[int] = []
        self.encoder_calls = 0
        forward, encoder = generator.forward, generator.get_encoder()
        encoder_forward = encoder.forward

        def recording_forward(*args, **kwargs):
            self.decoder_lengths.append(kwargs["decoder_input_ids"].shape[1])
            return forward(*args, **kwargs)

        def recording_encoder(*args, **kwargs):
            self.encoder_calls += 1
            return encoder_forward(*args, **kwargs)

        generator.forward = recording_forward
        encoder.forward = recording_encoder


def test_rag_token_encodes_once_and_feeds_one_token_per_step():
    generator, ctx, mask, scores = make(0, 0.0)
    recorder = CallRecorder(generator)
    out = rag_token_generate(
        generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=3, max_new_tokens=NEW_TOKENS
    )
    assert recorder.encoder_calls == 1
    assert recorder.decoder_lengths == [1] * (out.shape[1] - 1)


# ------------------------------------------------------------------------------------------- RAG-Sequence
def transformers_thorough_with_mask(generator, ctx, mask, scores, n_docs, num_beams, num_return, max_length):
    """``RagSequenceForGeneration.generate``'s thorough loop, but passing the contexts' attention mask.

    transformers 5 drops the mask during candidate generation (it sets ``attention_mask=None`` and ``generate``
    no longer infers one from pad tokens for encoder-decoder models), so padded contexts attend to their pads
    there. This loop reproduces the same steps with transformers' own pieces (``generator.generate`` per
    example, dedupe, scoring by ``RagSequenceForGeneration``'s loss with ``exclude_bos_score=True``, top-k) and
    keeps the mask, which is what our decoder does.
    """
    model = reference("sequence", generator, tiny_question_encoder(), n_docs)
    hypos, best_scores = [], []
    with torch.no_grad():
        for b in range(scores.shape[0]):
            rows = slice(b * n_docs, (b + 1) * n_docs)
            cands = generator.generate(
                ctx[rows],
                attention_mask=mask[rows],
                num_beams=num_beams,
                num_return_sequences=num_beams,
                max_length=max_length,
            )
            cands = torch.stack(list({str(c.tolist()): c for c in cands}.values()))
            n = cands.shape[0]
            loss = model(
                context_input_ids=ctx[rows].repeat(n, 1),
                context_attention_mask=mask[rows].repeat(n, 1),
                doc_scores=scores[b : b + 1].repeat(n, 1),
                labels=cands,
                exclude_bos_score=True,
            ).loss
            top = (-loss).topk(num_return)
            hypos.append(cands[top.indices])
            best_scores.append(top.values)
    return model._cat_and_pad(hypos, PAD), torch.cat(best_scores)


def one_token_answers(sequences: torch.Tensor) -> torch.Tensor:
    return sequences[:, 1:].ne(PAD).sum(dim=1).eq(1)


@pytest.mark.parametrize(
    ("seed", "eos_bias", "num_beams", "num_return"),
    [(0, 0.0, 1, 1), (0, 2.0, 1, 1), (0, 0.0, 3, 2), (3, 1.0, 4, 3)],
)
def test_rag_sequence_thorough_matches_transformers(seed, eos_bias, num_beams, num_return):
    """Unpadded contexts, so transformers' mask-less candidate generation sees the same inputs."""
    generator, ctx, mask, scores = make(seed, eos_bias, padded=False)
    model = reference("sequence", generator, tiny_question_encoder(), N_DOCS)
    ref = model.generate(
        context_input_ids=ctx,
        context_attention_mask=mask,
        doc_scores=scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_length=NEW_TOKENS + 1,
    )
    ours = rag_sequence_generate(
        generator,
        ctx,
        mask,
        scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=NEW_TOKENS,
        return_scores=True,
    )
    assert torch.equal(ours.sequences, ref)
    _, ref_scores = transformers_thorough_with_mask(
        generator, ctx, mask, scores, N_DOCS, num_beams, num_return, NEW_TOKENS + 1
    )
    # transformers loses log p(z|x) for one-token answers (see test_marginalize); compare the others
    longer = ~one_token_answers(ours.sequences)
    assert longer.any()
    torch.testing.assert_close(ours.scores[longer], ref_scores[longer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seed", "eos_bias", "num_beams", "num_return"), [(0, 0.0, 3, 2), (3, 2.0, 2, 1)])
def test_rag_sequence_thorough_with_padded_contexts(seed, eos_bias, num_beams, num_return):
    generator, ctx, mask, scores = make(seed, eos_bias, padded=True)
    assert mask.eq(0).any()
    ref, _ = transformers_thorough_with_mask(
        generator, ctx, mask, scores, N_DOCS, num_beams, num_return, NEW_TOKENS + 1
    )
    ours = rag_sequence_generate(
        generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=num_beams, num_return_sequences=num_return,
        max_new_tokens=NEW_TOKENS,
    )  # fmt: skip
    assert torch.equal(ours, ref)


def test_thorough_scores_every_pair_in_one_batched_pass():
    generator, ctx, mask, scores = make(0, 0.0)
    num_beams = 3
    recorder = CallRecorder(generator)
    ours = rag_sequence_generate(
        generator,
        ctx,
        mask,
        scores,
        n_docs=N_DOCS,
        num_beams=num_beams,
        max_new_tokens=NEW_TOKENS,
        return_scores=True,
    )
    assert recorder.encoder_calls == 1
    full_passes = [n for n in recorder.decoder_lengths if n > 1]
    assert len(full_passes) == 1  # one pass over all (candidate, passage) pairs of all examples
    chunked = rag_sequence_generate(
        generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=num_beams, max_new_tokens=NEW_TOKENS,
        score_batch_size=2, return_scores=True,
    )  # fmt: skip
    assert torch.equal(chunked.sequences, ours.sequences)
    torch.testing.assert_close(chunked.scores, ours.scores)


def test_dedupe():
    generator, ctx, mask, scores = make(1, 1.0)
    kwargs = {"n_docs": N_DOCS, "num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 4}
    deduped = rag_sequence_generate(generator, ctx, mask, scores, **kwargs).view(BATCH, 2, -1)
    assert all(not torch.equal(pair[0], pair[1]) for pair in deduped)
    # the tiny model repeats candidates across passages, so without dedupe the top two can coincide
    kept = rag_sequence_generate(generator, ctx, mask, scores, dedupe=False, **kwargs).view(BATCH, 2, -1)
    assert any(torch.equal(pair[0], pair[1]) for pair in kept)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_equals_thorough_with_one_passage(num_beams):
    """With K=1 every candidate comes from the only passage's beam, so Fast Decoding is exact: the beam's
    own log-likelihood (kept un-normalised and unprocessed, forced EOS included) is the thorough score."""
    generator, ctx, mask, scores = make(1, 1.0, n_docs=1)
    kwargs = {"n_docs": 1, "num_beams": num_beams, "num_return_sequences": num_beams, "max_new_tokens": 6}
    fast = rag_sequence_generate(generator, ctx, mask, scores, mode="fast", return_scores=True, **kwargs)
    thorough = rag_sequence_generate(
        generator, ctx, mask, scores, mode="thorough", return_scores=True, **kwargs
    )
    assert torch.equal(fast.sequences, thorough.sequences)
    torch.testing.assert_close(fast.scores, thorough.scores, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        logits = generator(
            input_ids=ctx.repeat_interleave(num_beams, 0),
            attention_mask=mask.repeat_interleave(num_beams, 0),
            decoder_input_ids=fast.sequences,
        ).logits
    labels = shift_targets(fast.sequences, PAD)
    own = -rag_sequence_nll(logits, torch.zeros(labels.shape[0], 1), labels, pad_token_id=PAD)
    torch.testing.assert_close(fast.scores, own, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------- hand-worked Fast Decoding
A, B = 3, 4
STEP_PROBS = {  # passage -> per-step next-token distributions, independent of the prefix
    0: [{A: 0.6, B: 0.3, EOS: 0.1}, {EOS: 0.8, A: 0.1, B: 0.1}],
    1: [{B: 0.6, EOS: 0.3, A: 0.1}, {EOS: 0.8, A: 0.1, B: 0.1}],
}


class FixedStepGenerator(nn.Module):
    """A stand-in generator whose next-token distribution depends only on (passage, step): beams and
    likelihoods can be worked out on paper. The passage id is the context's first token."""

    class Cache:
        def __init__(self, length: int = 0):
            self.length = length

        def reorder_cache(self, rows: torch.Tensor) -> None:  # prefix-independent: nothing to move
            pass

    def __init__(self, vocab: int = 5, steps: int = 3):
        super().__init__()
        table = torch.full((len(STEP_PROBS), steps, vocab), -float("inf"))
        for passage, dists in STEP_PROBS.items():
            for t, dist in enumerate(dists):
                for token, p in dist.items():
                    table[passage, t, token] = math.log(p)
        table[:, len(dists) :, EOS] = 0.0
        self.register_buffer("table", table)
        self.config = SimpleNamespace(
            decoder_start_token_id=EOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD
        )

    def get_encoder(self):
        return lambda input_ids, attention_mask, return_dict: (input_ids[:, :1, None].float(),)

    def forward(self, attention_mask, encoder_outputs, decoder_input_ids, use_cache, return_dict, cache=None):
        passage = encoder_outputs.last_hidden_state[:, 0, 0].long()
        start = cache.length if cache is not None else 0
        steps = torch.arange(start, start + decoder_input_ids.shape[1])
        logits = self.table[passage][:, steps]
        new_cache = self.Cache(start + decoder_input_ids.shape[1]) if use_cache else None
        return SimpleNamespace(logits=logits, cache=new_cache)


def hand_example(mode: str):
    ctx = torch.tensor([[0], [1]])
    scores = torch.log(torch.tensor([[3.0, 5.0]]))  # p(z1) = 3/8, p(z2) = 5/8
    return rag_sequence_generate(
        FixedStepGenerator(), ctx, torch.ones_like(ctx), scores, n_docs=2, num_beams=2, num_return_sequences=2,
        max_new_tokens=2, mode=mode, return_scores=True,
    )  # fmt: skip


def test_fast_decoding_by_hand():
    """Beams, 2 per passage, 2 new tokens, length penalty 1 (finished beams compete by log p / length):
    z1 -> "A </s>" (.6*.8=.48), "B </s>" (.3*.8=.24);
    z2 -> "B </s>" (.6*.8=.48), "</s>" (.3, ends at step 1: log .3 > log(.1*.8)/2, so "A </s>" loses).
    Fast, p(z1)=3/8, p(z2)=5/8: p(B)=3/8*.24+5/8*.48=.39, p(</s>)=5/8*.3=.1875, p(A)=3/8*.48=.18.
    """
    out = hand_example("fast")
    assert out.sequences.tolist() == [[EOS, B, EOS], [EOS, EOS, PAD]]
    torch.testing.assert_close(out.scores, torch.log(torch.tensor([0.39, 0.1875])))


def test_thorough_decoding_by_hand():
    """Same beams; thorough also scores each candidate under the passage whose beam missed it:
    p(A)=.18+5/8*(.1*.8)=.23 now beats p(</s>)=3/8*.1+.1875=.225, so the answer set changes."""
    out = hand_example("thorough")
    assert out.sequences.tolist() == [[EOS, B, EOS], [EOS, A, EOS]]
    torch.testing.assert_close(out.scores, torch.log(torch.tensor([0.39, 0.23])))


# ------------------------------------------------------------------------------------------------- options
def test_token_ids_default_from_the_generator_config():
    generator, ctx, mask, scores = make(1, 2.5)
    explicit = {
        "decoder_start_token_id": EOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "forced_eos_token_id": EOS,
    }
    for fn in (rag_token_generate, rag_sequence_generate):
        default = fn(generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=2, max_new_tokens=5)
        assert torch.equal(
            default,
            fn(generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=2, max_new_tokens=5, **explicit),
        )
        assert default[:, 0].eq(EOS).all()


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("fn", [rag_token_generate, rag_sequence_generate], ids=["token", "sequence"])
def test_forced_eos_none_forces_nothing_at_the_last_step(fn, num_beams):
    """BART's config forces EOS at the last step; ``forced_eos_token_id=None`` switches that off, so a
    hypothesis that reaches the length limit ends with the generator's own choice there, not EOS. The
    generator (seed 0, no EOS bias) never picks EOS within 3 tokens."""
    generator, ctx, mask, scores = make(0, 0.0)
    args = dict(n_docs=N_DOCS, num_beams=num_beams, max_new_tokens=3)
    forced = fn(generator, ctx, mask, scores, **args)  # "config": BART's forced_eos_token_id = EOS
    free = fn(generator, ctx, mask, scores, **args, forced_eos_token_id=None)
    assert forced.shape == free.shape == (BATCH, 4)
    assert forced[:, 3].eq(EOS).all()  # every hypothesis ran to the limit and was closed by the forced EOS
    assert not free[:, 1:].eq(EOS).any()  # none is closed: the last token is the generator's choice
    if fn is rag_token_generate and num_beams == 1:
        # greedy: the last token is exactly what an unforced longer run picks at that step, the rest as forced
        longer = fn(generator, ctx, mask, scores, **{**args, "max_new_tokens": 6}, forced_eos_token_id=None)
        assert torch.equal(free, longer[:, :4])
        assert torch.equal(free[:, :3], forced[:, :3])


def test_invalid_arguments():
    generator, ctx, mask, scores = make(0, 0.0)
    with pytest.raises(ValueError, match="mode"):
        rag_sequence_generate(generator, ctx, mask, scores, n_docs=N_DOCS, mode="exhaustive")
    with pytest.raises(ValueError, match="doc_scores"):
        rag_token_generate(generator, ctx, mask, scores, n_docs=N_DOCS + 1)
    with pytest.raises(ValueError, match="num_return_sequences"):
        rag_token_generate(generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0"):
        rag_sequence_generate(generator, ctx, mask, scores, n_docs=N_DOCS, no_repeat_ngram_size=-1)


@pytest.mark.parametrize(
    ("seed", "eos_bias", "n_docs", "num_beams", "num_return", "extra"),
    [
        (0, 0.0, 2, 1, 1, {}),  # two passages: the general mixture, not the one-context shortcut
        (2, 1.0, 2, 3, 2, {}),
        (3, 1.0, 3, 3, 1, {"early_stopping": "never", "length_penalty": 2.0}),
        (3, 1.0, 3, 3, 2, {"early_stopping": "never", "length_penalty": 0.5}),
        (3, 1.5, 3, 3, 1, {"early_stopping": True, "length_penalty": 2.0}),
        (1, 1.0, 3, 4, 2, {"length_penalty": 0.0}),
        (1, 2.0, 3, 4, 1, {"length_penalty": 3.0}),
    ],
)
def test_rag_token_matches_transformers_across_search_settings(seed, eos_bias, n_docs, num_beams, num_return, extra):
    """Other numbers of passages, length penalties and early-stopping rules than the main comparison."""
    generator, ctx, mask, scores = make(seed, eos_bias, n_docs=n_docs)
    model = reference("token", generator, tiny_question_encoder(), n_docs)
    ref = model.generate(
        context_input_ids=ctx, context_attention_mask=mask, doc_scores=scores, n_docs=n_docs, num_beams=num_beams,
        num_return_sequences=num_return, max_length=NEW_TOKENS + 1, **extra,
    )  # fmt: skip
    ours = rag_token_generate(
        generator, ctx, mask, scores, n_docs=n_docs, num_beams=num_beams, num_return_sequences=num_return,
        max_new_tokens=NEW_TOKENS, **extra,
    )  # fmt: skip
    assert torch.equal(ours, ref)


def test_token_ids_given_in_the_call_override_the_config():
    generator, ctx, mask, scores = make(0, 3.0)
    args = dict(n_docs=N_DOCS, num_beams=2, max_new_tokens=5)
    default = rag_token_generate(generator, ctx, mask, scores, **args)
    assert default.eq(PAD).any()  # some answer ends early and is padded
    other = rag_token_generate(generator, ctx, mask, scores, **args, decoder_start_token_id=BOS, pad_token_id=77)
    assert other[:, 0].eq(BOS).all() and other.eq(77).any() and not other[:, 1:].eq(PAD).any()
    for row in other.tolist():  # padding only after the answer's EOS
        end = row.index(EOS, 1) if EOS in row[1:] else len(row)
        assert all(t == 77 for t in row[end + 1 :]) and 77 not in row[: end + 1]
    assert torch.equal(rag_token_generate(generator, ctx, mask, scores, **args, eos_token_id=[EOS]), default)
    with pytest.raises(ValueError, match=r"^a single eos_token_id is supported, got \[2, 7\]$"):
        rag_token_generate(generator, ctx, mask, scores, **args, eos_token_id=[EOS, 7])
    generator.config.decoder_start_token_id = None
    generator.generation_config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="^decoder_start_token_id and pad_token_id must be given or set in the "
                                         "generator's config$"):
        rag_token_generate(generator, ctx, mask, scores, **args)
    assert rag_token_generate(generator, ctx, mask, scores, **args, decoder_start_token_id=EOS).equal(default)


def test_forced_bos_from_the_config_and_none_switches_it_off():
    generator = tiny_generator(seed=0)
    generator.generation_config.forced_bos_token_id = BOS  # as BART-large's generation config has it
    ctx, mask = contexts(BATCH, N_DOCS, seed=0)
    scores = doc_scores(BATCH, N_DOCS, seed=0)
    for fn in (rag_token_generate, rag_sequence_generate):
        forced = fn(generator, ctx, mask, scores, n_docs=N_DOCS, max_new_tokens=4)
        free = fn(generator, ctx, mask, scores, n_docs=N_DOCS, max_new_tokens=4, forced_bos_token_id=None)
        assert forced[:, 1].eq(BOS).all() and not free[:, 1].eq(BOS).any()


def test_rag_sequence_excludes_the_score_of_a_given_bos():
    """``bos_token_id`` given in the call is the one whose forced first score thorough decoding leaves out."""
    generator, ctx, mask, scores = make(0, 0.0)
    out = rag_sequence_generate(
        generator, ctx, mask, scores, n_docs=N_DOCS, max_new_tokens=4, forced_bos_token_id=7, bos_token_id=7,
        return_scores=True,
    )  # fmt: skip
    assert out.sequences[:, 1].eq(7).all()
    with torch.no_grad():
        logits = generator(
            input_ids=ctx, attention_mask=mask, decoder_input_ids=out.sequences.repeat_interleave(N_DOCS, 0)
        ).logits
    labels = shift_targets(out.sequences, PAD)
    expected = -rag_sequence_nll(logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True, bos_token_id=7)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-5)


def test_one_new_token_is_allowed_and_shapes_are_checked_on_both_sides():
    generator, ctx, mask, scores = make(0, 0.0)
    one = rag_token_generate(generator, ctx, mask, scores, n_docs=N_DOCS, max_new_tokens=1)
    assert one.tolist() == [[EOS, EOS]] * BATCH  # the decoder start, then the forced EOS
    with pytest.raises(ValueError, match=r"^need num_beams >= 1, max_new_tokens >= 1 and 1 <= "
                                         r"num_return_sequences <= num_beams$"):
        rag_token_generate(generator, ctx, mask, scores, n_docs=N_DOCS, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"expected context_input_ids \(B\*3, S\) and doc_scores \(B, 3\)"):
        rag_token_generate(generator, ctx, mask, scores[:-1], n_docs=N_DOCS)  # one example's scores missing


@pytest.mark.parametrize(
    ("seed", "eos_bias", "num_beams", "num_return"), [(0, 0.0, 2, 1), (0, 0.0, 3, 2), (1, 0.0, 1, 1), (2, 0.5, 4, 2)]
)
def test_rag_token_without_forced_eos_matches_transformers(seed, eos_bias, num_beams, num_return):
    """Hypotheses that reach the length limit without EOS finish there, as in transformers' generate with
    its forced EOS switched off."""
    generator, ctx, mask, scores = make(seed, eos_bias)
    model = reference("token", generator, tiny_question_encoder(), N_DOCS)
    model.generation_config.forced_eos_token_id = None
    ref = model.generate(
        context_input_ids=ctx, context_attention_mask=mask, doc_scores=scores, n_docs=N_DOCS, num_beams=num_beams,
        num_return_sequences=num_return, max_length=4, forced_eos_token_id=None,
    )  # fmt: skip
    ours = rag_token_generate(
        generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=num_beams, num_return_sequences=num_return,
        max_new_tokens=3, forced_eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(ours, ref)
    assert not ours[:, -1].eq(EOS).all()  # some hypothesis ends at the limit without EOS


# -------------------------------------------------------------------------------------- no repeated n-grams
@pytest.mark.parametrize("n", [1, 2, 3])
def test_banned_ngrams_equal_transformers_processor(n):
    from transformers import NoRepeatNGramLogitsProcessor

    from rag_lightning.models.decoding import ban_repeated_ngrams

    gen = torch.Generator().manual_seed(n)
    prefixes = torch.randint(0, 4, (6, 9), generator=gen)  # a small vocabulary: many repeats
    logprobs = torch.randn(6, 7, generator=gen).log_softmax(dim=-1)
    expected = NoRepeatNGramLogitsProcessor(n)(prefixes, logprobs.clone())
    got = ban_repeated_ngrams(logprobs, prefixes, n)
    assert torch.equal(got, expected)
    assert got.isinf().any()  # the case bans something
    assert torch.equal(ban_repeated_ngrams(logprobs, prefixes[:, : n - 1], n), logprobs)  # too short: nothing


@pytest.mark.parametrize(("kind", "num_beams"), [("token", 1), ("token", 3), ("sequence", 2)])
def test_no_repeat_ngram_size_matches_transformers(kind, num_beams):
    # unpadded contexts for RAG-Sequence: transformers generates its candidates without the mask
    generator, ctx, mask, scores = make(0, 0.0, padded=kind == "token")
    model = reference(kind, generator, tiny_question_encoder(), N_DOCS)
    decode = rag_token_generate if kind == "token" else rag_sequence_generate
    common = dict(n_docs=N_DOCS, num_beams=num_beams, max_new_tokens=NEW_TOKENS)
    plain = decode(generator, ctx, mask, scores, **common)
    ours = decode(generator, ctx, mask, scores, no_repeat_ngram_size=1, **common)
    ref = model.generate(
        context_input_ids=ctx, context_attention_mask=mask, doc_scores=scores, n_docs=N_DOCS, num_beams=num_beams,
        no_repeat_ngram_size=1, max_length=NEW_TOKENS + 1,
    )  # fmt: skip
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, plain)  # the rule changed the outputs here
    for row in ours.tolist():  # and no token repeats within an output (after the start token, which is EOS)
        tokens = [t for t in row[1:] if t != PAD]
        assert len(tokens) == len(set(tokens))


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence", "closed_book"])
def test_the_module_decodes_without_repeats_when_configured(mode):
    from rag_lightning.config import DecodingConfig, ModelConfig
    from rag_lightning.models.module import RagModule

    generator, ctx, mask, scores = make(0, 0.0)
    tokenizer = SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    ret = {"context_input_ids": ctx, "context_attention_mask": mask, "doc_scores": scores}
    batch = {"question_generator_ids": ctx[::N_DOCS, 1:], "question_generator_mask": mask[::N_DOCS, 1:]}

    def answers(n: int) -> list[list[int]]:
        config = ModelConfig(mode=mode, decoding=DecodingConfig(max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=n))
        module = RagModule(nn.Linear(2, 2), generator, config, generator_tokenizer=tokenizer)
        return [[t for t in row[1:] if t not in (PAD, EOS)] for row in module.generate(batch, ret).tolist()]

    assert any(len(row) != len(set(row)) for row in answers(0))  # repeats without the rule ...
    assert all(len(row) == len(set(row)) for row in answers(1))  # ... none with it
