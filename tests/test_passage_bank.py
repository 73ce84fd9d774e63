"""The passage bank of `dpr.bank`: its refreshed vectors are what rag-index's encoding gives, and a fresh
encoding of some rows carries the gradient of the context encoder's top layers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lightning.config import QuestionEncoderConfig, section
from rag_lightning.models.encoder_split import freeze_bottom
from rag_lightning.models.encoders import build_context_encoder, encode_texts, encoder_pad_id
from rag_lightning.models.passage_bank import PassageBank
from rag_lightning.padding import pad_right

TINY = section(QuestionEncoderConfig, {"kind": "tiny", "tiny": {"hidden_size": 32, "layers": 3, "heads": 2}}, "encoder")


def _trained(encoder: torch.nn.Module, layers: int) -> torch.nn.Module:
    """The encoder after some training of its top ``layers``: their weights moved at random."""
    freeze_bottom(encoder, layers)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return encoder


@pytest.fixture
def store(tmp_path: Path, make_gen_tokenizer, ctx_tokenizer, synthetic_passages):
    from rag_lightning.retrieval.store import CorpusStore

    return CorpusStore.build(synthetic_passages(30), make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer(),
                             tmp_path / "store")


@pytest.mark.parametrize("layers", [1, 2])
def test_refreshed_bank_equals_a_fresh_rag_index_encoding(tmp_path: Path, store, layers: int) -> None:
    from rag_lightning.retrieval.encode import encode_passages

    torch.manual_seed(0)
    encoder = build_context_encoder(TINY)
    passages = [store.ctx_tokens(r) for r in range(len(store))]
    assert len({len(p) for p in passages}) > 3  # varied lengths: the padding is exercised
    bank = PassageBank.build(encoder, passages, layers, encoder_pad_id(encoder), batch_size=7, progress=False)
    _trained(encoder, layers).train()  # states of the frozen bottom stay valid while the top trains
    refreshed = bank.vectors(encoder, batch_size=5)
    assert encoder.training  # the mode is given back
    fresh = torch.from_numpy(np.array(encode_passages(encoder, store, tmp_path / "vectors", batch_size=4,
                                                      progress=False)))
    assert refreshed.shape == fresh.shape == (len(store), 32)
    assert (refreshed - fresh).abs().max() <= 1e-5


def test_padded_rows_hold_each_passages_states_and_a_fresh_encoding_trains_the_top_layer_only() -> None:
    torch.manual_seed(0)
    encoder = build_context_encoder(TINY)
    passages = [np.array([101, 7, 8, 102]), np.array([101, 9, 102]), np.array([101, 5, 6, 7, 8, 9, 102])]
    bank = PassageBank.build(encoder, passages, 1, 0, batch_size=2, progress=False)
    assert len(bank) == 3 and bank.states.shape == (14, 32)
    states, mask = bank.padded(torch.tensor([1, 2]))
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert torch.equal(states[0, 3:], torch.zeros(4, 32)) and torch.equal(states[1], bank.states[7:14])
    freeze_bottom(encoder, 1)
    encoder.train()
    bank.encode(encoder, torch.tensor([0, 2])).sum().backward()
    layers = encoder.ctx_encoder.bert_model.encoder.layer
    assert all(p.grad is not None for p in layers[2].parameters())
    assert all(p.grad is None for p in (*layers[0].parameters(), *layers[1].parameters()))
    # in eval mode the encoding equals the whole encoder's
    ids, attention = pad_right(passages, 0)
    with torch.no_grad():
        torch.testing.assert_close(bank.encode(encoder.eval(), torch.arange(3)), encode_texts(encoder, ids, attention))


def test_a_bank_refuses_offsets_that_do_not_fit_its_states() -> None:
    with pytest.raises(ValueError, match="offsets end at 5 but there are 4 token states"):
        PassageBank(torch.zeros(4, 8), torch.tensor([0, 2, 5]), 1)
