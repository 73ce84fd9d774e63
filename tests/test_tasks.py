"""Tasks: inputs, targets and scores per task (qa, verification, generation, dialogue); the metrics agree with
the libraries (sacrebleu, torchmetrics) on hand-worked examples; decoding restricted to a label set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rag_lightning import metrics
from rag_lightning.config import ConfigError, GeneratorConfig, Mode, ModelConfig, TaskConfig, section
from rag_lightning.data.datamodule import Collator, encode_examples
from rag_lightning.data.readers import QAExample
from rag_lightning.data.tasks import Task, fit_history


def task(name: str, **kw) -> Task:
    return Task(section(TaskConfig, {"name": name, **kw}, "task"))


# --------------------------------------------------------------------------- metrics vs libraries
def test_bleu_by_hand_and_as_sacrebleu_computes_it() -> None:
    import sacrebleu

    # n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty: BLEU = (0.2) ** (1/4) = 0.66874
    assert metrics.bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx(66.874, abs=1e-3)
    preds = ["the cat sat on the mat", "a dog barks"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], ["the dog barks"]]
    # sacrebleu's multi-reference layout: one stream per reference position (short lists padded with their first)
    expected = sacrebleu.corpus_bleu(preds, [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][0]]]).score
    assert metrics.bleu(preds, refs) == pytest.approx(expected)


def test_rouge_l_by_hand_and_as_torchmetrics_computes_it() -> None:
    from torchmetrics.functional.text.rouge import rouge_score

    # LCS "the cat sat" = 3: precision 3/3, recall 3/6, F = 2/3
    assert metrics.rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # the best reference counts: against "the cat" the LCS is 2, precision 2/3, recall 1, F = 0.8
    assert metrics.rouge_l("the cat sat", ["the cat sat on the mat", "the cat"]) == pytest.approx(0.8)
    refs = ["cats are sitting on mats", "the cat sat"]
    expected = float(rouge_score("the cats sat on a mat", [refs], rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"])
    assert metrics.rouge_l("the cats sat on a mat", refs) == pytest.approx(expected)
    assert metrics.rouge_l("", ["a"]) == 0.0


def test_accuracy_is_the_label_exactly() -> None:
    assert metrics.accuracy(" SUPPORTS", "SUPPORTS") == 1.0
    assert metrics.accuracy("supports", "SUPPORTS") == 0.0  # KILT's accuracy is a strict match


# --------------------------------------------------------------------------- tasks
def test_qa_scores_are_the_em_and_f1_of_before() -> None:
    preds, answers = ["Paris", "the Louvre museum"], [["Paris"], ["Louvre"]]
    scores = Task().scores(preds, answers)
    assert list(scores) == ["em", "f1"] and Task().primary == "em"
    assert scores["em"] == [metrics.exact_match(p, a) for p, a in zip(preds, answers)] == [1.0, 0.0]
    assert scores["f1"] == [metrics.f1_score(p, a) for p, a in zip(preds, answers)]


def test_verification_generation_and_dialogue_metrics() -> None:
    v = task("verification", metrics=["accuracy"], monitor="accuracy")
    assert v.scores(["SUPPORTS", "SUPPORTS"], [["SUPPORTS"], ["REFUTES"]]) == {"accuracy": [1.0, 0.0]}
    assert v.candidates() is None and task("verification", metrics=["accuracy"], monitor="accuracy", constrained_decoding=True).candidates() == [
        "SUPPORTS", "REFUTES"
    ]
    g = task("generation", metrics=["bleu", "rougeL"], monitor="rougeL")
    assert list(g.scores(["a b"], [["a b"]])) == ["rougeL"] and g.needs_corpus_scores
    assert g.corpus_scores(["a b c d e"], [["a b c d f"]]) == {"bleu": pytest.approx(66.874, abs=1e-3)}
    assert task("dialogue", metrics=["f1"], monitor="f1").primary == "f1"


def test_task_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="task.name='summary' is not one of"):
        task("summary")
    with pytest.raises(ConfigError, match="task.metrics='meteor' is not one of"):
        task("qa", metrics=["meteor"])
    with pytest.raises(ConfigError, match="constrained_decoding=true needs task.name=verification"):
        task("qa", constrained_decoding=True)
    with pytest.raises(ConfigError, match=r"task.monitor='em' is not one of task.metrics=\['accuracy'\]"):
        task("verification", metrics=["accuracy"])


def test_kilt_scores_count_a_downstream_point_only_where_r_precision_is_1() -> None:
    t = task("verification", metrics=["accuracy"], monitor="accuracy")
    retrieved = [["100-0", "200-3"], ["300-1", "100-0"], ["100-0"]]
    provenance = [[["100"]], [["100"]], []]  # the third example has no provenance
    out = t.provenance_scores(retrieved, provenance, {"accuracy": [1.0, 1.0, 1.0]}, [1, 2])
    assert out["rprec"] == [1.0, 0.0, None]
    assert out["page_recall@1"] == [1.0, 0.0, None] and out["page_recall@2"] == [1.0, 1.0, None]
    assert out["kilt_accuracy"] == [1.0, 0.0, None]
    assert t.provenance_scores(retrieved, [[], [], []], {"accuracy": [1.0] * 3}, [1]) == {}
    off = task("verification", metrics=["accuracy"], monitor="accuracy", kilt_metrics=False)
    assert off.provenance_scores(retrieved, provenance, {"accuracy": [1.0] * 3}, [1]) == {}


def test_dialogue_history_is_cut_from_the_oldest_turn() -> None:
    turns = ["one two three", "four five", "six"]
    assert fit_history(turns, lambda text: len(text.split()) <= 3) == "four five\nsix"
    assert fit_history(turns, lambda text: True) == "one two three\nfour five\nsix"
    assert fit_history(["a very long newest turn"], lambda text: False) == "a very long newest turn"


def test_dialogue_inputs_fit_both_tokenizers_newest_turn_last(
    tmp_path: Path, make_gen_tokenizer, ctx_tokenizer
) -> None:
    gen, ctx = make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer()
    history = "\n".join(f"turn number {i} says something about Oxygen" for i in range(12)) + "\nWho is it?"
    example = QAExample("d1", history, ("It is Oxygen.",))
    [encoded] = encode_examples([example], ctx, gen, max_question_length=40, max_answer_length=16,
                                task=task("dialogue"))
    kept = encoded.input_text.split("\n")
    assert kept[-1] == "Who is it?" and 1 < len(kept) < 13 and kept[0].startswith("turn number")
    assert len(encoded.question_encoder_ids) <= 40 and len(encoded.question_generator_ids) <= 40
    assert encoded.question_encoder_ids == ctx(encoded.input_text)["input_ids"]  # whole turns, nothing cut
    # the verification target is the label
    [claim] = encode_examples([QAExample("c", "Oxygen is a gas.", ("SUPPORTS",))], ctx, gen, max_question_length=40,
                              max_answer_length=16, task=task("verification", metrics=["accuracy"], monitor="accuracy"))
    assert gen.decode(claim.target_ids, skip_special_tokens=True).strip() == "SUPPORTS"


def test_dialogue_generator_reads_the_newest_turns_the_retriever_the_history(
    tmp_path: Path, make_gen_tokenizer, ctx_tokenizer
) -> None:
    gen, ctx = make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer()
    history = "What is the capital of Peru?\nLima.\nAnd which currency is used in that country?"
    example = QAExample("d1", history, ("Sol",))
    [last] = encode_examples([example], ctx, gen, max_question_length=128, max_answer_length=16,
                             task=task("dialogue", generator_turns=1))  # fmt: skip
    [two] = encode_examples([example], ctx, gen, max_question_length=128, max_answer_length=16,
                            task=task("dialogue", generator_turns=2))  # fmt: skip
    [whole] = encode_examples([example], ctx, gen, max_question_length=128, max_answer_length=16,
                              task=task("dialogue"))  # fmt: skip
    newest = " And which currency is used in that country?"
    assert last.question_generator_ids == gen(newest, add_special_tokens=False)["input_ids"]
    assert two.question_generator_ids == gen(" Lima.\n" + newest[1:], add_special_tokens=False)["input_ids"]
    assert whole.question_generator_ids == gen(" " + history, add_special_tokens=False)["input_ids"]
    # the retriever and the records keep the whole history
    assert last.question_encoder_ids == whole.question_encoder_ids == ctx(history)["input_ids"]
    assert last.input_text == history
    with pytest.raises(ConfigError, match="task.generator_turns=1 needs task.name=dialogue"):
        task("qa", generator_turns=1)
    with pytest.raises(ConfigError, match="task.generator_turns=0 needs"):
        task("dialogue", generator_turns=0)


def test_constrained_decoding_picks_the_label_with_the_lowest_nll(tmp_path: Path, make_gen_tokenizer) -> None:
    from rag_lightning.models.generator import build_generator
    from rag_lightning.models.module import RagModule

    gen_tok = make_gen_tokenizer(tmp_path / "tok")
    gen_cfg = section(GeneratorConfig, {"kind": "random", "tokenizer": str(tmp_path / "tok"), "config": {
        "d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32}}, "g")  # fmt: skip
    torch.manual_seed(0)
    labels = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]
    module = RagModule(
        torch.nn.Linear(2, 2), build_generator(gen_cfg, gen_tok), ModelConfig(mode=Mode.closed_book),
        generator_tokenizer=gen_tok, task=task("verification", metrics=["accuracy"], monitor="accuracy", labels=labels,
                                               constrained_decoding=True),
    ).eval()
    examples = [QAExample(f"c{i}", f"Claim number {i} about Oxygen.", ("SUPPORTS",)) for i in range(4)]
    encoded = encode_examples(examples, _FakeQuestionTokenizer(), gen_tok, max_question_length=32,
                              max_answer_length=16, task=module.task)
    batch = Collator(0, gen_tok.pad_token_id, gen_tok.eos_token_id)(encoded)
    with torch.no_grad():
        chosen = module.answer(batch, None)
        ids = [gen_tok(" " + c, add_special_tokens=False)["input_ids"] + [gen_tok.eos_token_id] for c in labels]
        nll = module.candidate_nll(batch, None, ids)
        # each candidate's NLL is the closed-book loss of that target
        target = torch.tensor(ids[2]).expand(4, -1)
        dec_in = torch.cat([torch.full((4, 1), gen_tok.eos_token_id), target[:, :-1]], dim=1)
        assert torch.allclose(nll[:, 2], module.target_nll(batch, None, target, dec_in, "none", label_smoothing=0.0))
    assert set(chosen) <= set(labels)
    assert chosen == [labels[i] for i in nll.argmin(dim=1).tolist()]


class _FakeQuestionTokenizer:
    """The question encoder's tokenizer is not read in closed-book mode: words as ids."""

    pad_token_id = 0

    def __call__(self, texts, truncation=False, max_length=None):
        texts = [texts] if isinstance(texts, str) else texts
        ids = [[1 + len(w) for w in t.split()][: max_length or None] for t in texts]
        return {"input_ids": ids if len(ids) > 1 or not isinstance(texts, str) else ids[0]}


# --------------------------------------------------------------------------- end to end on the tiny world
def _kilt_claims(countries: list[tuple[int, str, str]], wrong: dict[int, str]) -> list[dict]:
    """Claims on the tiny world in the KILT layout: true ones SUPPORTS, a swapped capital REFUTES."""
    rows = []
    for i, country, capital in countries:
        for label, city in (("SUPPORTS", capital), ("REFUTES", wrong[i])):
            rows.append({"id": f"{label[0]}{i}", "input": f"The capital of {country} is {city}.",
                         "output": [{"answer": label, "provenance": [{"wikipedia_id": f"c{i}", "title": country}]}]})
    return rows


def test_verification_trains_and_tests_on_kilt_files_with_the_kilt_metrics(
    tmp_path: Path, tiny_train_config, write_world, eval_config
) -> None:
    import json

    from rag_lightning.pipeline import evaluate, train

    world = write_world(tmp_path / "data")
    rows = [json.loads(line) for line in Path(world["train"]).read_text().splitlines()]
    rows += [json.loads(line) for line in Path(world["val"]).read_text().splitlines()]
    countries = [(i, r["question"].removeprefix("What is the capital of ").rstrip("?"), r["answers"][0])
                 for i, r in enumerate(rows)]
    wrong = {i: countries[(i + 1) % len(countries)][2] for i, _, _ in countries}
    claims = _kilt_claims(countries, wrong)
    kilt = {}
    for split, part in (("train", claims[:16]), ("val", claims[16:])):
        kilt[split] = tmp_path / f"{split}-kilt.jsonl"
        kilt[split].write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = tiny_train_config(tmp_path, "task=verification", f"data.train_file={kilt['train']}",
                            f"data.val_file={kilt['val']}", f"data.test_file={kilt['val']}", "export=false")
    assert cfg.callbacks.model_checkpoint.monitor == "val/accuracy" and cfg.optimized_metric == "val/accuracy"
    results = train(cfg)
    for key in ("val/accuracy", "test/accuracy", "test/rprec", "test/page_recall@1", "test/kilt_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert "test/em" not in results
    assert results["test/kilt_accuracy"] <= min(results["test/accuracy"], results["test/rprec"]) + 1e-6
    run = tmp_path / "run"
    best = next((run / "checkpoints").glob("step*-accuracy*.ckpt"))
    records = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {"accuracy", "rprec", "kilt_accuracy", "passages"} <= set(records[0])
    assert all(r["prediction"] in ("SUPPORTS", "REFUTES") or r["accuracy"] == 0.0 for r in records)
    # rag-eval on the KILT file: downstream metric, R-precision and the KILT score
    again = evaluate(eval_config(best, tmp_path / "eval"))
    for key in ("test/accuracy", "test/rprec", "test/kilt_accuracy"):
        assert again[key] == pytest.approx(results[key], abs=1e-6), key
    # rag-eval task.constrained_decoding=true: every prediction is a label
    from omegaconf import open_dict

    cfg = eval_config(best, tmp_path / "eval_constrained")
    with open_dict(cfg):
        cfg.task.constrained_decoding = True
    constrained = evaluate(cfg)
    assert constrained["test/rprec"] == pytest.approx(results["test/rprec"], abs=1e-6)  # same passages
    labels = [json.loads(line)["prediction"] for line in
              (tmp_path / "eval_constrained" / "predictions.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and set(labels) <= {"SUPPORTS", "REFUTES"}


def test_extra_train_files_are_mixed_into_training_each_with_its_own_target(
    tmp_path: Path, write_world, make_gen_tokenizer
) -> None:
    """Multi-task training: claims (KILT) and the QA questions (the world's QA layout) in one shuffled train
    split, each example with its own target (a label, an answer); validation reads the claims alone."""
    import json

    from rag_lightning.data.datamodule import RagDataModule

    world = write_world(tmp_path / "data")
    rows = [json.loads(line) for line in Path(world["train"]).read_text().splitlines()]
    countries = [(i, r["question"].removeprefix("What is the capital of ").rstrip("?"), r["answers"][0])
                 for i, r in enumerate(rows)]
    claims = _kilt_claims(countries, {i: countries[(i + 1) % len(countries)][2] for i, _, _ in countries})
    kilt = tmp_path / "claims.jsonl"
    kilt.write_text("".join(json.dumps(r) + "\n" for r in claims))
    gen_tok = make_gen_tokenizer(tmp_path / "tok")
    datamodule = RagDataModule(
        files={"train": str(kilt), "val": str(kilt)}, extra_train_files={"qa": world["train"]},
        question_tokenizer=_FakeQuestionTokenizer(), generator_tokenizer=gen_tok, global_batch_size=4,
        task=task("verification", metrics=["accuracy"], monitor="accuracy"),
    )
    train = datamodule.train_dataset()
    assert len(train) == len(claims) + len(rows) and len(datamodule.dataset("val")) == len(claims)
    targets = {item.example.question: gen_tok.decode(item.target_ids, skip_special_tokens=True).strip()
               for item in train}
    for claim in claims:
        assert targets[claim["input"]] == claim["output"][0]["answer"]
    for row in rows:
        assert targets[row["question"]] == row["answers"][0]
    batches = list(datamodule._loader(train, "train", 4, shuffle=True))
    assert sum(len(b["answers"]) for b in batches) == len(train)


def test_a_missing_extra_train_file_is_named_with_its_key(tmp_path: Path, tiny_train_config) -> None:
    from rag_lightning.data.prepare_data import PrepareError, ensure_prepared
    from rag_lightning.pipeline import sections

    cfg = tiny_train_config(tmp_path, f"+data.extra_train_files.qa={tmp_path / 'nope.jsonl'}")
    with pytest.raises(PrepareError, match=r"data\.extra_train_files\.qa=.*nope\.jsonl: file not found"):
        ensure_prepared(sections(cfg).data)


def test_rag_eval_reads_a_qa_file_in_kilt_layout_without_a_flag(cli, tmp_path: Path, tiny_run) -> None:
    import json

    qa = [json.loads(line) for line in (tiny_run.root / "data" / "test.jsonl").read_text().splitlines()]
    kilt = tmp_path / "nq-dev-kilt.jsonl"
    kilt.write_text("".join(json.dumps({"id": q["id"], "input": q["question"], "output": [
        {"answer": q["answers"][0], "provenance": [{"wikipedia_id": q["gold_passage_ids"][0], "title": "x"}]}]}) + "\n"
        for q in qa))  # fmt: skip
    out = tmp_path / "eval"
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", f"data.test_file={kilt}",
              f"hydra.run.dir={out}")
    assert run.code == 0, run.output[-3000:]
    results = json.loads((out / "metrics.json").read_text())
    for key in ("test/em", "test/f1", "test/rprec", "test/page_recall@1", "test/kilt_em", "test/kilt_f1"):
        assert 0.0 <= results[key] <= 1.0, key
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [q["id"] for q in qa]
    for r, q in zip(records, qa):  # R-precision of one gold page: is the first retrieved passage's page gold?
        assert r["rprec"] == float(r["passages"][0]["id"] == q["gold_passage_ids"][0])
        assert r["kilt_em"] == r["em"] * r["rprec"]
    # a KILT row without gold outputs stops rag-eval with its file and line
    bad = tmp_path / "bad-kilt.jsonl"
    bad.write_text(kilt.read_text().splitlines()[0] + "\n" + json.dumps({"id": "x", "input": "Who?"}) + "\n")
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", f"data.test_file={bad}",
              f"hydra.run.dir={tmp_path / 'eval2'}")
    assert run.code == 2 and f"{bad}:2: missing field 'output'" in run.output and "Traceback" not in run.output


# --------------------------------------------------------------------------- generation tasks (issue 15)
def test_bleu1_by_hand_and_as_sacrebleu_computes_it() -> None:
    from sacrebleu.metrics import BLEU

    # unigrams: the x2, cat, on, mat match, sat does not: 5/6, equal lengths (no brevity penalty) -> 83.333
    assert metrics.bleu1(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(83.333, abs=1e-3)
    # every unigram matches, but 2 words against 4: brevity penalty exp(1 - 4/2) -> 36.788
    assert metrics.bleu1(["a b"], [["a b c d"]]) == pytest.approx(36.788, abs=1e-3)
    preds = ["this country lies in europe", "this city has a population of 100"]
    refs = [["this country's capital is paris", "this country lies in europe ."], ["this city lies in france"]]
    streams = [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][0]]]
    assert metrics.bleu1(preds, refs) == pytest.approx(BLEU(max_ngram_order=1).corpus_score(preds, streams).score)
    assert metrics.bleu1(preds, refs) > metrics.bleu(preds, refs)


def test_generated_facts_are_numbers_and_names() -> None:
    assert metrics.generated_facts("The capital of Chad is N'Djamena.") == ["Chad", "N'Djamena"]
    assert metrics.generated_facts("Christmas Island covers 135 square kilometres; its capital is Flying Fish Cove, "
                                   "its calling code +61.") == ["Christmas Island", "135", "Flying Fish Cove", "61"]
    assert metrics.generated_facts("This city lies in the Europe/Moscow time zone.") == ["Europe", "Moscow"]
    assert metrics.generated_facts("It was discovered in 1898 by Marie Curie.") == ["1898", "Marie Curie"]
    assert metrics.generated_facts("the population is large.") == []


def test_factuality_by_hand() -> None:
    gold = ["The capital of France is Paris. France has a population of 66,078,000."]
    # France is given by the question; 66,078,000 is in the gold passage, Lyon is not: 1 of 2
    assert metrics.factuality("France has 66,078,000 people and its capital is Lyon.", gold,
                              "How many people live in France?") == 0.5  # fmt: skip
    assert metrics.factuality("Its capital is Paris.", gold) == 1.0
    assert metrics.factuality("It has 66 people.", gold) == 0.0  # a number stands whole: 66 is not 66,078,000
    assert metrics.factuality("Its capital is PARÍS.", gold) == 1.0  # case- and accent-insensitive
    assert metrics.factuality("It is large.", gold) is None  # no fact stated: nothing to check
    assert metrics.factuality("France.", gold, "Where is Paris?") == 1.0
    assert metrics.factuality("Paris.", gold, "What is the capital of Paris?") is None  # only the input's name


def test_generation_task_scores_factuality_against_the_gold_passages(tmp_path: Path) -> None:
    import json

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in [
        {"id": "chad-0", "title": "Chad", "text": "The capital of Chad is N'Djamena."},
        {"id": "chad-1", "title": "Chad", "text": "Chad has a population of 14,037,000."},
    ]))  # fmt: skip
    g = Task(section(TaskConfig, {"name": "generation", "metrics": ["rougeL", "bleu1", "factuality"],
                                  "monitor": "rougeL"}, "task"), str(corpus))  # fmt: skip
    preds = ["The capital of Chad is N'Djamena.", "The capital of Chad is Abuja.", "It is big.", "Abuja."]
    scores = g.scores(preds, [["x"]] * 4, inputs=["What is the capital of Chad?"] * 4,
                      gold_passage_ids=[["chad-0"], ["chad-0"], ["chad-0"], []])  # fmt: skip
    assert scores["factuality"] == [1.0, 0.0, None, None]  # no fact / no gold passage: not counted
    assert g.needs_corpus_scores and set(g.corpus_scores(preds, [["x"]] * 4)) == {"bleu1"}
    # the KILT scores leave factuality out (it is not a downstream point)
    kilt = g.provenance_scores([["chad-0"]] * 4, [[["chad"]]] * 4, scores, [1])
    assert "kilt_factuality" not in kilt and kilt["kilt_rougeL"] == scores["rougeL"]
    with pytest.raises(ConfigError, match="no corpus file is known"):
        Task(section(TaskConfig, {"name": "generation", "metrics": ["factuality"], "monitor": "factuality"},
                     "task")).scores(["Paris."], [["x"]], gold_passage_ids=[["p-0"]])  # fmt: skip


def test_generation_trains_and_tests_with_factuality_on_kilt_files(tmp_path: Path, tiny_train_config, write_world) -> None:
    """The module logs factuality over the outputs that state a fact and writes it per record (None left out)."""
    import json

    from rag_lightning.pipeline import train

    world = write_world(tmp_path / "data")
    corpus = tmp_path / "kilt-corpus.jsonl"  # the tiny world's passages with KILT ids: <page>-<paragraph>
    corpus.write_text("".join(json.dumps({**p, "id": f"{p['id']}-0"}) + "\n" for p in
                              map(json.loads, Path(world["corpus"]).read_text().splitlines())))  # fmt: skip
    rows = [json.loads(line) for line in Path(world["train"]).read_text().splitlines()]
    rows += [json.loads(line) for line in Path(world["val"]).read_text().splitlines()]
    kilt = []
    for r in rows:
        country = r["question"].removeprefix("What is the capital of ").rstrip("?")
        kilt.append({"id": r["id"], "input": r["question"], "output": [{
            "answer": f"The capital of {country} is {r['answers'][0]}.",
            "provenance": [{"wikipedia_id": r["gold_passage_ids"][0], "start_paragraph_id": 0}]}]})  # fmt: skip
    files = {}
    for split, part in (("train", kilt[:8]), ("val", kilt[8:])):
        files[split] = tmp_path / f"{split}-kilt.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = tiny_train_config(tmp_path, "task=generation", "task.metrics=[rougeL,bleu1,factuality]",
                            f"data.train_file={files['train']}", f"data.val_file={files['val']}",
                            f"data.test_file={files['val']}", f"data.corpus_file={corpus}", "export=false")  # fmt: skip
    results = train(cfg)
    assert 0.0 <= results["test/rougeL"] <= 1.0 and 0.0 <= results["test/bleu1"] <= 100.0
    records = [json.loads(line) for line in (tmp_path / "run" / "predictions_test.jsonl").read_text().splitlines()]
    with_facts = [r["factuality"] for r in records if "factuality" in r]
    assert all(0.0 <= v <= 1.0 for v in with_facts)
    if with_facts:
        assert results["test/factuality"] == pytest.approx(sum(with_facts) / len(with_facts), abs=1e-5)
    else:
        assert "test/factuality" not in results


def test_same_relation_swaps_need_relations_in_the_train_file(tmp_path: Path, make_gen_tokenizer) -> None:
    """model.answer_swap_donors=relation on a train file whose rows name no relation: an error naming the file,
    the key and the fix, before training starts."""
    import json

    from rag_lightning.data.datamodule import RagDataModule

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"q{i}?", "answers": [f"a{i}"]}) + "\n" for i in range(4)))
    datamodule = RagDataModule(
        files={"train": str(train)}, question_tokenizer=_FakeQuestionTokenizer(),
        generator_tokenizer=make_gen_tokenizer(tmp_path / "tok"), global_batch_size=4, same_relation_swaps=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=rf"answer_swap_donors=relation .* train file {re.escape(str(train))} .*Fix: "):
        datamodule.train_dataloader()
