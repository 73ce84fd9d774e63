"""Corpus store: round trip of strings and both tokenisations, memory mapping, manifest, bad states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from rag_lightning.data.pieces import piece_ids
from rag_lightning.data.readers import Passage
from rag_lightning.retrieval.store import CorpusStore, StoreError, tokenizer_fingerprint


@pytest.fixture(scope="module")
def gen_tok(tmp_path_factory: pytest.TempPathFactory, make_gen_tokenizer) -> PreTrainedTokenizerFast:
    return make_gen_tokenizer(tmp_path_factory.mktemp("gen_tok"))


@pytest.fixture(scope="module")
def built(
    gen_tok: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory, synthetic_passages, ctx_tokenizer
) -> CorpusStore:
    out = tmp_path_factory.mktemp("stores") / "s"
    return CorpusStore.build(synthetic_passages(), gen_tok, ctx_tokenizer(), out, ctx_max_length=24)


def test_strings_round_trip_and_ids(built: CorpusStore, synthetic_passages) -> None:
    passages = synthetic_passages()
    store = CorpusStore.open(built.dir)
    assert len(store) == len(passages)
    for row, p in enumerate(passages):
        assert (store.passage_id(row), store.title(row), store.text(row)) == (p.id, p.title, p.text)
        assert store.row_of(p.id) == row
    with pytest.raises(KeyError, match="nope"):
        store.row_of("nope")


def test_gen_tokens_are_the_passage_as_placed_after_a_question(
    built: CorpusStore, gen_tok: PreTrainedTokenizerFast, synthetic_passages
) -> None:
    for row, p in enumerate(synthetic_passages()):
        joined = f" {p.title} / {p.text}" if p.title else f" {p.text}"
        expected = gen_tok(joined, add_special_tokens=False)["input_ids"]
        assert built.gen_tokens(row).tolist() == expected
        assert built.gen_tokens(row).dtype == np.int32
        assert piece_ids(gen_tok, joined) == expected


def test_ctx_tokens_are_dpr_input_truncated(built: CorpusStore, synthetic_passages, ctx_tokenizer) -> None:
    tok = ctx_tokenizer()
    for row, p in enumerate(synthetic_passages()):
        args = (p.title, p.text) if p.title else (p.text,)
        expected = tok(*args, truncation="longest_first", max_length=24)["input_ids"]
        ids = built.ctx_tokens(row).tolist()
        assert ids == expected and len(ids) <= 24
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_arrays_are_memory_mapped(built: CorpusStore) -> None:
    for ragged in built._fields.values():
        assert isinstance(ragged.values, np.memmap) and isinstance(ragged.offsets, np.memmap)
    assert isinstance(built.gen_tokens(0), np.memmap)


def test_cut_passages_are_counted_and_named(
    built: CorpusStore, gen_tok: PreTrainedTokenizerFast, synthetic_passages, ctx_tokenizer, tmp_path: Path, caplog
) -> None:
    tok, passages = ctx_tokenizer(), synthetic_passages()
    full = [len(tok(*((p.title, p.text) if p.title else (p.text,)))["input_ids"]) for p in passages]
    assert 0 < sum(n > 24 for n in full) < len(passages)  # the fixture has passages on both sides of the cut
    assert built.manifest["ctx_truncated"] == sum(n > 24 for n in full)
    assert built.manifest["gen_truncated"] == 0
    with caplog.at_level("WARNING", logger="rag_lightning.retrieval.store"):
        store = CorpusStore.build(passages, gen_tok, tok, tmp_path / "s", ctx_max_length=24, gen_max_passage_tokens=8)
    gen_full = [len(gen_tok(f" {p.title} / {p.text}" if p.title else f" {p.text}", add_special_tokens=False)
                     ["input_ids"]) for p in passages]  # fmt: skip
    assert store.manifest["gen_truncated"] == sum(n > 8 for n in gen_full) > 0
    assert f"{built.manifest['ctx_truncated']} of {len(passages)} passages are longer than ctx_max_length=24" in caplog.text
    assert "Fix: raise model.question_encoder.ctx_max_length" in caplog.text
    assert "Fix: raise index.gen_max_passage_tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rag_lightning.retrieval.store"):
        whole = CorpusStore.build(passages, gen_tok, tok, tmp_path / "w", ctx_max_length=max(full))
    assert whole.manifest["ctx_truncated"] == 0 and "longer than" not in caplog.text
    assert [whole.ctx_tokens(r).tolist() for r in range(len(whole))] == [
        tok(*((p.title, p.text) if p.title else (p.text,)))["input_ids"] for p in passages
    ]


def test_manifest_records_inputs(built: CorpusStore, gen_tok: PreTrainedTokenizerFast) -> None:
    m = json.loads((built.dir / "manifest.json").read_text())
    assert m["passages"] == 40 and m["ctx_max_length"] == 24 and m["title_separator"] == " / "
    assert m["gen_tokenizer"] == tokenizer_fingerprint(gen_tok)
    assert m["ctx_tokens"] == sum(len(built.ctx_tokens(r)) for r in range(40))
    assert not list(built.dir.parent.glob(".s.tmp-*"))


def test_tokenizer_fingerprint_ignores_call_state(gen_tok: PreTrainedTokenizerFast, ctx_tokenizer) -> None:
    before = tokenizer_fingerprint(gen_tok)
    gen_tok(["some text"], truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(gen_tok) == before
    assert tokenizer_fingerprint(ctx_tokenizer()) != before


def test_source_hash_and_content_hash(
    gen_tok: PreTrainedTokenizerFast, tmp_path: Path, synthetic_passages, ctx_tokenizer
) -> None:
    a = CorpusStore.build(synthetic_passages(5), gen_tok, ctx_tokenizer(), tmp_path / "a")
    b = CorpusStore.build(synthetic_passages(6), gen_tok, ctx_tokenizer(), tmp_path / "b")
    c = CorpusStore.build(synthetic_passages(5), gen_tok, ctx_tokenizer(), tmp_path / "c", source_hash="abc")
    assert a.corpus_hash != b.corpus_hash and c.corpus_hash == "abc"


def test_separator_pieces_use_the_stored_tokenizer(
    built: CorpusStore, gen_tok: PreTrainedTokenizerFast
) -> None:
    assert built.gen_piece_ids(" // ") == gen_tok(" //", add_special_tokens=False)["input_ids"]


def test_bad_inputs_and_damaged_stores(
    gen_tok: PreTrainedTokenizerFast, tmp_path: Path, synthetic_passages, ctx_tokenizer
) -> None:
    tok = ctx_tokenizer()
    dup = [Passage("x", "t", "a"), Passage("x", "t", "b")]
    with pytest.raises(ValueError, match="'x' occurs twice"):
        CorpusStore.build(dup, gen_tok, tok, tmp_path / "dup")
    with pytest.raises(ValueError, match="no passages"):
        CorpusStore.build([], gen_tok, tok, tmp_path / "empty")
    with pytest.raises(StoreError, match="not a corpus store"):
        CorpusStore.open(tmp_path / "missing")
    store = CorpusStore.build(synthetic_passages(3), gen_tok, tok, tmp_path / "s")
    (store.dir / "ctx_values.npy").unlink()
    with pytest.raises(StoreError, match="incomplete or corrupt"):
        CorpusStore.open(store.dir)
