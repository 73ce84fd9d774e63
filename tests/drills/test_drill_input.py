"""Drills on bad input to the console scripts: each a message naming the key or file and a fix (exit 2), a
warning and a result where the input can be used, never a traceback, a hang or a silent wrong answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def error_line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("error: ")]
    return line


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc' must be an integer"),
        ("trainer.val_check_interval=often", "trainer.val_check_interval='often' must be a number"),
        ("model.optim.lr=nan", "model.optim.lr=nan must be a finite number > 0"),
        ("model.optim.lr=inf", "model.optim.lr=inf must be a finite number > 0"),
        ("context.max_length=1", "context.max_length=1 must be"),
        ("context.layout=foo", "context.layout='foo' is not one of"),
    ],
)
def test_a_bad_value_names_its_key(cli, tmp_path, tiny_overrides, override, named):
    run = cli("rag-train", *tiny_overrides(tmp_path), override, f"hydra.run.dir={tmp_path / 'run'}")
    assert run.code == 2 and "Traceback" not in run.output, run.output[-3000:]
    assert named in error_line(run.err)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_a_5_mb_word_in_a_train_file_does_not_stall_rag_prepare(tmp_path, tiny_world, script):
    """Tokenizer training grew much faster than linearly in a word's length (300 KB: 92 s; 5 MB: hours); words
    are now cut to 100 characters for training, with a warning that counts them."""
    train = Path(tiny_world["train"])
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["question"] = "What is " + "x" * 5_000_000 + "?"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = Path(tiny_world["corpus"]).parent
    done = script(tmp_path, "rag-prepare", "data=jsonl", f"data.dir={data}", f"data.corpus_file={tiny_world['corpus']}",
                  f"data.train_file={train}", "data.val_file=null", "data.test_file=null",
                  "data.tokenizer.vocab_size=300", timeout=120)
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "1 word(s) longer than 100 characters (the longest 5000001)" in done.output
    vocab = json.loads((data / "generator_tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert max(len(token) for token in vocab) <= 100


def test_rag_predict_refuses_an_empty_question_and_cuts_a_long_one_with_a_warning(drill_world, script, tmp_path):
    ckpt = f"ckpt_path={drill_world.run / 'checkpoints' / 'last.ckpt'}"
    empty = script(drill_world.root, "rag-predict", ckpt, "accelerator=cpu", 'question=""',
                   f"hydra.run.dir={tmp_path / 'p1'}")
    assert empty.code == 2 and "no question to answer" in error_line(empty.err), empty.output[-3000:]
    long = " ".join(["capital"] * 5000) + "?"
    done = script(drill_world.root, "rag-predict", ckpt, "accelerator=cpu", f"question={long}",
                  f"hydra.run.dir={tmp_path / 'p2'}")
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "1 question(s) longer than max_question_length=64 tokens were cut to it" in done.output
    assert len((tmp_path / "p2" / "predictions.jsonl").read_text().splitlines()) == 1


def test_the_bad_row_hint_of_rag_eval_works_as_printed(drill_world, script, tmp_path):
    """The message said `set data.skip_bad_rows=true`, which rag-eval's config refused."""
    bad = tmp_path / "questions.jsonl"
    good = {"question": "What is the capital of Florin?", "answers": ["Guilder"]}
    bad.write_text(json.dumps({"question": "What?", "answers": "Guilder"}) + "\n" + json.dumps(good) + "\n")
    args = [f"ckpt_path={drill_world.run / 'checkpoints' / 'last.ckpt'}", "accelerator=cpu", f"data.test_file={bad}"]
    refused = script(drill_world.root, "rag-eval", *args, f"hydra.run.dir={tmp_path / 'e1'}")
    assert refused.code == 2 and f"{bad}:1:" in error_line(refused.err), refused.output[-3000:]
    hint = error_line(refused.err).split("or set ")[1].split(" ")[0]
    assert hint == "data.skip_bad_rows=true"
    done = script(drill_world.root, "rag-eval", *args, hint, f"hydra.run.dir={tmp_path / 'e2'}")
    assert done.code == 0, done.output[-3000:]
    assert "skipped 1 bad rows, kept 1" in done.output
    assert len((tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()) == 1


def test_wandb_online_without_an_account_goes_on_offline_with_a_warning(drill_world, script, tmp_path):
    """`logger.wandb.offline=false` with no API key stopped with wandb's UsageError (or waited ~100 s for the
    network); the run now logs offline and says how to sync it."""
    out = tmp_path / "run"
    done = script(drill_world.root, "rag-train", *drill_world.overrides, "logger=wandb", "logger.wandb.offline=false",
                  "trainer.max_steps=1", "test=false", "export=false", f"hydra.run.dir={out}",
                  env={"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")},
                  drop=("WANDB_MODE", "WANDB_API_KEY", "NETRC"), timeout=240)
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "logger.wandb.offline=false but no wandb API key" in done.output and "wandb sync" in done.output
    assert list((out / "wandb").glob("offline-run-*"))
