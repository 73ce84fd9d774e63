"""The three losses against transformers' RAG classes (same modules, float32) and on edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from rag_reference import (
    BOS,
    EOS,
    PAD,
    contexts,
    decoder_inputs,
    doc_scores,
    reference,
    tiny_generator,
    tiny_question_encoder,
)

from rag_lightning.models.marginalize import (
    closed_book_nll,
    rag_sequence_nll,
    rag_token_nll,
    sequence_nll_per_example,
    shift_targets,
)

ATOL, RTOL = 1e-5, 1e-5
BATCH = 3


@pytest.fixture(scope="module")
def models():
    return tiny_generator(), tiny_question_encoder()


def generator_logits(generator, ctx, mask, dec_in, n_docs):
    """Teacher-forced logits on the B*K contexts, as the RAG classes compute them."""
    return generator(
        input_ids=ctx, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(n_docs, 0)
    ).logits


def hf_loss(kind, models, n_docs, scores, dec_in, ctx, mask, label_smoothing=0.0, **kwargs):
    """transformers' per-example loss (reduce_loss=False); ``labels`` are the decoder inputs there."""
    generator, question_encoder = models
    model = reference(kind, generator, question_encoder, n_docs, label_smoothing=label_smoothing)
    out = model(
        context_input_ids=ctx,
        context_attention_mask=mask,
        doc_scores=scores,
        labels=dec_in,
        n_docs=n_docs,
        **kwargs,
    )
    return out.loss


def test_shift_targets():
    dec_in = torch.tensor([[2, 0, 5, 2], [2, 7, 2, 1]])
    assert shift_targets(dec_in, PAD).tolist() == [[0, 5, 2, 1], [7, 2, 1, 1]]


@pytest.mark.parametrize("n_docs", [1, 3, 5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_rag_sequence_matches_transformers(models, n_docs, label_smoothing, exclude_bos):
    ctx, mask = contexts(BATCH, n_docs)
    scores = doc_scores(BATCH, n_docs)
    dec_in = decoder_inputs(BATCH, bos_first=exclude_bos)  # padded rows of different lengths
    assert dec_in.eq(PAD).any()
    with torch.no_grad():
        logits = generator_logits(models[0], ctx, mask, dec_in, n_docs)
        ours = rag_sequence_nll(
            logits,
            scores,
            shift_targets(dec_in, PAD),
            pad_token_id=PAD,
            exclude_bos_score=exclude_bos,
            bos_token_id=BOS,
            label_smoothing=label_smoothing,
        )
        ref = hf_loss(
            "sequence",
            models,
            n_docs,
            scores,
            dec_in,
            ctx,
            mask,
            label_smoothing,
            exclude_bos_score=exclude_bos,
        )
    assert ours.shape == (BATCH,)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_exclude_bos_changes_the_loss(models):
    """Guards the test above against a vacuous pass: the excluded BOS score is not zero."""
    ctx, mask = contexts(BATCH, 3)
    scores, dec_in = doc_scores(BATCH, 3), decoder_inputs(BATCH, bos_first=True)
    with torch.no_grad():
        logits = generator_logits(models[0], ctx, mask, dec_in, 3)
    labels = shift_targets(dec_in, PAD)
    kept = rag_sequence_nll(logits, scores, labels, pad_token_id=PAD)
    dropped = rag_sequence_nll(
        logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True, bos_token_id=BOS
    )
    assert (kept - dropped).abs().min() > 1e-3


def test_exclude_bos_is_a_batch_rule_like_transformers(models):
    """BOS is excluded only when every row starts with it (transformers' ``use_bos``)."""
    ctx, mask = contexts(BATCH, 3)
    scores, dec_in = doc_scores(BATCH, 3), decoder_inputs(BATCH, bos_first=True)
    dec_in[1, 1] = 7  # one row without BOS
    with torch.no_grad():
        logits = generator_logits(models[0], ctx, mask, dec_in, 3)
        ours = rag_sequence_nll(
            logits,
            scores,
            shift_targets(dec_in, PAD),
            pad_token_id=PAD,
            exclude_bos_score=True,
            bos_token_id=BOS,
        )
        ref = hf_loss("sequence", models, 3, scores, dec_in, ctx, mask, exclude_bos_score=True)
        plain = rag_sequence_nll(logits, scores, shift_targets(dec_in, PAD), pad_token_id=PAD)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours, plain)


@pytest.mark.parametrize("n_docs", [1, 3, 5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_rag_token_matches_transformers(models, n_docs, label_smoothing):
    ctx, mask = contexts(BATCH, n_docs)
    scores, dec_in = doc_scores(BATCH, n_docs), decoder_inputs(BATCH)
    with torch.no_grad():
        logits = generator_logits(models[0], ctx, mask, dec_in, n_docs)
        ours = rag_token_nll(
            logits, scores, shift_targets(dec_in, PAD), pad_token_id=PAD, label_smoothing=label_smoothing
        )
        ref = hf_loss("token", models, n_docs, scores, dec_in, ctx, mask, label_smoothing)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_gradients_reach_the_question_encoder(models, kind):
    """doc_scores = q(x) . d(z) with fixed passage vectors; our loss and transformers' give the same gradients."""
    generator, question_encoder = models
    n_docs = 3
    ctx, mask = contexts(BATCH, n_docs)
    dec_in = decoder_inputs(BATCH)
    questions = torch.randint(3, 60, (BATCH, 6), generator=torch.Generator().manual_seed(5))
    passages = torch.randn(
        BATCH, n_docs, question_encoder.config.hidden_size, generator=torch.Generator().manual_seed(6)
    )
    loss_fn = rag_sequence_nll if kind == "sequence" else rag_token_nll

    def encoder_grads(use_reference: bool) -> list[torch.Tensor]:
        question_encoder.zero_grad()
        q = question_encoder(input_ids=questions).pooler_output
        scores = torch.einsum("bd,bkd->bk", q, passages)
        if use_reference:
            loss = hf_loss(kind, models, n_docs, scores, dec_in, ctx, mask)
        else:
            with torch.no_grad():
                logits = generator_logits(generator, ctx, mask, dec_in, n_docs)
            loss = loss_fn(logits, scores, shift_targets(dec_in, PAD), pad_token_id=PAD)
        loss.sum().backward()
        return [p.grad.clone() for p in question_encoder.parameters() if p.grad is not None]

    ours, ref = encoder_grads(False), encoder_grads(True)
    question_encoder.zero_grad()
    generator.zero_grad()
    assert len(ours) == len(ref) > 0
    assert sum(g.abs().sum() for g in ours) > 0
    for g_ours, g_ref in zip(ours, ref):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


def random_case(n_docs: int, length: int = 6, vocab: int = 11, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH * n_docs, length, vocab, generator=gen) * 3
    labels = torch.randint(3, vocab, (BATCH, length), generator=gen)
    labels[1, 4:] = PAD
    return logits, torch.randn(BATCH, n_docs, generator=gen), labels


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_one_passage_is_the_closed_book_loss(label_smoothing):
    logits, scores, labels = random_case(n_docs=1)
    closed = closed_book_nll(logits, labels, pad_token_id=PAD, label_smoothing=label_smoothing)
    for fn in (rag_sequence_nll, rag_token_nll):
        torch.testing.assert_close(
            fn(logits, scores, labels, pad_token_id=PAD, label_smoothing=label_smoothing), closed
        )
    per_token = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=PAD, label_smoothing=label_smoothing, reduction="none"
    )
    torch.testing.assert_close(closed, per_token.sum(dim=1))


@pytest.mark.parametrize("fn", [rag_sequence_nll, rag_token_nll])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_passage_with_score_minus_inf_contributes_nothing(fn, label_smoothing):
    logits, scores, labels = random_case(n_docs=3)
    scores[:, 1] = -float("inf")
    keep = torch.tensor([i for i in range(BATCH * 3) if i % 3 != 1])
    without = fn(logits[keep], scores[:, [0, 2]], labels, pad_token_id=PAD, label_smoothing=label_smoothing)
    logits = logits.clone().requires_grad_(True)
    leaf = scores.clone().requires_grad_(True)
    loss = fn(logits, leaf, labels, pad_token_id=PAD, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, without)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(leaf.grad).all()
    assert logits.grad[1::3].abs().max() == 0  # the dead passage's logits get no gradient


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
def test_all_pad_labels_give_zero_not_nan(label_smoothing, reduction):
    logits, scores, labels = random_case(n_docs=3)
    labels = torch.full_like(labels, PAD)
    logits.requires_grad_(True)
    scores.requires_grad_(True)
    losses = [
        rag_sequence_nll(
            logits, scores, labels, pad_token_id=PAD, label_smoothing=label_smoothing, reduction=reduction
        ),
        rag_token_nll(
            logits, scores, labels, pad_token_id=PAD, label_smoothing=label_smoothing, reduction=reduction
        ),
        closed_book_nll(
            logits[:BATCH], labels, pad_token_id=PAD, label_smoothing=label_smoothing, reduction=reduction
        ),
    ]
    for loss in losses:
        assert torch.equal(loss, torch.zeros_like(loss))
    sum(loss.sum() for loss in losses).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_finite_float32_losses(dtype):
    logits, scores, labels = random_case(n_docs=3, vocab=50)
    logits = logits * 8  # peaked distributions: exp() of these overflows fp16
    for fn in (rag_sequence_nll, rag_token_nll):
        low = fn(logits.to(dtype), scores.to(dtype), labels, pad_token_id=PAD, label_smoothing=0.1)
        full = fn(
            logits.to(dtype).float(), scores.to(dtype).float(), labels, pad_token_id=PAD, label_smoothing=0.1
        )
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        torch.testing.assert_close(low, full)


def test_long_answers_and_many_passages_do_not_underflow():
    """p(y|x,z) ~ e^-2400 here: a probability-space product is 0 in float32, the log-space sum is not."""
    n_docs, length, vocab = 20, 400, 50
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n_docs, length, vocab, generator=gen)
    scores = torch.randn(1, n_docs, generator=gen)
    labels = torch.randint(3, vocab, (1, length), generator=gen)
    seq = rag_sequence_nll(logits, scores, labels, pad_token_id=PAD)
    tok = rag_token_nll(logits, scores, labels, pad_token_id=PAD)
    # float64 references
    token_lp = logits.double().log_softmax(-1).gather(-1, labels.expand(n_docs, -1).unsqueeze(-1)).squeeze(-1)
    prior = scores.double().log_softmax(-1)[0]
    seq_ref = -torch.logsumexp(token_lp.sum(-1) + prior, dim=0)
    tok_ref = -torch.logsumexp(token_lp + prior[:, None], dim=0).sum()
    assert seq.item() > 1000 and math.isfinite(seq.item())
    torch.testing.assert_close(seq.double(), seq_ref.view(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(tok.double(), tok_ref.view(1), rtol=1e-5, atol=0)


def test_reductions():
    logits, scores, labels = random_case(n_docs=2)
    for fn in (rag_sequence_nll, rag_token_nll):
        per = fn(logits, scores, labels, pad_token_id=PAD)
        assert per.shape == (BATCH,)
        torch.testing.assert_close(fn(logits, scores, labels, pad_token_id=PAD, reduction="sum"), per.sum())
        torch.testing.assert_close(fn(logits, scores, labels, pad_token_id=PAD, reduction="mean"), per.mean())
        n_tokens = labels.ne(PAD).sum()
        torch.testing.assert_close(
            fn(logits, scores, labels, pad_token_id=PAD, reduction="token_mean"), per.sum() / n_tokens
        )
    with pytest.raises(ValueError, match="token_mean"):
        rag_token_nll(logits, scores, labels, pad_token_id=PAD, reduction="avg")
    with pytest.raises(ValueError, match="none"):
        closed_book_nll(logits[:BATCH], labels, pad_token_id=PAD, reduction="batchmean")


def test_shape_errors():
    logits, scores, labels = random_case(n_docs=2)
    with pytest.raises(ValueError, match="B\\*K"):
        rag_token_nll(logits[:-1], scores, labels, pad_token_id=PAD)
    with pytest.raises(ValueError, match="doc_scores"):
        rag_sequence_nll(logits, scores[:-1], labels, pad_token_id=PAD)
    with pytest.raises(ValueError, match="bos_token_id"):
        rag_sequence_nll(logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True)


def test_single_token_target_keeps_the_doc_prior():
    """Deliberate difference from transformers, which adds log p(z|x) at target position 1 and so drops it for
    one-token targets (e.g. an immediate EOS): here the formula holds for every length."""
    logits, scores, _ = random_case(n_docs=3)
    labels = torch.full((BATCH, logits.shape[1]), PAD)
    labels[:, 0] = EOS
    token_lp = logits.log_softmax(-1)[:, 0, EOS].view(BATCH, 3)
    expected = -torch.logsumexp(token_lp + scores.log_softmax(-1), dim=1)
    torch.testing.assert_close(rag_sequence_nll(logits, scores, labels, pad_token_id=PAD), expected)
    torch.testing.assert_close(rag_token_nll(logits, scores, labels, pad_token_id=PAD), expected)


def test_per_example_bos_rule():
    logits, scores, labels = random_case(n_docs=2)
    labels[:, 0] = BOS
    skip = torch.tensor([True, False, True])
    mixed = sequence_nll_per_example(logits, scores, labels, PAD, skip)
    all_skipped = rag_sequence_nll(
        logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True, bos_token_id=BOS
    )
    none_skipped = rag_sequence_nll(logits, scores, labels, pad_token_id=PAD)
    torch.testing.assert_close(mixed, torch.where(skip, all_skipped, none_skipped))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_rows_without_targets_get_exactly_zero(label_smoothing):
    """An all-pad row (an empty target) contributes nothing to any loss, with label smoothing too (whose
    doc-prior term alone would not vanish), and leaves the other rows' losses as they are."""
    logits, scores, labels = random_case(n_docs=3)
    scores = scores + torch.tensor([4.0, 0.0, -4.0])  # a peaked, non-uniform prior
    empty = labels.clone()
    empty[1] = PAD
    for fn in (rag_sequence_nll, rag_token_nll):
        full = fn(logits, scores, labels, pad_token_id=PAD, label_smoothing=label_smoothing)
        got = fn(logits, scores, empty, pad_token_id=PAD, label_smoothing=label_smoothing)
        assert got[1].item() == 0.0, fn.__name__
        torch.testing.assert_close(got[[0, 2]], full[[0, 2]])
    got = closed_book_nll(logits[::3], empty, pad_token_id=PAD, label_smoothing=label_smoothing)
    assert got[1].item() == 0.0


def test_bos_exclusion_without_a_bos_id_says_what_is_missing():
    logits, scores, labels = random_case(n_docs=2)
    with pytest.raises(ValueError, match=r"^exclude_bos_score=True needs bos_token_id$"):
        rag_sequence_nll(logits, scores, labels, pad_token_id=PAD, exclude_bos_score=True)


def test_shape_errors_say_what_was_expected_and_got():
    logits, scores, labels = random_case(n_docs=2)  # labels (3, 6), logits (6, 6, 11)
    with pytest.raises(ValueError, match=r"^expected labels \(B, T\) and logits \(B\*K, T, V\), got \(3, 6, 1\), "
                                         r"\(6, 6, 11\)$"):
        rag_token_nll(logits, scores, labels[..., None], pad_token_id=PAD)  # only the labels are wrong
    with pytest.raises(ValueError, match=r"^logits must be \(B\*K=6, T=6, V\), got \(5, 6, 11\)$"):
        rag_sequence_nll(logits[:-1], scores, labels, pad_token_id=PAD)


def test_token_mean_of_a_single_target_token_is_its_nll():
    logits, scores, labels = random_case(n_docs=2)
    one = torch.full_like(labels, PAD)
    one[0, 0] = labels[0, 0]  # one target token in the whole batch
    for fn in (rag_sequence_nll, rag_token_nll):
        per = fn(logits, scores, one, pad_token_id=PAD)
        torch.testing.assert_close(fn(logits, scores, one, pad_token_id=PAD, reduction="token_mean"), per[0])
