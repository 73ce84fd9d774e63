import math

import pytest
import torch
from transformers import BartConfig

from rag_lightning.config import ConfigError, GeneratorConfig, section
from rag_lightning.models.copy_generator import (
    CopyBartForConditionalGeneration,
    bigram_continuation_feature,
    continuation_feature,
    copy_mixture_log_probs,
    match_distance_feature,
    question_match_feature,
    separator_start,
)


def _model(
    seed: int = 0,
    continuation: bool = False,
    match: bool = False,
    unique: bool = False,
    bigram: bool = False,
    view: int | None = None,
    distance: int = 0,
) -> CopyBartForConditionalGeneration:
    cfg = BartConfig(
        question_match_distance=distance,
        question_view_dim=view,
        copy_continuation=continuation,
        copy_continuation_bigram=bigram,
        question_match_separator=[7, 8] if match else None,
        question_match_unique=unique,
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    return CopyBartForConditionalGeneration(cfg).eval()


def _encode_after(model, ids, *setups) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each setup (a change of the model's weights, applied in turn), the token embeddings the BART
    encoder was given and the states the copy encoder returned."""
    encoder = model.get_encoder()
    seen = []
    hook = encoder.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
    )
    outputs = []
    try:
        with torch.no_grad():
            for setup in setups:
                setup()
                outputs.append(encoder(input_ids=ids).last_hidden_state)
    finally:
        hook.remove()
    return list(zip(seen, outputs, strict=True))


SOURCE = torch.tensor([[0, 5, 6, 7, 2, 1], [0, 9, 9, 30, 11, 2]])
MASK = (SOURCE != 1).long()


def test_mixture_matches_hand_computation():
    vocab_logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    attention = torch.tensor([[[0.75, 0.25]]])  # over source positions holding tokens 2 and 2
    source_ids = torch.tensor([[2, 2]])
    gate = torch.tensor([[0.6]])
    got = copy_mixture_log_probs(vocab_logits, attention, source_ids, gate).exp()
    expected = torch.tensor([0.6 * 0.5, 0.6 * 0.25, 0.6 * 0.25 + 0.4 * 1.0])
    assert torch.allclose(got[0, 0], expected, atol=1e-6)


def test_distribution_sums_to_one():
    model = _model()
    dec = torch.tensor([[2, 5, 6], [2, 9, 30]])
    log_p = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2, 3), atol=1e-5)


def test_loss_is_the_mean_token_nll_of_the_mixture():
    model = _model()
    dec = torch.tensor([[2, 5, 6], [2, 9, 30]])
    labels = torch.tensor([[5, 6, 2], [9, 30, 1]])
    out = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, labels=labels)
    picked = out.logits.gather(-1, labels[..., None]).squeeze(-1)
    keep = labels != 1
    assert math.isclose(out.loss.item(), -(picked[keep]).mean().item(), rel_tol=1e-6)


def test_continuation_feature_marks_positions_after_the_emitted_token():
    source = torch.tensor([[0, 5, 6, 5, 7, 2]])
    dec = torch.tensor([[2, 5, 7]])
    got = continuation_feature(source, dec)
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],  # after </s>: nothing in the source follows it
            [0, 0, 1, 0, 1, 0],  # after 5: positions 2 and 4 follow a 5
            [0, 0, 0, 0, 0, 1],  # after 7: position 5
        ],
        dtype=torch.float,
    )
    assert torch.equal(got[0], expected)


def test_continuation_weight_moves_the_pointer_to_the_next_position():
    model = _model(seed=2, continuation=True)
    dec = torch.tensor([[2, 5], [2, 9]])
    with torch.no_grad():
        model.copy_continue.weight.zero_()
        model.copy_continue.bias.fill_(0.0)
        before = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
        model.copy_continue.bias.fill_(30.0)
        after = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    # after emitting 5 the pointer now sits on the 6 that follows it in the source
    assert after[0, 1, 6] > before[0, 1, 6]
    assert torch.allclose(after.exp().sum(-1), torch.ones(2, 2), atol=1e-5)


def test_question_match_marks_tokens_shared_across_the_separator():
    # <s> q: 10 11 12 // passage: 13 11 10 14 </s> <pad>; 7 8 is the separator
    ids = torch.tensor([[0, 10, 11, 12, 7, 8, 13, 11, 10, 14, 2, 1], [0, 10, 11, 2, 1, 1, 1, 1, 1, 1, 1, 1]])
    got = question_match_feature(ids, [7, 8], special_ids=[0, 1, 2])
    assert got[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert got[1].tolist() == [0] * 12  # no separator: no question/passage split


def test_question_match_embedding_changes_only_matching_inputs():
    """The match feature is added to the token embeddings the encoder reads: with level 1's embedding set to
    ones, exactly the inputs that match across the separator (the two 11s) move, each by one in every
    dimension, and every other input is the plain token embedding."""
    model = _model(seed=4, match=True)
    ids = torch.tensor([[0, 10, 11, 7, 8, 11, 12, 2]])
    encoder = model.get_encoder()

    def level_one_ones() -> None:
        model.match_embedding.weight[1] = 1.0

    (base_inputs, base), (marked_inputs, marked) = _encode_after(
        model, ids, model.match_embedding.weight.zero_, level_one_ones
    )
    with torch.no_grad():
        plain = encoder.encoder(input_ids=ids).last_hidden_state  # BART's own encoder on the ids
    assert torch.equal(base_inputs, encoder.encoder.embed_tokens(ids))  # level 0 adds nothing
    moved = (marked_inputs - base_inputs).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert moved == [2, 5]  # question 11 and passage 11; not 10, 12, the separator or special tokens
    torch.testing.assert_close(marked_inputs[0, moved] - base_inputs[0, moved], torch.ones(2, 16))
    torch.testing.assert_close(base[..., :-1], plain)  # a zero feature leaves the encoder's output as it was
    assert not torch.allclose(base, marked)
    assert torch.equal(marked[..., -1], ids.float())  # the id channel is untouched


@pytest.mark.parametrize(("continuation", "match", "unique"), [(False, False, False), (True, False, False),
                                                             (True, True, False), (True, True, True)])
def test_incremental_decoding_with_cache_equals_full_forward(continuation, match, unique):
    model = _model(seed=3, continuation=continuation, match=match, unique=unique)
    dec = torch.tensor([[2, 5, 6, 7], [2, 9, 30, 11]])
    full = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    enc = model.get_encoder()(input_ids=SOURCE, attention_mask=MASK)
    cache, steps = None, []
    for t in range(dec.shape[1]):
        out = model(
            encoder_outputs=enc, attention_mask=MASK, decoder_input_ids=dec[:, t : t + 1], cache=cache, use_cache=True
        )
        cache = out.cache
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("continuation", [False, True])
def test_generate_with_and_without_cache_agree(continuation):
    model = _model(seed=5, continuation=continuation)
    kwargs = {"input_ids": SOURCE, "attention_mask": MASK, "max_new_tokens": 6, "do_sample": False}
    for beams in (1, 3):
        with_cache = model.generate(num_beams=beams, **kwargs)
        without = model.generate(num_beams=beams, use_cache=False, **kwargs)
        assert torch.equal(with_cache, without)


@pytest.mark.parametrize(("continuation", "match", "unique"), [(False, False, False), (True, True, False),
                                                             (True, True, True)])
def test_save_and_load_round_trip(tmp_path, continuation, match, unique):
    model = _model(continuation=continuation, match=match, unique=unique, bigram=unique, distance=3 if unique else 0)
    model.save_pretrained(tmp_path)
    again = CopyBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert getattr(again.config, "question_match_unique", False) == unique
    if unique:
        assert torch.equal(again.match_after.weight, model.match_after.weight)
    else:
        assert again.match_after is None
    assert (again.copy_continue_bigram is not None) == unique
    dec = torch.tensor([[2, 5], [2, 9]])
    a = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    b = again(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    assert torch.equal(a, b)


def test_foreign_encoder_states_are_refused():
    model = _model()
    plain = model.model.encoder(input_ids=SOURCE, attention_mask=MASK)
    with pytest.raises(ValueError, match="token-id channel"):
        model(encoder_outputs=(plain.last_hidden_state,), attention_mask=MASK, decoder_input_ids=SOURCE[:, :1])


def test_build_generator_wires_continuation_and_refuses_it_without_copy():

    from rag_lightning.models.generator import build_generator

    class _Tok:
        pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

        def __len__(self) -> int:
            return 40

    arch = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32}
    node = {"kind": "random", "tokenizer": "tok", "copy": True, "copy_continuation": True, "config": arch}
    model = build_generator(section(GeneratorConfig, node, "model.generator"), _Tok())
    assert isinstance(model, CopyBartForConditionalGeneration) and model.copy_continue is not None
    assert model.match_embedding is None
    with pytest.raises(ConfigError, match="copy_continuation=true needs model.generator.copy=true"):
        section(GeneratorConfig, {**node, "copy": False}, "model.generator")


@pytest.mark.parametrize("unique", [False, True])
def test_build_generator_gives_question_match_the_context_separator(tmp_path, unique, make_gen_tokenizer):

    from rag_lightning.data.pieces import piece_ids
    from rag_lightning.models.generator import build_generator

    tok = make_gen_tokenizer(tmp_path / "tok")
    arch = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32}
    cfg = GeneratorConfig(kind="random", tokenizer="tok", copy=True, question_match=True,
                          question_match_unique=unique, config=arch)
    model = build_generator(cfg, tok)
    assert model.config.question_match_separator == piece_ids(tok, "//")
    assert model.match_embedding.num_embeddings == (3 if unique else 2)


def test_question_match_unique_marks_matches_that_occur_once_on_their_side():
    # <s> q: 10 11 12 // passage: 10 11 10 14 </s>: 10 repeats in the passage, 11 does not
    ids = torch.tensor([[0, 10, 11, 12, 7, 8, 10, 11, 10, 14, 2, 1]])
    got = question_match_feature(ids, [7, 8], special_ids=[0, 1, 2], mark_unique=True)
    assert got[0].tolist() == [0, 2, 2, 0, 0, 0, 1, 2, 1, 0, 0, 0]
    plain = question_match_feature(ids, [7, 8], special_ids=[0, 1, 2])
    assert torch.equal(got > 0, plain.bool())  # the same tokens match; only the level differs


def test_question_match_unique_needs_question_match(tmp_path):


    node = {"kind": "random", "tokenizer": "tok", "copy": True, "question_match": False,
            "question_match_unique": True}
    with pytest.raises(ConfigError, match="question_match_unique=true needs model.generator.question_match=true"):
        section(GeneratorConfig, node, "model.generator")


def test_bigram_continuation_fires_only_after_the_last_two_tokens():
    # source: 5 , 7 , 9 (",": 6); emitted so far: 5 , -> only 7 continues "5 ," (not 9, which follows "7 ,")
    source = torch.tensor([[5, 6, 7, 6, 9]])
    dec = torch.tensor([[2, 5, 6]])  # decoder inputs: start, 5, ","
    got = bigram_continuation_feature(source, dec)
    assert got[0, 2].tolist() == [0, 0, 1, 0, 0]
    assert got[0, 1].tolist() == [0, 0, 0, 0, 0]  # "start 5" never occurs in the source
    # one step at a time: the token before comes as history
    step = bigram_continuation_feature(source, dec[:, 2:], history=dec[:, 1:2])
    assert torch.equal(step[0, 0], got[0, 2])


@pytest.mark.parametrize("beams", [1, 3])
def test_bigram_generate_with_and_without_cache_agree(beams):
    model = _model(seed=5, continuation=True, bigram=True)
    with torch.no_grad():
        model.copy_continue_bigram.bias.fill_(5.0)  # make the feature matter
    kwargs = {"input_ids": SOURCE, "attention_mask": MASK, "max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(num_beams=beams, **kwargs), model.generate(num_beams=beams, use_cache=False, **kwargs))


def test_bigram_cached_steps_equal_full_forward_and_need_history():
    model = _model(seed=3, continuation=True, bigram=True)
    with torch.no_grad():
        model.copy_continue_bigram.bias.fill_(5.0)
    dec = torch.tensor([[2, 5, 6, 7], [2, 9, 30, 11]])
    full = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    enc = model.get_encoder()(input_ids=SOURCE, attention_mask=MASK)
    cache, steps = None, []
    for t in range(dec.shape[1]):
        history = dec[:, t - 1 : t] if t else None
        out = model(encoder_outputs=enc, attention_mask=MASK, decoder_input_ids=dec[:, t : t + 1], cache=cache,
                    use_cache=True, copy_history=history)
        cache = out.cache
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="needs copy_history"):
        model(encoder_outputs=enc, attention_mask=MASK, decoder_input_ids=dec[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize("beams", [1, 2])
def test_rag_token_decoder_gives_the_bigram_feature_its_history(beams):
    from rag_lightning.models.decoding import rag_token_generate

    model = _model(seed=7, continuation=True, bigram=True)
    with torch.no_grad():
        model.copy_continue_bigram.bias.fill_(5.0)
    doc_scores = torch.tensor([[0.3, -0.2]])
    got = rag_token_generate(model, SOURCE, MASK, doc_scores, n_docs=2, num_beams=beams, max_new_tokens=5)
    # reference for greedy: the marginal of full (uncached) forwards, one token at a time
    if beams == 1:
        prefix = torch.tensor([[model.config.decoder_start_token_id]])
        for _ in range(5):
            logits = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=prefix.repeat(2, 1)).logits
            mix = (logits[:, -1].log_softmax(-1) + doc_scores.log_softmax(-1).T).logsumexp(0)
            prefix = torch.cat([prefix, mix.argmax().view(1, 1)], dim=1)
            if prefix[0, -1] == model.config.eos_token_id:
                break
        assert got[0, : prefix.shape[1]].tolist() == prefix[0].tolist()
    else:  # the model refuses a later cached step without history, so beam search got it on every step
        assert got.shape[0] == 1 and got.shape[1] > 1


VIEW = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])  # one question vector per context row of SOURCE


def test_question_view_enters_the_first_position_only():
    model = _model(seed=9, view=3)
    enc = model.get_encoder()
    plain = model.model.encoder(input_ids=SOURCE, attention_mask=MASK).last_hidden_state
    embeds = model.model.encoder.embed_tokens(SOURCE)
    embeds[:, 0] += model.question_view(VIEW)
    by_hand = model.model.encoder(inputs_embeds=embeds, attention_mask=MASK).last_hidden_state
    got = enc(input_ids=SOURCE, attention_mask=MASK, question_view=VIEW).last_hidden_state
    assert torch.allclose(got[..., :-1], by_hand, atol=1e-6)
    assert not torch.allclose(got[..., :-1], plain, atol=1e-3)  # the view changes what the reader reads
    assert torch.equal(got[..., -1], SOURCE.float())  # the id channel is untouched


def test_question_view_is_required_by_a_reader_of_it_and_refused_by_others():
    dec = torch.tensor([[2, 5], [2, 9]])
    with pytest.raises(ValueError, match="pass question_view"):
        _model(view=3)(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec)
    with pytest.raises(ValueError, match="no view projection"):
        _model()(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, question_view=VIEW)


def test_question_view_trains_its_projection_and_survives_save_and_load(tmp_path):
    model = _model(seed=4, view=3).train()
    dec = torch.tensor([[2, 5], [2, 9]])
    out = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, labels=dec, question_view=VIEW)
    out.loss.backward()
    assert model.question_view.weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    again = CopyBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    a = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, question_view=VIEW).logits
    b = again(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, question_view=VIEW).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rag_decoders_hand_the_question_view_to_the_encoder(mode):
    from rag_lightning.models.decoding import rag_sequence_generate, rag_token_generate

    model = _model(seed=11, view=3)
    doc_scores = torch.tensor([[0.3, -0.2]])
    decode = rag_token_generate if mode == "token" else rag_sequence_generate
    got = decode(model, SOURCE, MASK, doc_scores, n_docs=2, max_new_tokens=5, question_view=VIEW)
    if mode == "token":  # greedy reference: the marginal of full forwards with the view, one token at a time
        prefix = torch.tensor([[model.config.decoder_start_token_id]])
        for _ in range(5):
            logits = model(
                input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=prefix.repeat(2, 1), question_view=VIEW
            ).logits
            mix = (logits[:, -1].log_softmax(-1) + doc_scores.log_softmax(-1).T).logsumexp(0)
            prefix = torch.cat([prefix, mix.argmax().view(1, 1)], dim=1)
            if prefix[0, -1] == model.config.eos_token_id:
                break
        assert got[0, : prefix.shape[1]].tolist() == prefix[0].tolist()
    else:
        assert got.shape[0] == 1
    with pytest.raises(ValueError, match="pass question_view"):
        decode(model, SOURCE, MASK, doc_scores, n_docs=2, max_new_tokens=5)


def test_question_view_needs_copy_and_retrieval():
    from rag_lightning.config import ModelConfig

    node = {"kind": "random", "tokenizer": "tok", "question_view": True}
    with pytest.raises(ConfigError, match="question_view=true needs model.generator.copy=true"):
        section(GeneratorConfig, node, "model.generator")
    with pytest.raises(ConfigError, match="mode=closed_book has none"):
        section(ModelConfig, {"mode": "closed_book", "generator": {**node, "copy": True}}, "model")


def test_match_distance_counts_from_the_unique_matches_on_each_side():
    # <s> q: 10 11 12 // passage: 13 11 14 15 16 10 17 </s>: 10 and 11 occur once on each side (level 2)
    ids = torch.tensor([[0, 10, 11, 12, 7, 8, 13, 11, 14, 15, 16, 10, 17, 2]])
    match = question_match_feature(ids, [7, 8], special_ids=[0, 1, 2], mark_unique=True)
    start = separator_start(ids, [7, 8])
    assert match[0].tolist() == [0, 2, 2, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0] and start.tolist() == [4]
    after, before = match_distance_feature(match, start, separator_length=2, limit=3)
    # after: steps since the last unique match on the token's own side. The question's 11 does not reach the
    # passage (13 and the passage's 11 get 0), the separator gets 0, 10 stands 4 > 3 after the passage's 11
    assert after[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 2, 3, 0, 1, 2]
    # before: steps to the next unique match on the token's own side
    assert before[0].tolist() == [1, 1, 0, 0, 0, 0, 1, 0, 3, 2, 1, 0, 0, 0]


def test_match_distance_embeddings_move_only_tokens_near_a_unique_match():
    model = _model(seed=5, match=True, unique=True, distance=2)
    assert model.match_after.num_embeddings == 3 and model.match_before.num_embeddings == 3
    # <s> q: 10 11 // passage: 20 21 11 22 23 24 </s>: only 11 matches (once on each side)
    ids = torch.tensor([[0, 10, 11, 7, 8, 20, 21, 11, 22, 23, 24, 2]])

    def zero() -> None:
        model.match_after.weight.zero_()
        model.match_before.weight.zero_()

    def mark() -> None:
        model.match_after.weight[1] = 1.0  # one step after a unique match
        model.match_before.weight[2] = 10.0  # two steps before one

    (before_inputs, _), (after_inputs, _) = _encode_after(model, ids, zero, mark)
    moved = (after_inputs - before_inputs)[0, :, 0].tolist()
    # 22 is one step after the passage's 11; 20 two before it; <s> two before the question's 11
    assert moved == pytest.approx([10.0, 0, 0, 0, 0, 10.0, 0, 0, 1.0, 0, 0, 0])


def test_match_distance_needs_the_unique_mark(tmp_path):
    node = {"kind": "random", "tokenizer": "tok", "copy": True, "question_match": True, "question_match_distance": 4}
    with pytest.raises(ConfigError, match="question_match_distance=4 counts from the unique matches"):
        section(GeneratorConfig, node, "model.generator")
    with pytest.raises(ConfigError, match="question_match_distance must be >= 0"):
        section(GeneratorConfig, {**node, "question_match_unique": True, "question_match_distance": -1}, "model.generator")
