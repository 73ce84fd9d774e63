"""What the module does outside the training step, pinned without a Trainer: the metrics an evaluation step
logs (compared with values counted by hand from chosen answers and gold passages), the records it returns,
the predictions files it writes, and the optimizer and schedule it builds.

These run in seconds, so the mutation run (docs/testing.md) can test the module's evaluation and optimiser code
too, not only its training step.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from rag_lightning.pipeline import setup


@pytest.fixture
def tiny_module(tmp_path, tiny_train_config):
    """``tiny_module(*overrides)``: (module in eval mode, gradients off, with a logging recorder, one batch of 4 questions)."""

    def build(*overrides: str):
        torch.manual_seed(0)
        _, module, datamodule = setup(tiny_train_config(tmp_path, *overrides))
        module.eval()
        module.logged = {}
        torch.set_grad_enabled(False)  # as in evaluation; restored by the fixture below
        module.log = lambda name, value, **kwargs: module.logged.__setitem__(name, (value, kwargs))
        batch = next(iter(datamodule.train_dataloader()))
        return module, batch

    yield build
    torch.set_grad_enabled(True)


def _chosen_answers(batch: dict) -> list[str]:
    """Question 0 right, 1 right up to case and punctuation, 2 half right (one extra word), 3 empty."""
    a = [answers[0] for answers in batch["answers"]]
    return [a[0], a[1].upper() + ".", f"{a[2]} extra", ""]


def _gold_by_rank(module, batch: dict) -> tuple[list[list[str]], torch.Tensor]:
    """Gold ids chosen from what the module retrieves: question 0's gold is its second passage, 1's its first,
    2's none of the retrieved, 3's its first and second."""
    ret = module.retrieve(batch, module.cfg.eval_docs)
    ids = ret["passage_ids"]
    return [[ids[0][1]], [ids[1][0]], ["not-a-retrieved-id"], [ids[3][0], ids[3][1]]], ret["doc_scores"]


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence"])
def test_an_evaluation_step_logs_metrics_counted_by_hand(tiny_module, mode):
    module, batch = tiny_module(f"model={mode}", "model.eval_n_docs=3")
    gold, _ = _gold_by_rank(module, batch)
    batch["gold_passage_ids"] = gold
    module.answer = lambda b, ret: _chosen_answers(b)
    records = module._evaluate(batch, "val")

    logged = {name: float(value) for name, (value, _) in module.logged.items()}
    words = len(batch["answers"][2][0].split())
    f1_half = 2 * words / (2 * words + 1)  # precision words/(words+1), recall 1
    assert logged["val/em"] == pytest.approx(2 / 4)
    assert logged["val/f1"] == pytest.approx((1 + 1 + f1_half + 0) / 4)
    assert logged["val/recall@1"] == pytest.approx(2 / 4)  # questions 1 and 3
    assert logged["val/recall@3"] == pytest.approx(3 / 4)  # and question 0 at rank 2
    assert logged["val/mrr"] == pytest.approx((1 / 2 + 1 + 0 + 1) / 4)
    nll, _ = module.nll(batch, 3, "mean")
    assert logged["val/loss"] == pytest.approx(float(nll), rel=1e-5)
    assert 0.0 < logged["val/distinct_passages"] <= 1.0 and logged["val/doc_entropy"] > 0.0
    assert set(logged) == {"val/loss", "val/em", "val/f1", "val/recall@1", "val/recall@3", "val/mrr",
                           "val/doc_entropy", "val/distinct_passages"}
    kwargs = {name: kw for name, (_, kw) in module.logged.items()}
    assert all(kw["batch_size"] == 4 and kw["sync_dist"] is True for kw in kwargs.values())
    assert [name for name, kw in kwargs.items() if kw.get("prog_bar")] == ["val/em"]

    assert [(r["em"], r["answers"]) for r in records] == [(1.0, batch["answers"][0]), (1.0, batch["answers"][1]),
                                                           (0.0, batch["answers"][2]), (0.0, batch["answers"][3])]
    assert records[2]["f1"] == pytest.approx(f1_half) and records[3]["f1"] == 0.0


def test_the_entropy_and_distinct_share_are_of_the_retrieved_passages(tiny_module):
    module, batch = tiny_module("model.eval_n_docs=2")
    module.answer = lambda b, ret: _chosen_answers(b)
    module._evaluate(batch, "test")
    ret = module.retrieve(batch, 2)
    p = torch.softmax(ret["doc_scores"], dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    distinct = len(set(ret["rows"].flatten().tolist())) / ret["rows"].numel()
    assert float(module.logged["test/doc_entropy"][0]) == pytest.approx(float(entropy), rel=1e-5)
    assert float(module.logged["test/distinct_passages"][0]) == pytest.approx(distinct)
    assert set(module.logged) >= {"test/em", "test/recall@1", "test/recall@2"}


def test_closed_book_evaluation_logs_no_retrieval_metrics(tiny_module):
    module, batch = tiny_module("experiment=world_closed_book", "model.question_encoder.kind=tiny", "loader.global_batch_size=4")
    assert len(batch["ids"]) == 4
    module.answer = lambda b, ret: _chosen_answers(b)
    records = module._evaluate(batch, "val")
    assert set(module.logged) == {"val/loss", "val/em", "val/f1"}
    assert float(module.logged["val/em"][0]) == pytest.approx(0.5)
    assert all("passages" not in r for r in records)


def test_records_hold_each_questions_passages_with_scores_and_probabilities(tiny_module):
    module, batch = tiny_module("model.eval_n_docs=3")
    ret = module.retrieve(batch, 3)
    preds = ["a", "b", "c", "d"]
    records = module.records(batch, preds, ret)
    assert [(r["id"], r["question"], r["prediction"]) for r in records] == list(
        zip(batch["ids"], batch["questions"], preds)
    )
    for i, record in enumerate(records):
        passages = module.retriever.passages(ret["rows"][i].tolist())
        scores = ret["doc_scores"][i]
        assert [p["id"] for p in record["passages"]] == [p.id for p in passages] == ret["passage_ids"][i]
        assert [(p["title"], p["text"]) for p in record["passages"]] == [(p.title, p.text) for p in passages]
        assert [p["score"] for p in record["passages"]] == pytest.approx(scores.tolist(), abs=1e-5)
        probs = [math.exp(s) for s in scores.tolist()]
        assert [p["p"] for p in record["passages"]] == pytest.approx([q / sum(probs) for q in probs], abs=1e-5)
        assert sum(p["p"] for p in record["passages"]) == pytest.approx(1.0, abs=1e-4)
    assert set(records[0]) == {"id", "question", "prediction", "passages"}
    json.dumps(records)  # what predictions files and rag-predict write


def test_validation_keeps_the_first_rows_for_the_sample_table(tiny_module):
    module, batch = tiny_module()
    module.answer = lambda b, ret: _chosen_answers(b)
    module.sample_table_size = 6
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    module.validation_step(batch, 1)
    assert [r["prediction"] for r in module.val_samples] == _chosen_answers(batch) + _chosen_answers(batch)[:2]
    module.on_validation_epoch_start()
    assert module.val_samples == []


def test_test_steps_write_one_predictions_file_per_split(tiny_module, tmp_path):
    module, batch = tiny_module()
    module.answer = lambda b, ret: _chosen_answers(b)
    module.predictions_dir = str(tmp_path / "preds")
    (tmp_path / "preds").mkdir()
    module.trainer = SimpleNamespace(world_size=1, is_global_zero=True, global_step=0)
    module.on_test_epoch_start()
    module.test_step({**batch, "split": "test"}, 0)
    module.test_step({**batch, "split": "test_seen"}, 0)
    module.test_step({**batch, "split": "test"}, 1)
    module.on_test_epoch_end()
    written = {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in (tmp_path / "preds").iterdir()}
    assert sorted(written) == ["predictions_test.jsonl", "predictions_test_seen.jsonl"]
    assert [r["prediction"] for r in written["predictions_test.jsonl"]] == _chosen_answers(batch) * 2
    assert [r["id"] for r in written["predictions_test_seen.jsonl"]] == list(batch["ids"])
    assert {"test/em", "test_seen/em"} <= set(module.logged)
    module.on_test_epoch_start()
    assert module._predictions == {}


def test_without_a_predictions_dir_nothing_is_written(tiny_module, tmp_path, monkeypatch):
    module, batch = tiny_module()
    module.answer = lambda b, ret: _chosen_answers(b)
    module.trainer = SimpleNamespace(world_size=1, is_global_zero=True, global_step=0)
    module.predictions_dir = None
    module.test_step({**batch, "split": "test"}, 0)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    module.on_test_epoch_end()
    assert sorted(tmp_path.rglob("*")) == before
    assert len(module._predictions["test"]) == 4


def test_predict_step_answers_with_the_evaluation_passages(tiny_module):
    module, batch = tiny_module("model.eval_n_docs=3")
    module.answer = lambda b, ret: [f"{len(ret['passage_ids'][i])}" for i in range(len(b["ids"]))]
    records = module.predict_step(batch, 0)
    assert [r["prediction"] for r in records] == ["3"] * 4
    assert [len(r["passages"]) for r in records] == [3] * 4


def _optimizer(module, steps: int = 100):
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    configured = module.configure_optimizers()
    return configured["optimizer"], configured["lr_scheduler"]


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_the_optimizer_groups_generator_and_question_encoder_with_their_rates_and_decay(tiny_module):
    module, _ = tiny_module(
        "model.optim.lr=0.01", "model.optim.question_encoder_lr=0.002", "model.optim.weight_decay=0.1",
        "model.optim.warmup_steps=10", "model.optim.scheduler=linear", "model.freeze_question_encoder=false",
    )
    optimizer, scheduler = _optimizer(module)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert scheduler["interval"] == "step"
    groups = optimizer.param_groups
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(0.01, 0.1), (0.01, 0.0), (0.002, 0.1), (0.002, 0.0)]

    def split(named):
        decay = {id(p) for n, p in named if p.requires_grad and p.ndim >= 2 and "norm" not in n.lower()}
        rest = {id(p) for n, p in named if p.requires_grad} - decay
        return decay, rest

    gen_decay, gen_rest = split(list(module.generator.named_parameters()))
    qe_decay, qe_rest = split(list(module.question_encoder.named_parameters()))
    assert [_ids(g["params"]) for g in groups] == [gen_decay, gen_rest, qe_decay, qe_rest]
    assert gen_rest and qe_rest  # biases and LayerNorms exist in both
    opt = module.cfg.optim
    assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == (tuple(opt.betas), opt.eps)
    # linear warm-up over 10 steps, then linear decay to 0 at step 100
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert lrs[55] == pytest.approx(0.01 * (1 - 45 / 90)) and lrs[99] == pytest.approx(0.01 * (1 - 89 / 90))
    assert optimizer.param_groups[2]["lr"] == pytest.approx(0.002 * (1 - 90 / 90), abs=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [("model.freeze_question_encoder=true",), ("model.optim.question_encoder_lr=0",),
     ("experiment=world_closed_book", "model.question_encoder.kind=tiny")],
    ids=["frozen", "lr 0", "closed book"],
)
def test_a_question_encoder_that_does_not_train_is_left_out_and_frozen(tiny_module, overrides):
    module, _ = tiny_module(*overrides)
    optimizer, _ = _optimizer(module)
    assert len(optimizer.param_groups) == 2
    in_optimizer = set().union(*(_ids(g["params"]) for g in optimizer.param_groups))
    assert in_optimizer == {id(p) for p in module.generator.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in module.question_encoder.parameters())


def test_the_schedule_runs_over_the_trainers_estimate_of_steps(tiny_module):
    module, _ = tiny_module("model.optim.warmup_steps=0", "model.optim.scheduler=cosine")
    optimizer, scheduler = _optimizer(module, steps=4)
    base = optimizer.param_groups[0]["initial_lr"]
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"] / base)
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
