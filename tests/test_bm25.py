"""BM25 (bm25s) over the corpus store: the index and its manifest, the sparse retriever, the hard-negative miner,
and `index=bm25` in a RAG run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lightning.config import IndexConfig
from rag_lightning.data.readers import Passage
from rag_lightning.metrics import has_answer
from rag_lightning.retrieval.bm25 import MANIFEST_FILE, BM25Index, bm25_expectation, mine, passage_text
from rag_lightning.retrieval.faiss_index import IndexMismatchError, IndexMissingError
from rag_lightning.retrieval.retriever import Retriever
from rag_lightning.retrieval.store import CorpusStore

PASSAGES = [
    Passage("c0", "Aland", "Aland is a country. Its capital is Mariehamn."),
    Passage("c1", "Aland", "Aland has a population of 30,000 people and many islands."),
    Passage("c2", "Borduria", "Borduria is a country. Its capital is Szohod."),
    Passage("c3", "Borduria", "The people of Borduria speak Bordurian. Szohod is a large city."),  # holds the answer
    Passage("c4", "Mariehamn", "Mariehamn is the capital of Aland, a port on the sea."),  # holds the answer
    Passage("c5", "Carpania", "Carpania is a country with mountains."),
    Passage("c6", "Rivers", "Rivers flow through Aland, Borduria and Carpania."),
    Passage("c7", "Sea", "The sea is salty."),
]


@dataclass
class QA:
    id: str
    question: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, make_gen_tokenizer, ctx_tokenizer) -> CorpusStore:
    tmp = tmp_path_factory.mktemp("bm25")
    return CorpusStore.build(PASSAGES, make_gen_tokenizer(tmp / "tok"), ctx_tokenizer(), tmp / "store")


@pytest.fixture(scope="module")
def index(store: CorpusStore) -> BM25Index:
    return BM25Index.build(store, IndexConfig(type="bm25"))


def test_search_ranks_by_bm25_with_ties_to_the_lower_row(index: BM25Index) -> None:
    scores, rows = index.search_texts(["What is the capital of Borduria?", "unknownword"], 3)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (2, 3)
    assert rows[0, 0] == 2  # title and text name Borduria and its capital
    assert np.all(np.diff(scores[0]) <= 0)
    # a question with no indexed word scores 0 everywhere: the first rows, in order
    assert rows[1].tolist() == [0, 1, 2] and scores[1].tolist() == [0.0, 0.0, 0.0]
    full = index.scores(["What is the capital of Borduria?"])[0]
    np.testing.assert_allclose(scores[0], np.sort(full)[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(index.score_rows(["What is the capital of Borduria?"], rows[:1]), scores[:1])


def test_saved_index_loads_with_its_manifest_and_refuses_other_parameters(index, store, tmp_path: Path) -> None:
    out = tmp_path / "bm25"
    index.save(out)
    expect = bm25_expectation(store, IndexConfig(type="bm25"))
    loaded = BM25Index.load(out, expect=expect)
    q = ["Which city is the capital of Aland?"]
    np.testing.assert_array_equal(loaded.search_texts(q, 4)[1], index.search_texts(q, 4)[1])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["corpus_hash"] == store.corpus_hash and manifest["passages"] == len(PASSAGES)
    with pytest.raises(IndexMismatchError, match=r"k1: built with 1\.5, now 0\.9[\s\S]*rag-index index=bm25"):
        BM25Index.load(out, expect=bm25_expectation(store, IndexConfig(type="bm25", bm25_k1=0.9)))
    with pytest.raises(IndexMissingError, match="no BM25 index"):
        BM25Index.check(tmp_path / "nothing", expect=expect)


def test_a_failed_save_leaves_nothing_where_the_index_is_expected(index, tmp_path: Path, monkeypatch) -> None:
    def broken(directory: str, **_: object) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "data.csc.index.npy").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(index.model, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "bm25")
    assert not (tmp_path / "bm25").exists() and not list(tmp_path.iterdir())  # no temporary directory either


def test_mined_negatives_never_hold_an_answer_or_a_gold_passage(index, store) -> None:
    examples = [
        QA("q0", "What is the capital of Aland?", ("Mariehamn",), ("c0",)),
        QA("q1", "What is the capital of Borduria?", ("Szohod",), ("c2",)),
        QA("q2", "What is the capital of Borduria?", ("Szohod",)),  # no gold: BM25's first answer passage
        QA("q3", "What is the capital of Zembla?", ("Nowhere",)),  # no gold, no answer anywhere: skipped
    ]
    mined, report = mine(index, store, examples, n_negatives=3, depth=len(PASSAGES))
    assert [m.id for m in mined] == ["q0", "q1", "q2"]
    assert (report.gold_positives, report.bm25_positives, report.skipped, report.skipped_ids) == (2, 1, 1, ["q3"])
    by_id = {e.id: e for e in examples}
    for m in mined:
        example = by_id[m.id]
        gold_rows = {store.row_of(g) for g in example.gold_passage_ids}
        assert len(m.negatives) == 3 and m.positive not in m.negatives
        for row in m.negatives:
            assert row not in gold_rows
            assert not has_answer(passage_text(store, row), example.answers)
    assert mined[0].positive == store.row_of("c0")
    assert [m.gold_rows for m in mined] == [[store.row_of("c0")], [store.row_of("c2")], []]
    assert store.row_of("c4") not in mined[0].negatives  # Mariehamn's own passage holds the answer
    assert mined[2].positive == store.row_of("c2")  # the best-ranked passage with "Szohod"
    assert store.row_of("c3") not in mined[2].negatives


def test_the_sparse_retriever_scores_question_texts(index, store) -> None:
    retriever = Retriever(index, store, max_context_length=64)
    assert retriever.sparse
    found = retriever.retrieve_texts(["What is the capital of Borduria?"], 2)
    scores, rows = index.search_texts(["What is the capital of Borduria?"], 2)
    assert found.rows.tolist() == rows.tolist() and torch.equal(found.scores, torch.from_numpy(scores))
    assert found.vectors.shape == (1, 2, 0) and found.passage_ids[0][0] == "c2"
    # the curriculum's gold slot is scored with BM25 too
    gold = retriever.with_gold(found, [["c7"]], None, ["What is the capital of Borduria?"])
    assert gold.rows[0, -1] == store.row_of("c7") and gold.scores[0, -1] == 0.0
    with pytest.raises(TypeError, match="use retrieve"):
        Retriever.retrieve_texts(type("Dense", (), {"sparse": False, "index": type("I", (), {"index_type": "flat"})})(), [], 1)


def test_a_rag_run_retrieves_with_bm25_and_never_trains_the_question_encoder(tiny_train_config, tmp_path) -> None:
    from rag_lightning.pipeline import setup

    cfg = tiny_train_config(tmp_path, "index=bm25")
    s, module, datamodule = setup(cfg)
    assert module.retriever.sparse and module.question_encoder_frozen()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    ret = module.retrieve(batch, 2)
    expected = module.retriever.retrieve_texts(batch["questions"], 2)
    assert torch.equal(ret["rows"], expected.rows) and torch.equal(ret["doc_scores"], expected.scores)
    assert ret["question_vectors"] is None
    assert (Path(s.index.dir) / MANIFEST_FILE).is_file()


def test_negatives_from_another_ranking_pass_the_same_filter(index, store) -> None:
    from rag_lightning.retrieval.dpr_data import interleave

    example = QA("q0", "What is the capital of Aland?", ("Mariehamn",), ("c0",))
    rows = {pid: store.row_of(pid) for pid in ("c0", "c1", "c4", "c5", "c7")}
    # a dense ranking that puts the gold passage and an answer passage (c4) first
    dense = [[rows["c0"], rows["c4"], rows["c7"], rows["c5"], rows["c1"]]]
    mined, _ = mine(index, store, [example], n_negatives=2, depth=len(PASSAGES), negative_candidates=dense)
    assert mined[0].positive == rows["c0"] and mined[0].negatives == [rows["c7"], rows["c5"]]
    assert interleave([[1, 2, 3]], [[2, 9]]) == [[1, 2, 9, 3]]
    with pytest.raises(ValueError, match="1 candidate lists for 2 examples"):
        mine(index, store, [example, example], n_negatives=1, negative_candidates=dense)
