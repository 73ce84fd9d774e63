"""Exports that work on their own: from `checkpoints/hf` and the run's index alone, plain transformers, FAISS and
numpy (no rag_lightning import) reproduce the framework's question vectors, top-k passages and answers, following
the model card's own code; `export_rag=true` adds a transformers RAG checkpoint (its losses and answers:
tests/test_rag_checkpoints.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from rag_lightning.pipeline import load_trained, run_config, train

QUESTIONS = [
    "What is the capital of Latveria?",
    "which river flows through Hyrule",
    # longer than max_question_length (64 tokens): the exported tokenizer truncates where training did
    "In which city, " + "after a long and winding description of rivers and hills, " * 8 + "is the parliament?",
]

# what a user of the export runs: the model card's three code blocks (load; retrieve; answer) on the questions
PLAIN = textwrap.dedent(
    """
    import json, re, sys
    card = open("README.md").read()
    load, retrieve, answer = re.findall(r"```python\\n(.*?)```", card, re.S)
    example = 'questions = ["What is the capital of Chad?"]'
    assert example in retrieve
    scope = {"json": json, "sys": sys}
    for code in (load, retrieve.replace(example, "questions = json.loads(sys.argv[1])"), answer):
        exec(code, scope)
    assert not [m for m in sys.modules if m.startswith("rag_lightning")], "the check imported rag_lightning"
    print(json.dumps({"vectors": scope["vectors"].tolist(), "generator": type(scope["generator"]).__name__,
                      "top_ids": scope["top_ids"], "answers": scope["answers"],
                      "generated": scope["generated"].tolist()}))
    """
)


def test_export_alone_reproduces_vectors_passages_and_answers(tmp_path, tiny_train_config) -> None:
    # trained until the generator writes answers (a generator that only ends its answers would prove little)
    results = train(tiny_train_config(tmp_path, "trainer.max_epochs=30", "trainer.check_val_every_n_epoch=30",
                                      "model.optim.lr=1e-2", "export_rag=true"))
    run = tmp_path / "run"
    export = run / "checkpoints" / "hf"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in (export / "question_encoder").iterdir()
    }

    # the framework's vectors: the trained module (the best checkpoint, which was exported) on its own batches
    best = next((run / "checkpoints").glob("step*.ckpt"))
    module, datamodule = load_trained(run_config(best, OmegaConf.create({})), str(best), str(tmp_path / "eval"))
    batch = next(iter(datamodule.predict_loader(QUESTIONS)))
    assert batch["question_input_ids"].shape[1] == 64  # the long question was truncated
    with torch.no_grad():
        ours = module.encode_questions(batch)
        top_ids = module.retrieve(batch, module.cfg.eval_docs)["passage_ids"]
        first = module.retrieve(batch, 1)  # RAG over the first passage alone
        answers, generated = module.answer(batch, first), module.generate(batch, first).tolist()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(QUESTIONS)], cwd=export, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["generator"] == "BartForConditionalGeneration"
    torch.testing.assert_close(torch.tensor(plain["vectors"]), ours, atol=1e-5, rtol=0)
    assert plain["top_ids"] == top_ids and len(top_ids[0]) == 2
    assert plain["generated"] == generated
    assert plain["answers"] == answers and any(answers)

    # the model card: what it was trained on, the run's metrics, how to load it
    card = (export / "README.md").read_text()
    assert "rag-token model trained with rag_lightning" in card
    assert str(tmp_path / "data" / "train.jsonl") in card and str(tmp_path / "data" / "corpus.jsonl") in card
    row = re.search(r"^\| test \| (.*) \|$", card, re.M).group(1).split(" | ")
    assert float(row[0]) == pytest.approx(results["test/em"], abs=5e-5)  # em, the first column
    assert "DPRQuestionEncoder" in card and "`BartForConditionalGeneration`" in card

    # export_rag=true: the same models as a transformers RAG checkpoint with its tokenizers
    from transformers import DPRQuestionEncoder, RagTokenForGeneration, RagTokenizer

    rag = RagTokenForGeneration.from_pretrained(export / "rag")
    assert rag.config.n_docs == 2 and "`RagTokenForGeneration`" in card
    plain = DPRQuestionEncoder.from_pretrained(export / "question_encoder").state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in rag.rag.question_encoder.state_dict().items())
    assert RagTokenizer.from_pretrained(str(export / "rag")).question_encoder.model_max_length == 64


def test_model_card_names_the_copy_head(tmp_path) -> None:
    from rag_lightning.config import DataConfig, ModelConfig
    from rag_lightning.export import model_card

    data = DataConfig(name="world", dir="d", corpus_file="c.jsonl", train_file="t.jsonl", val_file=None, test_file=None)
    card = model_card(data=data, model=ModelConfig(), generator_class="CopyBartForConditionalGeneration",
                      metrics={"val/em": 0.5, "test/em": 0.25, "test/recall@3": 0.75}, overrides=["model.n_docs=3"],
                      run_dir=tmp_path, steps=10, max_question_length=64)
    assert "rag_lightning.models.copy_generator import CopyBartForConditionalGeneration" in card
    assert "`rag-train model.n_docs=3`" in card and "| val | 0.5000 | – |" in card and "| test | 0.2500 | 0.7500 |" in card
