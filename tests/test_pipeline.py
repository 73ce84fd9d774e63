"""End to end on tiny models: fit, checkpoint, test, export, eval, resume (seconds each)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from rag_lightning.pipeline import train


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence", "closed_book"])
def test_fast_dev_run_each_mode(tmp_path, mode, tiny_train_config):
    cfg = tiny_train_config(tmp_path, f"model={mode}", "debug=fast_dev_run")
    results = train(cfg)
    assert "test/em" in results and 0.0 <= results["test/em"] <= 1.0
    if mode != "closed_book":
        assert "test/recall@2" in results


def _paraphrase_file(tmp_path):
    """The tiny world's test countries asked in other words, as the world's test_paraphrase split asks (with a
    `relation` per question, which metrics_by_relation.json groups by)."""
    from tests.conftest import COUNTRIES

    rows = [
        {"id": f"p{i}", "question": f"Which city is {country}'s capital?", "answers": [capital],
         "gold_passage_ids": [f"c{i}"], "relation": "capital"}
        for i, (country, capital) in enumerate(COUNTRIES) if i in (8, 9)
    ] + [
        {"id": f"p{i}", "question": f"Whose capital is {capital}?", "answers": [country],
         "gold_passage_ids": [f"c{i}"], "relation": "capital_of"}
        for i, (country, capital) in enumerate(COUNTRIES) if i in (10, 11)
    ]
    path = tmp_path / "test_paraphrase.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_checkpoint_test_export(tmp_path, tiny_train_config):
    para = _paraphrase_file(tmp_path)
    cfg = tiny_train_config(tmp_path, "trainer.max_epochs=2", f"+data.extra_test_files.test_paraphrase={para}")
    results = train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/em"] == pytest.approx(results["test/em"])
    for key in ("test/f1", "test/recall@1", "test/recall@2", "val/em", "val/loss", "test_paraphrase/em",
                "test_paraphrase/f1", "test_paraphrase/recall@2"):
        assert key in metrics
    # EM / F1 per relation of each split, by hand (every tiny test question asks for a capital)
    records = [json.loads(line) for line in (run / "predictions_test_paraphrase.jsonl").read_text().splitlines()]
    relation = {"p8": "capital", "p9": "capital", "p10": "capital_of", "p11": "capital_of"}
    by_hand = {
        rel: {"n": 2, **{m: sum(r[m] for r in records if relation[r["id"]] == rel) / 2 for m in ("em", "f1")}}
        for rel in ("capital", "capital_of")
    }
    predictions = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    test_by_hand = {"capital": {"n": 4, **{m: sum(r[m] for r in predictions) / 4 for m in ("em", "f1")}}}
    assert json.loads((run / "metrics_by_relation.json").read_text()) == {
        "test": test_by_hand, "test_paraphrase": by_hand}
    assert sum(r["em"] for r in records) / 4 == pytest.approx(metrics["test_paraphrase/em"])
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(predictions) == 4 and {"id", "prediction", "answers", "em", "f1", "passages"} <= set(predictions[0])
    passages = predictions[0]["passages"]  # the passages read, in rank order, with score and p(z|x)
    assert len(passages) == 2 and {"id", "title", "text", "score", "p"} <= set(passages[0])
    assert passages[0]["score"] >= passages[1]["score"] and sum(p["p"] for p in passages) == pytest.approx(1, abs=1e-3)
    # the export loads with plain transformers
    from transformers import BartForConditionalGeneration, DPRQuestionEncoder

    DPRQuestionEncoder.from_pretrained(run / "checkpoints" / "hf" / "question_encoder")
    BartForConditionalGeneration.from_pretrained(run / "checkpoints" / "hf" / "generator")
    # the saved checkpoint loads without unpickling arbitrary objects
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # 8 train questions / batch 4 x 2 epochs
    assert (run / "config_resolved.yaml").is_file()
    assert OmegaConf.load(run / "config_resolved.yaml").model.mode == "rag_token"


def test_eval_reproduces_the_test_stage(tmp_path, tiny_train_config, eval_config):
    from rag_lightning.pipeline import evaluate

    results = train(tiny_train_config(tmp_path, "trainer.max_epochs=1", "export=false"))
    run = tmp_path / "run"
    best = next((run / "checkpoints").glob("step*.ckpt"))
    again = evaluate(eval_config(best, tmp_path / "eval"))
    for key in ("test/em", "test/f1", "test/recall@1", "test/recall@2", "test/loss"):
        assert again[key] == pytest.approx(results[key], abs=1e-6), key
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["passages"]) == 2
    test_stage = (run / "predictions_test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(line) for line in test_stage]  # the same records
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/em"] == pytest.approx(results["test/em"])
    # the checkpoint records its generator vocabulary; weights read through another vocabulary are refused
    from rag_lightning.config import ConfigError
    from rag_lightning.models.module import TOKENIZER_KEY

    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert len(ckpt[TOKENIZER_KEY]) == 64
    ckpt[TOKENIZER_KEY] = "0" * 64
    torch.save(ckpt, run / "checkpoints" / "other_vocab.ckpt")
    with pytest.raises(ConfigError, match="another generator tokenizer"):
        evaluate(eval_config(run / "checkpoints" / "other_vocab.ckpt", tmp_path / "eval_other"))


def test_resume_runs_only_the_remaining_steps_and_ends_as_an_uninterrupted_run(tmp_path, tiny_train_config, monkeypatch):
    """A run that dies in its second of 3 steps, resumed from last.ckpt with the same config, runs the 2 steps that
    remained and ends with the weights and Adam moments of a run that went through (one batch of all 8 questions
    per epoch and no dropout, so no random state enters the comparison)."""
    from rag_lightning.models.module import RagModule

    steps, die_at = [], []
    step = RagModule.training_step

    def counted(self, *args):
        if self.global_step in die_at:
            raise RuntimeError("killed")
        steps.append(self.global_step)
        return step(self, *args)

    monkeypatch.setattr(RagModule, "training_step", counted)
    common = ("loader.global_batch_size=8", "model.freeze_question_encoder=true", "test=false", "export=false",
              "trainer.max_epochs=3")
    train(tiny_train_config(tmp_path / "a", *common))
    assert steps == [0, 1, 2]
    steps.clear()
    die_at.append(1)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_train_config(tmp_path / "b", *common))
    die_at.clear()
    train(tiny_train_config(tmp_path / "b", *common, "ckpt_path=last"))
    assert steps == [0, 1, 2]  # step 0, the crash, then only the 2 steps that remained
    whole, resumed = (
        torch.load(tmp_path / run / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for run in ("a", "b")
    )
    assert resumed["global_step"] == whole["global_step"] == 3
    for name, tensor in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    moments = list(zip(whole["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()))
    assert moments
    for w, r in moments:
        assert int(w["step"]) == int(r["step"]) == 3
        torch.testing.assert_close(r["exp_avg"], w["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(r["exp_avg_sq"], w["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, tiny_train_config):
    from rag_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="run_dir=<that run's directory>"):
        train(tiny_train_config(tmp_path, "ckpt_path=last"))


def test_answer_swapping_copy_head_and_retrieval_loss_train(tmp_path, tiny_train_config):
    cfg = tiny_train_config(
        tmp_path, "debug=fast_dev_run", "model.answer_swap_prob=1.0", "model.generator.copy=true",
        "model.retrieval_loss_weight=1.0",
    )
    results = train(cfg)
    assert "test/em" in results


def test_main_job_reading_features_train_and_reload(tmp_path, tiny_train_config):
    """The main job's reading features, gold curriculum and top-layer joint training run end to end; the
    export reloads with every head."""
    from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration

    cfg = tiny_train_config(
        tmp_path, "trainer.max_epochs=1", "model.generator.copy=true", "model.generator.copy_continuation=true",
        "model.generator.copy_continuation_bigram=true", "model.generator.question_match=true",
        "model.generator.question_match_unique=true", "model.gold_passage_steps=100",
        "model.question_encoder_warmup_steps=0", "model.question_encoder_trainable_layers=1",
        "model.generator.question_view=true", "model.generator.question_match_distance=4",
    )
    results = train(cfg)
    assert "test/em" in results
    generator = CopyBartForConditionalGeneration.from_pretrained(tmp_path / "run" / "checkpoints" / "hf" / "generator")
    assert generator.copy_continue is not None and generator.copy_continue_bigram is not None
    assert generator.match_embedding.num_embeddings == 3
    assert generator.match_after.num_embeddings == generator.match_before.num_embeddings == 5
    assert generator.question_view.in_features == generator.config.question_view_dim


@pytest.mark.parametrize("index", ["flat", "bm25"])
def test_the_reader_gets_the_question_vector_of_each_context(tmp_path, tiny_train_config, index):
    """model.generator.question_view: every context row carries its question's retriever vector, detached (the
    retriever learns from doc scores only), also when BM25 retrieves and the encoder only reads."""
    from rag_lightning.pipeline import setup

    cfg = tiny_train_config(tmp_path, f"index={index}", "model.generator.copy=true", "model.generator.question_view=true",
                            "model.question_encoder_warmup_steps=0")
    _, module, datamodule = setup(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.train()
    module.question_encoder.eval()  # no dropout: the vectors compare exactly
    ret = module.retrieve(batch, 2)
    view = ret["question_view"]
    assert view.shape == (2 * len(batch["questions"]), module.generator.config.question_view_dim)
    assert not view.requires_grad
    with torch.no_grad():
        expected = module.question_encoder(
            input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
        ).pooler_output
    assert torch.allclose(view, expected.repeat_interleave(2, dim=0), atol=1e-5)
    loss, _ = module.nll(batch, 2, "token_mean")
    loss.backward()
    assert module.generator.question_view.weight.grad.abs().sum() > 0


def test_predict_answers_with_the_passages_used(tmp_path, capsys, tiny_train_config):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from rag_lightning.conf_path import CONFIG_DIR
    from rag_lightning.pipeline import predict

    train(tiny_train_config(tmp_path, "trainer.max_epochs=1", "test=false", "export=false"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[f"ckpt_path={ckpt}", "question=What is the capital of Hyrule?",
                                            "accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "predict")
    records = predict(cfg)
    assert len(records) == 1 and records[0]["question"] == "What is the capital of Hyrule?"
    assert len(records[0]["passages"]) == 2 and {"id", "title", "text", "p"} <= set(records[0]["passages"][0])
    assert abs(sum(p["p"] for p in records[0]["passages"]) - 1.0) < 1e-3
    assert "Q: What is the capital of Hyrule?" in capsys.readouterr().out
    assert (tmp_path / "predict" / "predictions.jsonl").is_file()


def _normalise(text: str) -> str:
    """SQuAD's answer normalisation, written out again here so the test does not reuse the code it checks."""
    text = "".join(c for c in text.lower() if c.isalnum() or c.isspace())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def test_a_run_that_learns_reports_the_metrics_of_its_predictions(tmp_path, tiny_train_config):
    """Tested on the questions it trained on, a tiny generator reading MiniLM's passages learns to answer some of
    them; metrics.json equals what its predictions and the QA file's gold passages give when counted by hand.
    Two questions name the other passage of their country as gold, so recall is not trivially 1 either."""
    train_file = tmp_path / "data" / "train.jsonl"
    cfg = tiny_train_config(
        tmp_path, "trainer.max_epochs=30", "trainer.check_val_every_n_epoch=30", "model.optim.lr=1e-2",
        "model/question_encoder=minilm", "model.freeze_question_encoder=true", f"data.val_file={train_file}",
        "export=false",
    )
    questions = [json.loads(line) for line in train_file.read_text().splitlines()]
    for q in questions[:2]:
        q["gold_passage_ids"] = [q["gold_passage_ids"][0].replace("c", "d")]  # the river passage
    test_file = tmp_path / "test_gold.jsonl"
    test_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    cfg.data.test_file = str(test_file)
    results = train(cfg)
    gold = {q["id"]: q for q in questions}
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions_test.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(gold)
    em = [float(_normalise(r["prediction"]) in {_normalise(a) for a in gold[r["id"]]["answers"]}) for r in records]
    hits = [[p["id"] in gold[r["id"]]["gold_passage_ids"] for p in r["passages"]] for r in records]
    expected = {
        "test/em": sum(em) / len(em),
        "test/recall@1": sum(h[0] for h in hits) / len(hits),
        "test/recall@2": sum(any(h[:2]) for h in hits) / len(hits),
        "test/mrr": sum(next((1 / (i + 1) for i, h in enumerate(row) if h), 0.0) for row in hits) / len(hits),
    }
    assert expected["test/em"] > 0 and 0 < expected["test/recall@1"] < 1  # it learned; recall is not trivial
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6) == results[key], key
    assert metrics["test/em"] <= metrics["test/f1"] <= 1


def test_runs_saved_with_a_retired_key_still_reload(tmp_path):
    """`model.question_encoder.max_length` was in every saved config until it was retired (read nowhere)."""
    from hydra import compose, initialize_config_dir

    from rag_lightning.conf_path import CONFIG_DIR
    from rag_lightning.pipeline import RESOLVED_CONFIG, run_config, sections

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/x"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["model"]["question_encoder"]["max_length"] = 64
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    OmegaConf.save(OmegaConf.create(saved), tmp_path / RESOLVED_CONFIG)
    reloaded = run_config(tmp_path / "checkpoints" / "last.ckpt", OmegaConf.create({"model": {"n_docs": 3}}))
    assert "max_length" not in reloaded.model.question_encoder and reloaded.model.n_docs == 3
    assert sections(reloaded).model.question_encoder.kind == "minilm"
