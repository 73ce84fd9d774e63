"""RagModule pieces: closed-book inputs, the contrastive term, the frozen-encoder cache, the LR schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rag_lightning.config import ConfigError, ModelConfig, QuestionEncoderConfig, section
from rag_lightning.models.module import (
    RagModule,
    _lr_lambda,
    contrastive_loss,
    contrastive_retrieval_loss,
    with_specials,
)


def test_with_specials_wraps_each_question():
    ids = torch.tensor([[7, 8, 9], [5, 1, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out, out_mask = with_specials(ids, mask, bos=0, eos=2, pad=1)
    assert out.tolist() == [[0, 7, 8, 9, 2], [0, 5, 2, 1, 1]]
    assert out_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_contrastive_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gold = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    loss = contrastive_retrieval_loss(q, gold, torch.tensor([10, 11]))
    # scores: q0 -> [2, 1], q1 -> [0, 1]; positives on the diagonal
    expected = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) + math.log(math.exp(1) / (1 + math.exp(1)))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_contrastive_loss_counts_shared_gold_passages_as_positives():
    q = torch.randn(3, 4)
    gold = torch.randn(3, 4)
    loss = contrastive_retrieval_loss(q, gold, torch.tensor([5, 5, 6]))
    scores = q @ gold.T
    log_p = torch.log_softmax(scores, -1)
    expected = -(
        torch.logsumexp(log_p[0, :2], 0) + torch.logsumexp(log_p[1, :2], 0) + log_p[2, 2]
    ) / 3
    assert torch.allclose(loss, expected, atol=1e-6)


class _CountingEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Embedding(50, 4)
        self.dropout = torch.nn.Dropout(0.5)
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += input_ids.shape[0]
        return SimpleNamespace(pooler_output=self.dropout(self.proj(input_ids[:, 0])))


def _module(freeze: bool) -> RagModule:
    tokenizer = SimpleNamespace(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cfg = ModelConfig(freeze_question_encoder=freeze, question_encoder_warmup_steps=0)
    return RagModule(_CountingEncoder(), torch.nn.Linear(2, 2), cfg, generator_tokenizer=tokenizer)


def _batch(questions, ids):
    return {
        "questions": questions,
        "question_input_ids": torch.tensor(ids)[:, None],
        "question_attention_mask": torch.ones(len(ids), 1, dtype=torch.long),
    }


def test_frozen_encoder_runs_once_per_question_without_dropout():
    module = _module(freeze=True)
    first = module.encode_questions(_batch(["a", "b"], [3, 4]))
    again = module.encode_questions(_batch(["b", "c", "a"], [4, 5, 3]))
    assert module.question_encoder.calls == 3  # a, b, then only c
    assert torch.equal(again[0], first[1]) and torch.equal(again[2], first[0])
    assert torch.equal(first[0], module.question_encoder.proj.weight[3])  # eval mode: no dropout
    assert module.question_encoder.training  # the encoder's mode is restored


def test_training_encoder_is_not_cached_and_has_gradients():
    module = _module(freeze=False)
    out = module.encode_questions(_batch(["a"], [3]))
    module.encode_questions(_batch(["a"], [3]))
    assert module.question_encoder.calls == 2 and out.requires_grad


def test_lr_schedules():
    linear = _lr_lambda("linear", warmup=10, total=110)
    assert linear(0) == 0.1 and linear(9) == 1.0 and linear(60) == 0.5 and linear(110) == 0.0
    cosine = _lr_lambda("cosine", warmup=0, total=100)
    assert cosine(0) == 1.0 and abs(cosine(50) - 0.5) < 1e-9
    assert _lr_lambda("constant", warmup=5, total=50)(40) == 1.0


def test_lr_schedule_boundaries_and_shapes():
    linear = _lr_lambda("linear", warmup=10, total=110)
    assert [linear(s) for s in (8, 9, 10, 11)] == [0.9, 1.0, 1.0, 0.99]  # warm-up ends at full rate, then decays
    assert linear(200) == 0.0  # past the end: stays at zero
    cosine = _lr_lambda("cosine", warmup=10, total=110)
    assert cosine(10) == 1.0 and cosine(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # not linear's .75
    assert cosine(110) == 0.0 and cosine(185) == 0.0  # past the end: stays at zero, not back up the cosine
    short = _lr_lambda("linear", warmup=4, total=5)  # one decay step: the whole way down at once
    assert short(4) == 1.0 and short(5) == 0.0 and short(6) == 0.0


def test_contrastive_loss_with_hard_negatives_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # passages: q0's gold, q1's gold, a retrieved non-gold one, a second gold passage of q1
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]])
    positives = torch.tensor([[True, False, False, False], [False, True, False, True]])
    loss = contrastive_loss(q, p, positives)
    # q0 scores [2, 0, 1, 0]: -log(e^2 / (e^2 + 1 + e + 1)); q1 scores [0, 1, 1, 2]: -log((e + e^2) / (1 + 2e + e^2))
    e = math.e
    expected = (-math.log(e**2 / (e**2 + 2 + e)) - math.log((e + e**2) / (1 + 2 * e + e**2))) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_retrieval_loss_takes_retrieved_passages_as_negatives_and_skips_gold_ids_outside_the_corpus():
    vectors = torch.randn(4, 4).numpy()

    class FakeRetriever:  # the retriever API the module uses: rows of ids, vectors of rows
        def rows_of(self, ids):
            return [{"a": 0, "b": 1, "c": 2, "d": 3}.get(pid) for pid in ids]

        def vectors(self, rows):
            return torch.from_numpy(vectors[list(rows)])

    module = _module(freeze=False)
    module.retriever = FakeRetriever()
    q = torch.randn(4, 4)
    batch = {"gold_passage_ids": [["a"], ["zz"], [], ["c", "d"]]}
    rows = torch.tensor([[1, 0], [3, 1], [0, 1], [2, 1]])  # retrieved for each question
    loss = module.retrieval_loss(batch, {"question_vectors": q, "rows": rows})
    # kept questions 0 and 3; passages: the first golds a, c, then the retrieved b, d (each once)
    columns = torch.from_numpy(vectors[[0, 2, 1, 3]])
    log_p0 = torch.log_softmax(q[0] @ columns.T, -1)
    log_p3 = torch.log_softmax(q[3] @ columns.T, -1)
    # question 0: positive a only; question 3: c and d (both its gold passages), b a hard negative
    expected = -(log_p0[0] + torch.logsumexp(log_p3[[1, 3]], 0)) / 2
    torch.testing.assert_close(loss, expected)
    assert module.retrieval_loss({"gold_passage_ids": [["zz"], []]}, {"question_vectors": q[:2], "rows": rows[:2]}) is None


def test_gold_curriculum_applies_only_in_training_before_its_step_limit():
    calls = []

    class FakeRetriever:
        def retrieve(self, q, k, questions=None):
            return SimpleNamespace(rows=torch.zeros(q.shape[0], k, dtype=torch.long),
                                   vectors=torch.zeros(q.shape[0], k, 4), passage_ids=[["x"] * k] * q.shape[0])

        def with_gold(self, found, gold, q, questions=None):
            calls.append(gold)
            return found

        def build_contexts(self, question_ids, rows):
            return torch.zeros(rows.numel(), 3, dtype=torch.long), torch.ones(rows.numel(), 3, dtype=torch.long)

    tokenizer = SimpleNamespace(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    module = RagModule(_CountingEncoder(), torch.nn.Linear(2, 2), ModelConfig(gold_passage_steps=5),
                       generator_tokenizer=tokenizer, retriever=FakeRetriever())
    batch = _batch(["a"], [3]) | {"gold_passage_ids": [["g"]], "question_generator_ids": torch.tensor([[7]]),
                                  "question_generator_mask": torch.tensor([[1]])}
    module.retrieve(batch, 2)
    assert calls == [[["g"]]]
    module.eval()
    module.retrieve(batch, 2)
    assert len(calls) == 1  # evaluation always reads what the search found
    module.train()
    module.cfg.gold_passage_steps = 0
    module.retrieve(batch, 2)
    assert len(calls) == 1


def _tiny_module(**cfg) -> RagModule:
    from rag_lightning.models.encoders import build_question_encoder

    encoder = build_question_encoder(section(QuestionEncoderConfig, {"kind": "tiny", "tiny": {"hidden_size": 32, "layers": 3, "heads": 2}}, "encoder"))
    tokenizer = SimpleNamespace(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = ModelConfig(**{"question_encoder_warmup_steps": 0, **cfg})  # the encoder trains from step 0
    return RagModule(encoder, torch.nn.Linear(2, 2), model, generator_tokenizer=tokenizer)


def test_top_layer_training_caches_bottom_states_and_matches_the_encoder():
    from rag_lightning.models.encoders import load_encoder_tokenizer

    tok = load_encoder_tokenizer(QuestionEncoderConfig(kind="tiny"))

    def batch(questions):
        enc = tok(questions, padding=True, return_tensors="pt")
        return {"questions": questions, "question_input_ids": enc["input_ids"],
                "question_attention_mask": enc["attention_mask"]}

    module = _tiny_module(question_encoder_trainable_layers=1)
    module.eval()  # no dropout, so vectors compare exactly with the plain encoder
    long_q, short_q = "what is the capital city of the country of france?", "who wrote hamlet?"
    module.encode_questions(batch([long_q, short_q]))
    assert set(module._bottom_states) == {long_q, short_q}
    cached = module._bottom_states[short_q]
    alone = module.encode_questions(batch([short_q]))  # other padding than when it was cached
    assert module._bottom_states[short_q] is cached
    with torch.no_grad():
        reference = module.question_encoder(**{k: v for k, v in tok([short_q], return_tensors="pt").items()
                                               if k != "token_type_ids"}).pooler_output
    assert torch.allclose(alone, reference, atol=1e-6)
    assert alone.requires_grad  # the top layer trains
    trainable = [n for n, p in module.question_encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.2." in n for n in trainable)


def test_top_layer_training_refuses_bad_depths_and_encoders():
    with pytest.raises(ConfigError, match=r"question_encoder_trainable_layers=4 must be in \[1, 3\]"):
        _tiny_module(question_encoder_trainable_layers=4)
    with pytest.raises(ConfigError, match="question_encoder_trainable_layers=0 must be > 0"):
        ModelConfig(question_encoder_trainable_layers=0).check()
    tokenizer = SimpleNamespace(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    with pytest.raises(ConfigError, match="needs a DPR question encoder"):
        RagModule(_CountingEncoder(), torch.nn.Linear(2, 2), ModelConfig(question_encoder_trainable_layers=1),
                  generator_tokenizer=tokenizer)


def test_retrieval_stays_float32_under_mixed_precision():
    from rag_lightning.models.encoders import load_encoder_tokenizer

    vectors = torch.randn(1, 2, 32)

    class FakeRetriever:
        def retrieve(self, q, k, questions=None):
            assert q.dtype == torch.float32
            return SimpleNamespace(rows=torch.zeros(q.shape[0], k, dtype=torch.long), vectors=vectors,
                                   passage_ids=[["x"] * k])

        def build_contexts(self, question_ids, rows):
            return torch.zeros(rows.numel(), 3, dtype=torch.long), torch.ones(rows.numel(), 3, dtype=torch.long)

    module = _tiny_module()
    module.retriever = FakeRetriever()
    module.eval()
    enc = load_encoder_tokenizer(QuestionEncoderConfig(kind="tiny"))(["who wrote hamlet?"], return_tensors="pt")
    batch = {"questions": ["who wrote hamlet?"], "question_input_ids": enc["input_ids"],
             "question_attention_mask": enc["attention_mask"], "question_generator_ids": torch.tensor([[7]]),
             "question_generator_mask": torch.tensor([[1]])}
    plain = module.retrieve(batch, 2)["doc_scores"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.retrieve(batch, 2)["doc_scores"]
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_top_layers_see_each_questions_own_padding_mask():
    """In a batch of questions of different lengths, each vector through the cached bottom states and the
    trainable top layers equals the plain encoder's on that question alone (padding masked in the top)."""
    from rag_lightning.models.encoders import load_encoder_tokenizer

    tok = load_encoder_tokenizer(QuestionEncoderConfig(kind="tiny"))
    module = _tiny_module(question_encoder_trainable_layers=1)
    module.eval()
    questions = ["what is the capital city of the country of france?", "who wrote hamlet?"]
    enc = tok(questions, padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all()  # the short question is padded
    batch = {"questions": questions, "question_input_ids": enc["input_ids"],
             "question_attention_mask": enc["attention_mask"]}
    for _ in range(2):  # computing the bottom states, then reading them from the cache
        vectors = module.encode_questions(batch)
        with torch.no_grad():
            for i, question in enumerate(questions):
                alone = tok([question], return_tensors="pt")
                reference = module.question_encoder(input_ids=alone["input_ids"],
                                                    attention_mask=alone["attention_mask"]).pooler_output
                torch.testing.assert_close(vectors[i : i + 1], reference, atol=1e-5, rtol=1e-5)


def test_the_gold_curriculum_scores_with_the_question_vectors():
    seen = []

    class FakeRetriever:
        def retrieve(self, q, k, questions=None):
            return SimpleNamespace(rows=torch.zeros(q.shape[0], k, dtype=torch.long),
                                   vectors=torch.zeros(q.shape[0], k, 4), passage_ids=[["x"] * k] * q.shape[0])

        def with_gold(self, found, gold, q, questions=None):
            seen.append(q)
            return SimpleNamespace(rows=found.rows, vectors=torch.ones_like(found.vectors),
                                   passage_ids=found.passage_ids)

        def build_contexts(self, question_ids, rows):
            return torch.zeros(rows.numel(), 3, dtype=torch.long), torch.ones(rows.numel(), 3, dtype=torch.long)

    tokenizer = SimpleNamespace(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    module = RagModule(_CountingEncoder(), torch.nn.Linear(2, 2), ModelConfig(gold_passage_steps=5),
                       generator_tokenizer=tokenizer, retriever=FakeRetriever())
    batch = _batch(["a", "b"], [3, 4]) | {"gold_passage_ids": [["g"], []],
                                          "question_generator_ids": torch.tensor([[7], [8]]),
                                          "question_generator_mask": torch.tensor([[1], [1]])}
    ret = module.retrieve(batch, 2)
    assert len(seen) == 1 and seen[0] is ret["question_vectors"]  # the vectors the scores are made of
    # the scores are taken against what the curriculum returned (its vectors), not what the search found
    torch.testing.assert_close(ret["doc_scores"], ret["question_vectors"].sum(-1, keepdim=True).expand(2, 2))


def test_retrieve_without_a_retriever_says_how_to_build_one():
    module = _module(freeze=False)
    with pytest.raises(RuntimeError, match=r"^RagModule in mode rag_token needs a retriever; build the module "
                                           r"with rag_lightning\.pipeline\.build_module, which attaches one$"):
        module.retrieve(_batch(["a"], [3]), 2)


def test_the_model_section_is_saved_as_plain_hyperparameters():
    """Checkpoints load with torch.load(weights_only=True) and rag-eval rebuilds the module from them."""
    import json
    from dataclasses import asdict

    module = _module(freeze=False)
    assert dict(module.hparams) == {"model": json.loads(json.dumps(asdict(module.cfg), default=str))}
    assert module.hparams["model"]["mode"] == module.cfg.mode and module.hparams["model"]["n_docs"] == module.cfg.n_docs


@pytest.mark.parametrize("freeze", [False, True], ids=["training", "frozen"])
def test_question_vectors_of_a_padded_batch_equal_each_question_alone(freeze):
    """The encoder sees each question's attention mask: padding a short question in a batch changes nothing."""
    from rag_lightning.models.encoders import load_encoder_tokenizer

    tok = load_encoder_tokenizer(QuestionEncoderConfig(kind="tiny"))
    module = _tiny_module(freeze_question_encoder=freeze)
    module.eval()
    questions = ["what is the capital city of the country of france?", "who wrote hamlet?"]
    enc = tok(questions, padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all()
    vectors = module.encode_questions({"questions": questions, "question_input_ids": enc["input_ids"],
                                       "question_attention_mask": enc["attention_mask"]})
    with torch.no_grad():
        for i, question in enumerate(questions):
            alone = tok([question], return_tensors="pt")
            reference = module.question_encoder(input_ids=alone["input_ids"],
                                                attention_mask=alone["attention_mask"]).pooler_output
            torch.testing.assert_close(vectors[i : i + 1], reference, atol=1e-5, rtol=1e-5)
