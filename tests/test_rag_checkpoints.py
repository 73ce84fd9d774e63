"""transformers RAG checkpoints both ways, offline, on tiny random-init RAG models these tests save themselves.

In (`model/question_encoder=rag`, `model/generator=rag`): our question encoder, context encoder, generator and
tokenizers come from a RagTokenForGeneration / RagSequenceForGeneration directory, and our losses equal
transformers' on the same inputs. Out (`export_rag=true`): the directory we write loads in transformers, whose
model gives our loss and our generated ids.
"""

from __future__ import annotations

import pytest
import torch
from rag_reference import PAD, contexts, decoder_inputs, reference, tiny_generator, tiny_question_encoder
from transformers import (
    BertTokenizerFast,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_lightning.config import ConfigError, GeneratorConfig, ModelConfig, QuestionEncoderConfig
from rag_lightning.data.gen_tokenizer import train_generator_tokenizer
from rag_lightning.models.decoding import rag_sequence_generate, rag_token_generate
from rag_lightning.models.encoders import (
    build_context_encoder,
    build_question_encoder,
    encode_texts,
    load_encoder_tokenizer,
    minilm_dir,
)
from rag_lightning.models.generator import build_generator, generator_tokenizer
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll, shift_targets
from rag_lightning.models.rag_checkpoint import save_rag

BATCH, N_DOCS, NEW_TOKENS = 2, 3, 8
CLASSES = {"rag_token": RagTokenForGeneration, "rag_sequence": RagSequenceForGeneration}
QUESTIONS = ["What is the capital of Latveria?", "Which river flows through Hyrule?"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A question tokenizer (MiniLM's WordPiece) and a tiny byte-level BPE generator tokenizer (BART's ids)."""
    texts = [f"{c} is a country. Its capital is {c}ville." for c in ("Latveria", "Hyrule", "Genovia", "Florin")] * 5
    gen = train_generator_tokenizer(texts, tmp_path_factory.mktemp("gen_tok"), vocab_size=300, min_frequency=1)
    return BertTokenizerFast.from_pretrained(str(minilm_dir())), gen


def _tiny_rag_dir(path, mode, tokenizers):
    """What a user brings: a tiny random-init transformers RAG model saved with its tokenizers."""
    question_tok, gen_tok = tokenizers
    generator = tiny_generator(seed=3, vocab_size=len(gen_tok), max_position_embeddings=256)
    model = reference("token" if mode == "rag_token" else "sequence", generator, tiny_question_encoder(), N_DOCS)
    # a question encoder that sees MiniLM's ids: the tiny DPR config has only 64 ids, so widen its embeddings
    model.rag.question_encoder.resize_token_embeddings(len(question_tok))
    model.config.question_encoder.vocab_size = len(question_tok)
    model.save_pretrained(path)
    RagTokenizer(question_encoder=question_tok, generator=gen_tok).save_pretrained(str(path))
    return path


def _inputs(seed=0, padded=True):
    ctx, mask = contexts(BATCH, N_DOCS, seed=seed, padded=padded)
    dec_in = decoder_inputs(BATCH, seed=seed)
    return ctx, mask, dec_in


def _our_nll(mode, generator, ctx, mask, dec_in, scores):
    logits = generator(input_ids=ctx, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(N_DOCS, 0)).logits
    nll = rag_token_nll if mode == "rag_token" else rag_sequence_nll
    return nll(logits, scores, shift_targets(dec_in, PAD), pad_token_id=PAD, reduction="none")


def _hf_loss(model, ctx, mask, dec_in, scores):
    return model(context_input_ids=ctx, context_attention_mask=mask, doc_scores=scores, labels=dec_in,
                 n_docs=N_DOCS, reduce_loss=False).loss


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence"])
def test_import_a_transformers_rag_checkpoint(mode, tmp_path, tokenizers) -> None:
    path = _tiny_rag_dir(tmp_path / "rag", mode, tokenizers)
    encoder_cfg = QuestionEncoderConfig(kind="rag", question_name_or_path=str(path))
    generator_cfg = GeneratorConfig(kind="rag", name_or_path=str(path))
    encoder_cfg.check()
    generator_cfg.check()
    question_tok = load_encoder_tokenizer(encoder_cfg)
    gen_tok = generator_tokenizer(generator_cfg)
    assert question_tok.get_vocab() == tokenizers[0].get_vocab() and gen_tok.get_vocab() == tokenizers[1].get_vocab()
    question_encoder = build_question_encoder(encoder_cfg)
    context_encoder = build_context_encoder(encoder_cfg)
    generator = build_generator(generator_cfg, gen_tok)
    ref = CLASSES[mode].from_pretrained(path).eval()

    with torch.no_grad():
        # the same question vectors; the context encoder starts from the question encoder's weights
        enc = question_tok(QUESTIONS, padding=True, return_tensors="pt")
        ours_q = encode_texts(question_encoder, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(ours_q, ref.rag.question_encoder(**enc).pooler_output, atol=1e-6, rtol=0)
        torch.testing.assert_close(encode_texts(context_encoder, enc["input_ids"], enc["attention_mask"]), ours_q)
        # the same loss on the same contexts, with doc scores from our question vectors
        passages = torch.randn(BATCH, N_DOCS, ours_q.shape[1], generator=torch.Generator().manual_seed(0))
        scores = torch.einsum("bd,bkd->bk", ours_q, passages)
        ctx, mask, dec_in = _inputs()
        ours = _our_nll(mode, generator, ctx, mask, dec_in, scores)
        torch.testing.assert_close(ours, _hf_loss(ref, ctx, mask, dec_in, scores), atol=1e-5, rtol=1e-5)
    # with our copy head the BART weights come from the checkpoint and only the head is new
    copy = build_generator(GeneratorConfig(kind="rag", name_or_path=str(path), copy=True), gen_tok)
    bart = generator.state_dict()
    assert all(torch.equal(v, bart[k]) for k, v in copy.state_dict().items() if k in bart)


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence"])
def test_export_loads_in_transformers_with_our_loss_and_answers(mode, tmp_path, tokenizers) -> None:
    question_tok, gen_tok = tokenizers
    question_encoder = build_question_encoder(QuestionEncoderConfig(kind="tiny"))
    generator = build_generator(
        GeneratorConfig(kind="random", tokenizer="unused", config={
            "d_model": 24, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "dropout": 0.0,
            "max_position_embeddings": 64, "init_std": 0.3,
        }),
        gen_tok,
    ).eval()
    path = save_rag(question_encoder, generator, question_tok, gen_tok, tmp_path / "rag", mode=mode, n_docs=N_DOCS)
    model = CLASSES[mode].from_pretrained(path).eval()
    loaded_tok = RagTokenizer.from_pretrained(str(path))
    assert loaded_tok.generator.get_vocab() == gen_tok.get_vocab()
    assert loaded_tok.question_encoder.get_vocab() == question_tok.get_vocab()

    with torch.no_grad():
        enc = question_tok(QUESTIONS, padding=True, return_tensors="pt")
        q = encode_texts(question_encoder, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(model.rag.question_encoder(**enc).pooler_output, q, atol=1e-6, rtol=0)
        scores = torch.einsum("bd,bkd->bk", q, torch.randn(BATCH, N_DOCS, q.shape[1],
                                                           generator=torch.Generator().manual_seed(1)))
        # unpadded contexts: transformers' RAG-Sequence generate drops the context mask (docs/core.md)
        ctx, mask, dec_in = _inputs(seed=1, padded=mode == "rag_token")
        ours = _our_nll(mode, generator, ctx, mask, dec_in, scores)
        torch.testing.assert_close(_hf_loss(model, ctx, mask, dec_in, scores), ours, atol=1e-5, rtol=1e-5)
        decode = rag_token_generate if mode == "rag_token" else rag_sequence_generate
        extra = {} if mode == "rag_token" else {"mode": "thorough"}
        our_ids = decode(generator, ctx, mask, scores, n_docs=N_DOCS, num_beams=2, max_new_tokens=NEW_TOKENS, **extra)
        hf_ids = model.generate(context_input_ids=ctx, context_attention_mask=mask, doc_scores=scores, n_docs=N_DOCS,
                                num_beams=2, max_length=NEW_TOKENS + 1)
    assert torch.equal(our_ids, hf_ids)
    assert our_ids.shape[1] > 2  # a real answer, not just start and end


def test_export_rag_refuses_what_transformers_cannot_hold() -> None:
    from rag_lightning.export import check_rag_export

    check_rag_export(ModelConfig())
    with pytest.raises(ConfigError, match="copy head"):
        check_rag_export(ModelConfig(generator=GeneratorConfig(copy=True, tokenizer="t")))
    with pytest.raises(ConfigError, match="closed-book"):
        check_rag_export(ModelConfig(mode="closed_book"))
    with pytest.raises(ConfigError, match="question_name_or_path is required for kind=rag"):
        QuestionEncoderConfig(kind="rag").check()


def test_rag_train_starts_from_a_rag_checkpoint(tmp_path, tokenizers, tiny_train_config) -> None:
    """The model options end to end: a tiny run whose encoders, generator and tokenizers come from a RAG dir."""

    from rag_lightning.pipeline import sections, train

    path = _tiny_rag_dir(tmp_path / "rag", "rag_token", tokenizers)
    cfg = tiny_train_config(
        tmp_path,
        "model/question_encoder=rag", f"model.question_encoder.question_name_or_path={path}",
        "model/generator=rag", f"model.generator.name_or_path={path}", "export=false",
    )
    s = sections(cfg)
    assert (s.model.question_encoder.kind, s.model.generator.kind, s.model.generator.tokenizer) == ("rag", "rag", None)
    results = train(cfg)
    assert 0.0 <= results["test/em"] <= 1.0 and "test/recall@2" in results
