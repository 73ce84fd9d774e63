"""Retriever: search results and gathered vectors, and contexts assembled exactly as tokenised strings."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rag_lightning.config import IndexConfig
from rag_lightning.data.pieces import piece_ids
from rag_lightning.retrieval.faiss_index import IndexStateError, PassageIndex
from rag_lightning.retrieval.retriever import Retriever
from rag_lightning.retrieval.store import CorpusStore

QUESTIONS = ["Who is the capital of France?", "How high is Everest (in m)?", "What's 東京?"]


@pytest.fixture(scope="module")
def parts(
    tmp_path_factory: pytest.TempPathFactory, synthetic_passages, make_gen_tokenizer, ctx_tokenizer,
) -> tuple[PreTrainedTokenizerFast, CorpusStore, PassageIndex]:
    tmp = tmp_path_factory.mktemp("retriever")
    gen_tok = make_gen_tokenizer(tmp / "tok")
    store = CorpusStore.build(synthetic_passages(30), gen_tok, ctx_tokenizer(), tmp / "store")
    vectors = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    return gen_tok, store, PassageIndex.build(vectors, IndexConfig(type="flat", num_threads=1))


def ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text)["input_ids"]  # with <s> ... </s>


def test_retrieve_returns_rows_scores_vectors_and_ids(parts) -> None:
    _, store, index = parts
    retriever = Retriever(index, store, max_context_length=64)
    q = torch.randn(4, 16, requires_grad=True)
    found = retriever.retrieve(q, 3)
    scores, rows = index.search(q.detach().numpy(), 3)
    assert found.rows.dtype == torch.int64 and np.array_equal(found.rows.numpy(), rows)
    assert found.vectors.shape == (4, 3, 16) and found.vectors.dtype == torch.float32
    assert not found.vectors.requires_grad and not found.scores.requires_grad
    np.testing.assert_array_equal(found.vectors.numpy(), index.vectors[rows])
    doc_scores = torch.einsum("bd,bkd->bk", q, found.vectors)  # how the module recomputes the scores
    torch.testing.assert_close(doc_scores.detach(), torch.from_numpy(scores), rtol=0, atol=1e-5)
    doc_scores.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert found.passage_ids == [[store.passage_id(int(r)) for r in row] for row in rows]


@pytest.mark.parametrize("layout", ["question_first", "passage_first"])
def test_contexts_equal_tokenising_the_joined_strings(parts, layout: str, synthetic_passages) -> None:
    gen_tok, store, index = parts
    retriever = Retriever(index, store, max_context_length=512, layout=layout)
    rows = torch.tensor([[0, 3, 5], [2, 7, 1], [6, 4, 29]])
    questions = [piece_ids(gen_tok, q) for q in QUESTIONS]
    input_ids, mask = retriever.build_contexts(
        questions, rows, bos_id=gen_tok.bos_token_id, eos_id=gen_tok.eos_token_id, pad_id=gen_tok.pad_token_id
    )
    assert input_ids.shape[0] == 9 and mask.shape == input_ids.shape
    for b, question in enumerate(QUESTIONS):
        for j, row in enumerate(rows[b].tolist()):
            p = synthetic_passages(30)[row]
            passage = f"{p.title} / {p.text}" if p.title else p.text
            text = f"{question} // {passage}" if layout == "question_first" else f"{passage} // {question}"
            expected = ids(gen_tok, text)
            got = input_ids[b * 3 + j]
            n = int(mask[b * 3 + j].sum())
            assert got[:n].tolist() == expected
            assert (got[n:] == gen_tok.pad_token_id).all() and (mask[b * 3 + j, n:] == 0).all()


def test_truncation_cuts_the_passage_never_the_question(parts) -> None:
    gen_tok, store, index = parts
    retriever = Retriever(index, store, max_context_length=20)
    question = piece_ids(gen_tok, QUESTIONS[1])
    sep = piece_ids(gen_tok, "//")
    input_ids, mask = retriever.build_contexts([question], torch.tensor([[0, 2]]))  # BART ids by default
    assert input_ids.shape == (2, 20) and mask.all()
    for i, row in enumerate((0, 2)):
        room = 20 - 2 - len(question) - len(sep)
        expected = [0, *question, *sep, *store.gen_tokens(row)[:room].tolist(), 2]
        assert input_ids[i].tolist() == expected


def test_mismatched_parts_are_refused(parts, tmp_path: Path) -> None:
    gen_tok, store, index = parts
    with pytest.raises(ValueError, match="title_separator"):
        Retriever(index, store, max_context_length=64, title_separator=" | ")
    with pytest.raises(IndexStateError, match="holds 5 passages"):
        Retriever(
            PassageIndex.build(index.vectors[:5].copy(), IndexConfig(type="flat")), store, max_context_length=64
        )
    with pytest.raises(ValueError, match="layout"):
        Retriever(index, store, max_context_length=64, layout="sideways")


def test_with_gold_puts_a_missed_gold_passage_in_the_last_slot(parts) -> None:
    _, store, index = parts
    retriever = Retriever(index, store, max_context_length=64)
    q = torch.randn(4, 16)
    found = retriever.retrieve(q, 3)
    rows = found.rows.tolist()
    outside = [r for r in range(30) if r not in rows[0]][0]
    gold = [
        [store.passage_id(outside)],  # missed: takes the last slot
        [store.passage_id(rows[1][1])],  # found already: nothing changes
        [],  # no gold passage known
        ["not-in-this-corpus"],  # unknown id: nothing changes
    ]
    got = retriever.with_gold(found, gold, q)
    assert got.rows[0].tolist() == rows[0][:2] + [outside]
    assert got.rows[1:].tolist() == rows[1:]
    assert got.passage_ids[0][-1] == store.passage_id(outside)
    np.testing.assert_array_equal(got.vectors.numpy(), index.vectors[got.rows.numpy()])
    expected_scores = torch.einsum("bd,bkd->bk", q, got.vectors)
    torch.testing.assert_close(got.scores, expected_scores)
    assert retriever.with_gold(found, [[], [], [], []], q) is found


def test_the_given_searcher_finds_the_rows(parts) -> None:
    """Under DDP the rows come from a DistributedSearch: retrieve asks the searcher, not the index."""
    _, store, index = parts

    class Searcher:
        def search(self, queries, k):
            rows = np.tile(np.arange(29, 29 - k, -1), (len(queries), 1))
            return np.full(rows.shape, 7.0, np.float32), rows

    found = Retriever(index, store, max_context_length=64, searcher=Searcher()).retrieve(torch.randn(2, 16), 3)
    assert found.rows.tolist() == [[29, 28, 27]] * 2 and found.scores.eq(7.0).all()
    np.testing.assert_array_equal(found.vectors.numpy(), index.vectors[found.rows.numpy()])
    assert found.passage_ids[0] == [store.passage_id(r) for r in (29, 28, 27)]


def test_special_ids_given_to_the_retriever_or_the_call_are_used(parts) -> None:
    gen_tok, store, index = parts
    question = [piece_ids(gen_tok, QUESTIONS[0])]
    rows = torch.tensor([[1, 5]])  # passages of different lengths: the shorter one is padded
    retriever = Retriever(index, store, max_context_length=64, bos_id=90, eos_id=91, pad_id=92)
    input_ids, mask = retriever.build_contexts(question, rows)
    default_ids, _ = Retriever(index, store, max_context_length=64).build_contexts(question, rows)
    assert (input_ids[:, 0] == 90).all() and (default_ids[:, 0] == gen_tok.bos_token_id).all()
    for i in range(2):
        n = int(mask[i].sum())
        assert input_ids[i, n - 1] == 91 and (input_ids[i, n:] == 92).all()
        assert input_ids[i, 1 : n - 1].tolist() == default_ids[i, 1 : n - 1].tolist()
    assert not mask.all()
    override, _ = retriever.build_contexts(question, rows, bos_id=80, eos_id=81, pad_id=82)  # the call wins
    assert (override[:, 0] == 80).all() and {81, 82} <= set(override.flatten().tolist())


def test_the_shortest_context_fits_the_separator_and_one_question_token(parts) -> None:
    gen_tok, store, index = parts
    sep = piece_ids(gen_tok, "//")
    shortest = len(sep) + 3  # <s>, one question token, the separator, </s>
    retriever = Retriever(index, store, max_context_length=shortest)
    input_ids, _ = retriever.build_contexts([piece_ids(gen_tok, QUESTIONS[0])], torch.tensor([[0]]))
    assert input_ids.tolist() == [[0, piece_ids(gen_tok, QUESTIONS[0])[0], *sep, 2]]
    with pytest.raises(ValueError, match=rf"^context\.max_length={shortest - 1} leaves no room for a question$"):
        Retriever(index, store, max_context_length=shortest - 1)


def test_bad_arguments_are_refused_with_what_is_wrong(parts) -> None:
    gen_tok, store, index = parts
    retriever = Retriever(index, store, max_context_length=64)
    question = [piece_ids(gen_tok, QUESTIONS[0])]
    for rows in (torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])):  # two examples for one question; 1-D
        with pytest.raises(ValueError, match=rf"^rows must be \(B, k\) with B=1, got {re.escape(str(tuple(rows.shape)))}$"):
            retriever.build_contexts(question, rows)
    retriever.bos_id = None  # as for a store whose generator tokenizer has no <s>
    with pytest.raises(ValueError, match=r"^the store's generator tokenizer has no <s>, </s> or <pad>: pass bos/eos/pad ids$"):
        retriever.build_contexts(question, torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"^separator='//' must start and end with one space$"):
        Retriever(index, store, max_context_length=64, separator="//")
    with pytest.raises(ValueError, match=r"^context\.layout='sideways' is not one of question_first, passage_first$"):
        Retriever(index, store, max_context_length=64, layout="sideways")
    with pytest.raises(IndexStateError, match=r"holds 30; rebuild the index \(rag-index\)$"):
        Retriever(PassageIndex.build(index.vectors[:5].copy(), IndexConfig(type="flat")), store, max_context_length=64)
