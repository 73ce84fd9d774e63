"""DPR encoders: MiniLM weights really loaded, fingerprints stable, tiny and local-path kinds offline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

from rag_lightning.config import ConfigError, QuestionEncoderConfig, TinyEncoderConfig, section
from rag_lightning.models.encoders import (
    build_context_encoder,
    build_question_encoder,
    encode_texts,
    encoder_fingerprint,
    load_bert_weights,
    load_encoder_tokenizer,
    minilm_dir,
)

MINILM = QuestionEncoderConfig(kind="minilm", ctx_max_length=128)
TINY = section(QuestionEncoderConfig, {"kind": "tiny", "tiny": {"hidden_size": 32, "layers": 2, "heads": 2}}, "encoder")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tok = load_encoder_tokenizer(MINILM)
    return tok(
        ["who wrote hamlet?", "the capital of france is paris, a city of two million people"],
        padding=True,
        return_tensors="pt",
    )


def test_minilm_dpr_encoders_reproduce_bert_cls_exactly(batch: dict[str, torch.Tensor]) -> None:
    bert = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    with torch.no_grad():
        reference = bert(**batch).last_hidden_state[:, 0]
        for encoder in (build_question_encoder(MINILM), build_context_encoder(MINILM)):
            vectors = encode_texts(encoder.eval(), batch["input_ids"], batch["attention_mask"])
            assert vectors.shape == (2, 384)
            assert torch.equal(vectors, reference)


def test_load_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    state = load_file(str(minilm_dir() / "model.safetensors"))
    del state["encoder.layer.0.attention.self.query.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    encoder = build_context_encoder(
        replace(TINY, tiny=TinyEncoderConfig(hidden_size=384, layers=6, heads=12, intermediate_size=1536))
    )
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.0.attention.self.query.weight'\].*extra"):
        load_bert_weights(encoder.ctx_encoder.bert_model, tmp_path / "model.safetensors")


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = build_context_encoder(MINILM), build_context_encoder(MINILM)
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    with torch.no_grad():
        b.ctx_encoder.bert_model.embeddings.word_embeddings.weight[0, 0] += 1e-3
    assert encoder_fingerprint(a) != encoder_fingerprint(b)


def test_tiny_is_deterministic_and_shared_between_question_and_context() -> None:
    q1, q2, c = build_question_encoder(TINY), build_question_encoder(TINY), build_context_encoder(TINY)
    assert encoder_fingerprint(q1) == encoder_fingerprint(q2)
    assert encoder_fingerprint(q1.question_encoder.bert_model) == encoder_fingerprint(
        c.ctx_encoder.bert_model
    )
    assert q1.config.hidden_size == 32 and q1.config.vocab_size == 30522


def test_path_kind_loads_a_saved_encoder(tmp_path: Path, batch: dict[str, torch.Tensor]) -> None:
    tiny = build_context_encoder(TINY)
    tiny.save_pretrained(tmp_path / "ctx")
    load_encoder_tokenizer(MINILM).save_pretrained(tmp_path / "ctx")
    cfg = QuestionEncoderConfig(kind="path", context_name_or_path=str(tmp_path / "ctx"))
    loaded = build_context_encoder(cfg)
    assert encoder_fingerprint(loaded) == encoder_fingerprint(tiny)
    assert load_encoder_tokenizer(cfg, "context").vocab_size == 30522
    with pytest.raises(FileNotFoundError, match=r"question_name_or_path.*Fix: .*rag-train-retriever"):
        build_question_encoder(QuestionEncoderConfig(kind="path", question_name_or_path=str(tmp_path / "nope")))


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ConfigError, match="kind='bert'"):
        build_question_encoder(QuestionEncoderConfig(kind="bert"))
    with pytest.raises(ConfigError, match=r"model\.question_encoder\.kind='bert'"):
        section(QuestionEncoderConfig, {"kind": "bert"}, "model.question_encoder")
