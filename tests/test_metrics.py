import torch

from rag_lightning import metrics


def test_normalize_and_exact_match():
    assert metrics.normalize_answer("The  Euro!") == "euro"
    assert metrics.exact_match("the euro", ["Euro", "EUR"]) == 1.0
    assert metrics.exact_match("dollar", ["Euro"]) == 0.0


def test_f1_takes_the_best_gold_answer():
    assert metrics.f1_score("new york city", ["York", "New York City"]) == 1.0
    # 1 common token of 2 predicted and 1 gold: p=0.5, r=1 -> f1=2/3
    assert abs(metrics.f1_score("george town", ["town"]) - 2 / 3) < 1e-9
    assert metrics.f1_score("", ["x"]) == 0.0


def test_retrieval_hits_use_gold_ids_else_answer_strings():
    hits = metrics.retrieval_hits(
        retrieved_ids=[["a", "b"], ["c", "d"]],
        retrieved_texts=[["x", "y"], ["Paris is big", "the capital is N'Djamena."]],
        gold_ids=[["b"], []],
        answers=[["zzz"], ["N'Djamena"]],
    )
    assert hits.tolist() == [[False, True], [False, True]]
    assert metrics.recall_at_k(hits, 1).tolist() == [0.0, 0.0]
    assert metrics.recall_at_k(hits, 2).tolist() == [1.0, 1.0]
    assert metrics.reciprocal_rank(hits).tolist() == [0.5, 0.5]


def test_answer_match_is_whole_word():
    hits = metrics.retrieval_hits([["a"]], [["Chadians live in Chad"]], [[]], [["Chadi"]])
    assert hits.tolist() == [[False]]


def test_collapse_diagnostics():
    uniform = torch.zeros(2, 4)
    assert torch.allclose(metrics.doc_entropy(uniform), torch.full((2,), torch.log(torch.tensor(4.0)).item()))
    peaked = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert metrics.doc_entropy(peaked).item() == 0.0
    assert metrics.distinct_share(torch.tensor([[1, 2], [1, 3]])) == 0.75
