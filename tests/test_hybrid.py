"""Hybrid dense + BM25 retrieval (index.hybrid): candidates from both, q.d + w * normalised BM25, gradient kept;
BM25 word pairs and one-character words; the config keys' errors; `index=hybrid` in a RAG run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lightning.config import ConfigError, IndexConfig
from rag_lightning.data.readers import Passage
from rag_lightning.retrieval.bm25 import MANIFEST_FILE, BM25Index, bm25_expectation
from rag_lightning.retrieval.faiss_index import PassageIndex
from rag_lightning.retrieval.retriever import HybridScoring, Retriever
from rag_lightning.retrieval.store import CorpusStore

# elements named by their number: the passage of 117 is the one BM25 finds by its rare token
PASSAGES = [
    Passage(f"e{n}", name, f"{name} is a chemical element with atomic number {n}. It is in group {g}.")
    for n, name, g in [(1, "Hydrogen", 1), (7, "Nitrogen", 15), (28, "Nickel", 10), (10, "Neon", 18),
                       (36, "Krypton", 18), (54, "Xenon", 18), (117, "Tennessine", 17), (118, "Oganesson", 18)]
]
QUESTION = "Which element has atomic number 117?"
TARGET = 6  # row of e117
DIM = 8


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory, make_gen_tokenizer, ctx_tokenizer):
    tmp = tmp_path_factory.mktemp("hybrid")
    store = CorpusStore.build(PASSAGES, make_gen_tokenizer(tmp / "tok"), ctx_tokenizer(), tmp / "store")
    vectors = np.random.default_rng(0).standard_normal((len(PASSAGES), DIM)).astype(np.float32)
    dense = PassageIndex.build(vectors, IndexConfig(type="flat", num_threads=1))
    bm25 = BM25Index.build(store, IndexConfig(type="bm25"))
    # a question vector that the target passage scores worst of all: dense retrieval misses it
    q = torch.from_numpy(-vectors[TARGET] + 0.1 * vectors.mean(0)).unsqueeze(0)
    return store, dense, bm25, q


def hybrid(parts, weight: float, candidates: int = 3, norm: str = "max") -> Retriever:
    store, dense, bm25, _ = parts
    return Retriever(dense, store, max_context_length=64, hybrid=HybridScoring(bm25, weight, candidates, norm))


def test_a_passage_found_by_a_rare_token_comes_back_though_dense_misses_it(parts) -> None:
    store, dense, bm25, q = parts
    plain = Retriever(dense, store, max_context_length=64).retrieve(q, 3)
    assert TARGET not in plain.rows[0].tolist()
    assert bm25.search_texts([QUESTION], 1)[1][0, 0] == TARGET  # "117" is in no other passage
    found = hybrid(parts, weight=100.0).retrieve(q, 3, questions=[QUESTION])
    assert found.rows[0, 0] == TARGET and found.passage_ids[0][0] == "e117"
    # the BM25 part is w * BM25 / the question's best BM25: exactly w for the best passage
    assert found.lexical[0, 0].item() == pytest.approx(100.0)
    assert np.all(np.diff(found.scores[0].numpy()) <= 0)


def test_doc_scores_are_exact_dense_plus_the_constant_bm25_part_and_carry_gradient(parts) -> None:
    _, dense, _, q = parts
    found = hybrid(parts, weight=2.0).retrieve(q, 3, questions=[QUESTION])
    q = q.clone().requires_grad_(True)
    doc_scores = torch.einsum("bd,bkd->bk", q, found.vectors) + found.lexical  # what the module computes
    torch.testing.assert_close(doc_scores.detach(), found.scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(found.vectors.numpy(), dense.vectors[found.rows.numpy()])
    assert not found.lexical.requires_grad
    doc_scores.logsumexp(-1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


@pytest.mark.parametrize("candidates", [1, 3, 8])
def test_weight_zero_ranks_exactly_as_dense_retrieval(parts, candidates: int) -> None:
    store, dense, _, _ = parts
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32))
    plain = Retriever(dense, store, max_context_length=64).retrieve(queries, 3)
    found = hybrid(parts, weight=0.0, candidates=candidates).retrieve(queries, 3, questions=[QUESTION] * 5)
    assert found.rows.tolist() == plain.rows.tolist()
    torch.testing.assert_close(found.scores, plain.scores, rtol=0, atol=1e-5)
    assert torch.equal(found.lexical, torch.zeros(5, 3))


def test_raw_bm25_scores_are_added_unscaled_with_norm_none(parts) -> None:
    _, _, bm25, q = parts
    found = hybrid(parts, weight=0.5, candidates=8, norm="none").retrieve(q, 8, questions=[QUESTION])
    raw = bm25.score_rows([QUESTION], found.rows.numpy())
    np.testing.assert_allclose(found.lexical.numpy(), 0.5 * raw, rtol=1e-6)


def test_the_curriculum_gold_slot_gets_its_bm25_part_too(parts) -> None:
    store, _, bm25, q = parts
    retriever = hybrid(parts, weight=1.0)
    found = retriever.retrieve(q, 2, questions=["Which element is in group 15?"])
    gold = retriever.with_gold(found, [["e117"]], q, [QUESTION])
    assert gold.rows[0, -1] == TARGET and gold.lexical[0, -1].item() == pytest.approx(1.0)  # best BM25 for QUESTION
    expected = (q @ torch.from_numpy(np.asarray(retriever.index.vectors[TARGET]))).item() + 1.0
    assert gold.scores[0, -1].item() == pytest.approx(expected, abs=1e-5)


def test_hybrid_retrieval_without_question_texts_says_what_to_pass(parts) -> None:
    _, _, _, q = parts
    with pytest.raises(ValueError, match=r"hybrid retrieval \(index.hybrid=true\) scores the question texts too: "
                                         r"pass questions= \(1 question vectors, no texts\)"):
        hybrid(parts, weight=1.0).retrieve(q, 3)


def test_a_bm25_index_of_another_corpus_is_refused(parts, tmp_path: Path) -> None:
    store, dense, _, _ = parts
    small = BM25Index.build(store, IndexConfig(type="bm25"))
    small._n = 3
    with pytest.raises(Exception, match=r"hybrid retrieval needs a dense index and a BM25 index of the 8 passages"):
        Retriever(dense, store, max_context_length=64, hybrid=HybridScoring(small, 1.0, 3))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"type": "bm25"}, r"index.hybrid=true adds BM25 to a dense index, but index.type=bm25 is BM25 alone\. "
                           r"Fix: index=hybrid"),
        ({"hybrid_bm25_weight": -1.0}, r"index.hybrid_bm25_weight=-1.0 must be >= 0"),
        ({"hybrid_candidates": 0}, r"index.hybrid_candidates=0 must be > 0"),
        ({"hybrid_bm25_norm": "softmax"}, r"index.hybrid_bm25_norm='softmax' is not one of max, none"),
    ],
)
def test_hybrid_config_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(IndexConfig(hybrid=True), **changes).check()


def test_bm25_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"index.bm25_ngram=4 must be 1"):
        IndexConfig(bm25_ngram=4).check()
    with pytest.raises(ConfigError, match=r"index.bm25_min_word_chars=0 must be > 0"):
        IndexConfig(bm25_min_word_chars=0).check()


def test_word_pairs_bind_a_number_to_the_word_before_it(parts) -> None:
    store = parts[0]
    words = BM25Index.build(store, IndexConfig(type="bm25"))
    pairs = BM25Index.build(store, IndexConfig(type="bm25", bm25_ngram=2, bm25_min_word_chars=1))
    question = "Which element has atomic number 10?"  # Neon's number, and Nickel's group
    assert words.search_texts([question], 1)[1][0, 0] == 2  # Nickel: the word "10" of "group 10" ties them
    assert pairs.search_texts([question], 1)[1][0, 0] == 3  # Neon: "number 10" is its alone
    # a one-character number is a word only with bm25_min_word_chars=1
    assert words.search_texts(["Which element has atomic number 7?"], 1)[1][0, 0] != 1
    assert pairs.search_texts(["Which element has atomic number 7?"], 1)[1][0, 0] == 1
    # the keys are in the manifest only when they are not the defaults: older indexes stay valid
    assert "ngram" not in bm25_expectation(store, IndexConfig()) and "min_word_chars" not in words.manifest
    assert pairs.manifest["ngram"] == 2 and pairs.manifest["min_word_chars"] == 1


def test_whole_numbers_keep_a_weight_or_a_population_from_matching_a_bare_number(
    tmp_path: Path, make_gen_tokenizer, ctx_tokenizer
) -> None:
    from rag_lightning.retrieval.bm25 import _tokenize

    assert _tokenize(["Weight 26.98, population 1,526,000; 26th, 26."], None, whole_numbers=True) == [
        ["weight", "26.98", "population", "1,526,000", "26th", "26"]]
    assert _tokenize(["Weight 26.98"], None) == [["weight", "26", "98"]]
    passages = [
        Passage("al", "Aluminium", "Aluminium: atomic number 13, atomic weight 26.98."),
        Passage("ca", "Calcium", "Calcium: atomic number 20, atomic weight 40.08."),
        Passage("fe", "Iron", "Iron: atomic number 26, atomic weight 55.85."),
        Passage("x", "Xtown", "Xtown is a city of 26,400 people founded in 1926."),
    ]
    store = CorpusStore.build(passages, make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer(), tmp_path / "store")
    question = "What element has Z = 26?"  # no "atomic number": only the bare 26 ties it to Iron
    split = BM25Index.build(store, IndexConfig(type="bm25"))
    whole = BM25Index.build(store, IndexConfig(type="bm25", bm25_whole_numbers=True))
    split_scores, whole_scores = split.scores([question])[0], whole.scores([question])[0]
    assert split_scores[0] > 0 and split_scores[3] > 0  # 26.98 and 26,400 hold the word 26 too
    assert whole.search_texts([question], 1)[1][0, 0] == 2 and whole_scores[[0, 1, 3]].max() == 0
    assert whole.manifest["whole_numbers"] is True and "whole_numbers" not in split.manifest


def test_adjacent_pairs_are_not_formed_across_a_stopword(tmp_path: Path, make_gen_tokenizer, ctx_tokenizer) -> None:
    from rag_lightning.retrieval.bm25 import _tokenize

    question = "What is the capital city of Kazakhstan?"
    assert _tokenize([question], "en", ngram=2) == [
        ["what", "capital", "city", "kazakhstan", "what capital", "capital city", "city kazakhstan"]]
    # "is the" breaks "what capital", "of" breaks "city kazakhstan": only "capital city" stands in the text
    assert _tokenize([question], "en", ngram=2, adjacent_pairs=True) == [
        ["what", "capital", "city", "kazakhstan", "capital city"]]
    assert _tokenize(["Tell me the element with atomic number 7 now"], "en", ngram=3, min_word_chars=1,
                     adjacent_pairs=True) == [["tell", "me", "element", "atomic", "number", "7", "now", "tell me",
                                              "atomic number", "number 7", "7 now", "atomic number 7", "number 7 now"]]
    passages = [
        Passage("kz", "Kazakhstan", "The capital of Kazakhstan is Astana. Kazakhstan has a population of 1."),
        Passage("al", "Almaty", "Almaty is a city in Kazakhstan. It is the largest city of Kazakhstan."),
        Passage("sh", "Shymkent", "Shymkent is a city in Kazakhstan. It is the 3rd largest city of Kazakhstan."),
    ]
    store = CorpusStore.build(passages, make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer(), tmp_path / "store")
    across = BM25Index.build(store, IndexConfig(type="bm25", bm25_ngram=2))
    adjacent = BM25Index.build(store, IndexConfig(type="bm25", bm25_ngram=2, bm25_adjacent_pairs=True))
    assert across.search_texts([question], 1)[1][0, 0] == 1  # the city passages' "city in Kazakhstan" wins
    assert adjacent.search_texts([question], 1)[1][0, 0] == 0  # the rarer word "capital" decides
    assert adjacent.manifest["adjacent_pairs"] is True and "adjacent_pairs" not in across.manifest
    # without pairs the key changes nothing, so it is left out of the manifest (no needless rebuild)
    assert "adjacent_pairs" not in bm25_expectation(store, IndexConfig(type="bm25", bm25_adjacent_pairs=True))


def test_a_rag_run_with_index_hybrid_trains_the_question_encoder_through_both_parts(tiny_train_config,
                                                                                     tmp_path) -> None:
    from rag_lightning.pipeline import setup
    from rag_lightning.retrieval.build import RetrievalSpec, bm25_dir

    cfg = tiny_train_config(tmp_path, "index=hybrid", "index.hybrid_bm25_weight=3.0")
    s, module, datamodule = setup(cfg)
    assert s.index.type == "flat" and s.index.hybrid and module.retriever.hybrid is not None
    assert not module.retriever.sparse
    spec = RetrievalSpec(s.data, s.model.question_encoder, s.index, s.context, s.paths.cache_dir)
    assert (bm25_dir(spec) / MANIFEST_FILE).is_file() and bm25_dir(spec).name == f"{s.data.name}-bm25-ngram2-chars1-wholenum-adjacent"
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    module.cfg.question_encoder_warmup_steps = 0
    ret = module.retrieve(batch, 2)
    q = ret["question_vectors"].detach()
    expected = module.retriever.retrieve(q, 2, questions=batch["questions"])
    if module.cfg.gold_passage_steps > 0:
        expected = module.retriever.with_gold(expected, batch["gold_passage_ids"], q, batch["questions"])
    assert torch.equal(ret["rows"], expected.rows)
    torch.testing.assert_close(ret["doc_scores"].detach(), expected.scores, rtol=0, atol=1e-4)
    assert ret["doc_scores"].requires_grad


def test_the_dense_side_goes_through_the_searcher_so_ddp_shards_serve_hybrid_too(parts) -> None:
    """Under DDP the searcher is the collective DistributedSearch: hybrid retrieval must call it exactly once
    per retrieve on every rank (BM25 is read whole by each rank)."""
    store, dense, bm25, q = parts
    calls = []

    class Recording:
        def search(self, queries, k):
            calls.append(k)
            return dense.search(queries, k)

    retriever = Retriever(dense, store, max_context_length=64, searcher=Recording(),
                          hybrid=HybridScoring(bm25, 100.0, 4))
    found = retriever.retrieve(q, 3, questions=[QUESTION])
    assert calls == [4] and found.rows[0, 0] == TARGET


def test_rag_index_index_hybrid_builds_both_indexes_and_says_so(cli, tmp_path, tiny_world) -> None:
    files = {key: tiny_world[key] for key in ("corpus", "train", "val", "test")}
    overrides = ["data=jsonl", f"data.dir={tmp_path / 'data'}", *(f"data.{k}_file={v}" for k, v in files.items()),
                 "data.tokenizer.vocab_size=300", f"paths.cache_dir={tmp_path / 'cache'}",
                 "model/question_encoder=tiny", "index.progress=false"]  # test_cli's index_overrides
    run = cli("rag-index", *overrides, "index=hybrid", f"hydra.run.dir={tmp_path / 'r'}")
    assert run.code == 0, run.output[-3000:]
    indexes = tmp_path / "cache" / "indexes"
    assert (indexes / "jsonl-tiny-flat" / "index_manifest.json").is_file()  # index=flat's own directory
    manifest = json.loads((indexes / "jsonl-bm25-ngram2-chars1-wholenum-adjacent" / MANIFEST_FILE).read_text())
    assert manifest["ngram"] == 2 and manifest["min_word_chars"] == 1 and manifest["passages"] == 24
    assert manifest["adjacent_pairs"] is True
    assert "dense + bm25" in run.out and "weight 7.0 (norm none), 20 candidates each" in run.out


def test_the_number_probe_asks_each_element_once_per_held_out_phrasing(tmp_path: Path) -> None:
    import importlib.util

    from rag_lightning.data.world_paraphrases import PARAPHRASES

    spec = importlib.util.spec_from_file_location("hybrid_retrieval", Path(__file__).parents[1] / "benchmarks" / "hybrid_retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    iron = {"relation": "element_by_number", "question": "Which element has atomic number 26?", "answers": ["Iron"],
            "gold_passage_ids": ["element-fe-0"]}
    neon = {**iron, "question": "Element number 10?", "answers": ["Neon"], "gold_passage_ids": ["element-ne-0"]}
    other = {"relation": "capital", "question": "What is the capital of Japan?", "answers": ["Tokyo"]}
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in (iron, other)))
    test.write_text(json.dumps(neon) + "\n" + json.dumps({**iron, "question": "26: which element?"}) + "\n")
    probe = bench.number_probe({"train": str(train), "test": str(test)})
    templates = PARAPHRASES["element_by_number"]
    assert [r["question"] for r in probe] == [t.format(number=n) for n in (10, 26) for t in templates]
    assert [r["gold_passage_ids"] for r in probe[:: len(templates)]] == [["element-ne-0"], ["element-fe-0"]]
    assert {r["answers"][0] for r in probe} == {"Neon", "Iron"} and len({r["id"] for r in probe}) == len(probe)
    test.write_text(json.dumps({**iron, "question": "Which element, 26 or 27?"}) + "\n")
    with pytest.raises(SystemExit, match=r"test.jsonl:1: an element_by_number question must name one number"):
        bench.number_probe({"test": str(test)})
