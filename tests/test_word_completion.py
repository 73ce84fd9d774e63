"""The decoding rule that finishes a word copied from a passage (models/word_completion.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from rag_reference import BOS, EOS, VOCAB, tiny_generator

from rag_lightning.config import ConfigError, DecodingConfig, GeneratorConfig, Mode, ModelConfig
from rag_lightning.data.pieces import piece_ids
from rag_lightning.models.decoding import rag_sequence_generate, rag_token_generate
from rag_lightning.models.module import RagModule
from rag_lightning.models.word_completion import AnswerStartsAtWord, CopiedWordCompletion, WordPieces

# a hand vocabulary: 10-19 begin a word of letters, 20-29 continue one, the rest (numbers, punctuation) neither
STARTS = tuple(10 <= i < 20 for i in range(VOCAB))
CONTINUES = tuple(20 <= i < 30 for i in range(VOCAB))
PIECES = WordPieces(STARTS, CONTINUES)
NUMBER, COMMA = 40, 41


def rule(*rows: list[list[int]], num_beams: int = 1) -> CopiedWordCompletion:
    width = max(len(context) for row in rows for context in row)
    padded = [[context + [-1] * (width - len(context)) for context in row] for row in rows]
    return CopiedWordCompletion(torch.tensor(padded), PIECES, num_beams)


def test_a_word_begun_by_copying_continues_as_the_passage_spells_it():
    words = rule([[BOS, 11, 10, 20, 21, 5, EOS]])
    assert words.allowed(0, [EOS, 10]) == {20}
    assert words.allowed(0, [EOS, 10, 20]) == {21}
    assert words.allowed(0, [EOS, 10, 20, 21]) is None  # the passage's word ends here
    assert words.allowed(0, [EOS, 11]) is None  # a whole one-piece word
    assert words.allowed(0, [EOS, 12]) is None  # not in the passage: the generator is not copying
    assert words.allowed(0, [EOS, 10, 22]) is None  # left the passage's spelling
    assert words.allowed(0, [EOS]) is None and words.allowed(0, [EOS, 5]) is None


def test_a_word_that_also_stands_whole_or_ends_a_passage_may_end():
    whole_elsewhere = rule([[BOS, 10, 20, EOS], [BOS, 10, 5, EOS]])
    assert whole_elsewhere.allowed(0, [EOS, 10]) is None
    at_the_end = rule([[BOS, 10, 20], [BOS, 10]])  # the second context is padded right after the word
    assert at_the_end.allowed(0, [EOS, 10]) is None


def test_every_continuation_the_passages_offer_is_allowed():
    words = rule([[BOS, 10, 20, EOS], [BOS, 5, 10, 22, 23, EOS]])
    assert words.allowed(0, [EOS, 10]) == {20, 22}
    assert words.allowed(0, [EOS, 10, 22]) == {23}


def test_numbers_and_punctuation_are_never_held():
    words = rule([[BOS, NUMBER, COMMA, NUMBER, EOS]])
    assert words.allowed(0, [EOS, NUMBER]) is None
    assert words.allowed(0, [EOS, NUMBER, COMMA]) is None


def test_hypotheses_read_their_own_rows_contexts():
    words = rule([[BOS, 10, 20, EOS]], [[BOS, 10, 21, EOS]], num_beams=2)
    logprobs = torch.zeros(4, VOCAB)
    prefixes = torch.tensor([[EOS, 10], [EOS, 5], [EOS, 10], [EOS, 10]])
    out = words(logprobs, prefixes)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [20]
    assert torch.equal(out[1], logprobs[1])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [21]
    assert torch.isfinite(out[3]).nonzero().flatten().tolist() == [21]
    assert words(logprobs, torch.tensor([[EOS, 5]] * 4)) is logprobs  # nothing held: the same tensor


def test_word_pieces_of_the_byte_level_generator_tokenizer(make_gen_tokenizer, tmp_path):
    tokenizer = make_gen_tokenizer(tmp_path)
    pieces = WordPieces.from_tokenizer(tokenizer)
    word = piece_ids(tokenizer, "Paristan")
    assert len(word) > 1, "the test needs a word the tokenizer splits"  # "ĠParis" "t" "an"
    assert pieces.starts[word[0]] and not pieces.continues[word[0]]
    assert all(pieces.continues[i] and not pieces.starts[i] for i in word[1:])
    for token in piece_ids(tokenizer, "2,724") + piece_ids(tokenizer, ".")[-1:]:
        assert not pieces.starts[token] and not pieces.continues[token]
    for token in tokenizer.all_special_ids:
        assert not pieces.starts[token] and not pieces.continues[token]


def planted(n_docs: int = 3, batch: int = 2):
    """Contexts where word-start 10 is always followed by 20 and 21, and a generator that would rather end."""
    rows = []
    for b in range(batch):
        for k in range(n_docs):
            rows.append([BOS, 30 + k, 10, 20, 21, 31 + b, EOS])
    ctx = torch.tensor(rows)
    return tiny_generator(seed=0, eos_bias=6.0), ctx, torch.ones_like(ctx), torch.randn(batch, n_docs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_decoding_finishes_the_copied_word(num_beams):
    generator, ctx, mask, scores = planted()
    common = dict(n_docs=3, num_beams=num_beams, max_new_tokens=6, forced_bos_token_id=10)  # first token: 10
    plain = rag_token_generate(generator, ctx, mask, scores, **common)
    assert plain[:, 2].eq(EOS).all(), "without the rule this generator ends after the first piece"
    held = rag_token_generate(generator, ctx, mask, scores, word_pieces=PIECES, **common)
    assert held[:, 1:4].tolist() == [[10, 20, 21]] * 2


def test_rag_sequence_decoding_finishes_the_copied_word_in_each_passage():
    generator, ctx, mask, scores = planted()
    common = dict(n_docs=3, num_beams=2, max_new_tokens=6, forced_bos_token_id=10, mode="thorough")
    assert rag_sequence_generate(generator, ctx, mask, scores, **common)[:, 2].eq(EOS).all()
    held = rag_sequence_generate(generator, ctx, mask, scores, word_pieces=PIECES, **common)
    assert held[:, 1:4].tolist() == [[10, 20, 21]] * 2


def test_the_module_decodes_with_the_rule_when_configured(make_gen_tokenizer, tmp_path):
    tokenizer = make_gen_tokenizer(tmp_path)
    word = piece_ids(tokenizer, "Paristan")
    ids = [tokenizer.bos_token_id, *piece_ids(tokenizer, "The capital is Paristan."), tokenizer.eos_token_id]
    ctx = torch.tensor([ids, ids])
    ret = {"context_input_ids": ctx, "context_attention_mask": torch.ones_like(ctx), "doc_scores": torch.zeros(1, 2)}
    generator = tiny_generator(
        seed=0, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    generator.generation_config.forced_bos_token_id = word[0]  # the answer begins by copying the word's first piece
    with torch.no_grad():
        generator.final_logits_bias[0, tokenizer.eos_token_id] += 6.0

    def answer(complete: bool) -> list[int]:
        config = ModelConfig(decoding=DecodingConfig(max_new_tokens=len(word) + 2, complete_copied_words=complete))
        module = RagModule(torch.nn.Linear(2, 2), generator, config, generator_tokenizer=tokenizer)
        return module.generate({}, ret)[0, 1:].tolist()

    assert answer(False)[:2] == [word[0], tokenizer.eos_token_id]
    assert answer(True)[: len(word)] == word


def test_closed_book_refuses_the_rule():
    def check(mode: Mode) -> None:
        decoding = DecodingConfig(complete_copied_words=True)
        ModelConfig(mode=mode, decoding=decoding, generator=GeneratorConfig(tokenizer="tokenizer/")).check()

    with pytest.raises(ConfigError, match=r"complete_copied_words=true .* Fix: model.decoding.complete_copied_words=false"):
        check(Mode.closed_book)
    check(Mode.rag_token)
    check(Mode.rag_sequence)


def test_the_first_answer_token_must_begin_with_a_space():
    pieces = WordPieces(STARTS, CONTINUES, space_led=tuple(10 <= i < 20 or i == NUMBER for i in range(VOCAB)))
    rule = AnswerStartsAtWord(pieces, (EOS, BOS))
    logprobs = torch.zeros(3, VOCAB)
    out = rule(logprobs, torch.tensor([[EOS, BOS], [EOS, BOS], [EOS, 10]]))
    # the first answer token: space-led pieces, or the specials (BOS if not forced, EOS)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == sorted({BOS, EOS, *range(10, 20), NUMBER})
    assert torch.equal(out[1], out[0])
    assert torch.equal(out[2], logprobs[2])  # inside the answer: anything
    assert rule(logprobs, torch.tensor([[EOS, 10]] * 3)) is logprobs


@pytest.mark.parametrize("decode", ["token", "sequence"])
def test_decoding_with_the_rule_never_starts_inside_a_word(decode):
    """A generator biased to start with a continuation piece (20) starts with a space-led one instead."""
    generator, ctx, mask, scores = planted()
    with torch.no_grad():
        generator.final_logits_bias[0, 20] += 8.0
    pieces = WordPieces(STARTS, CONTINUES, space_led=STARTS)
    common = dict(n_docs=3, num_beams=2, max_new_tokens=4, forced_bos_token_id=BOS)
    generate = rag_token_generate if decode == "token" else rag_sequence_generate
    plain = generate(generator, ctx, mask, scores, **common)
    assert plain[:, 2].eq(20).all(), "without the rule this generator starts inside a word"
    held = generate(generator, ctx, mask, scores, start_at_word=pieces, **common)
    assert all(STARTS[t] or t == EOS for t in held[:, 2].tolist())


def test_the_module_skips_the_rule_for_a_tokenizer_without_prefix_space(make_gen_tokenizer, tmp_path, caplog):
    tokenizer = make_gen_tokenizer(tmp_path)
    pieces = WordPieces.from_tokenizer(tokenizer)
    assert pieces.prefix_space and all(pieces.space_led[i] for i in piece_ids(tokenizer, "Paris 2,724")[:1])
    config = ModelConfig(decoding=DecodingConfig(start_at_word=True))
    module = RagModule(torch.nn.Linear(2, 2), tiny_generator(seed=0), config, generator_tokenizer=tokenizer)
    assert module._answer_start().prefix_space
    module._pieces = WordPieces(STARTS, CONTINUES, STARTS, prefix_space=False)
    with caplog.at_level(logging.WARNING):
        assert module._answer_start() is None and module._answer_start() is None
    assert sum("start_at_word=true is skipped" in r.getMessage() for r in caplog.records) == 1  # warned once
    with pytest.raises(ConfigError, match=r"start_at_word=true .* Fix: model.decoding.start_at_word=false"):
        ModelConfig(mode=Mode.closed_book, decoding=DecodingConfig(start_at_word=True),
                    generator=GeneratorConfig(tokenizer="tokenizer/")).check()
