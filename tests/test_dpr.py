"""The DPR stage: its loss against a hand computation, the batches, DPR's biencoder JSON files, and
`rag-train-retriever` as a user runs it (export, resume, bad input, encoders used by rag-index)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rag_lightning.data.readers import DataError, read_qa
from rag_lightning.models.dpr import corpus_dpr_loss, dpr_loss, hardest_negatives, rank_metrics


# ------------------------------------------------------------------------------------------ the math
def test_dpr_loss_equals_a_hand_computation() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # columns: q0's positive, q1's positive, a hard negative (of q0)
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # scores q0: [1, 0, 1] -> -log(e / (e + 1 + e)); q1: [0, 2, 1] -> -log(e^2 / (1 + e^2 + e))
    by_hand = ((math.log(2 * math.e + 1) - 1) + (math.log(1 + math.e + math.e**2) - 2)) / 2
    loss = dpr_loss(q, p, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # the gradient flows into both encoders' vectors
    q.requires_grad_(True)
    p.requires_grad_(True)
    dpr_loss(q, p, torch.tensor([0, 1])).backward()
    # d loss / d q0 = (softmax(s0) @ p - p[0]) / 2
    soft = torch.softmax(torch.tensor([1.0, 0.0, 1.0]), dim=0)
    torch.testing.assert_close(q.grad[0], (soft @ p.detach() - p.detach()[0]) / 2)
    assert p.grad.abs().sum() > 0


def test_the_corpus_softmax_equals_a_hand_computation_and_never_counts_a_gold_passage_as_negative() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
    # q0: positive row 0, row 3 is its other gold passage (left out): scores [1, 0, 1] over rows 0, 1, 2
    # q1: positive row 1 against all four rows: scores [0, 2, 1, 0]
    by_hand = ((math.log(2 * math.e + 1) - 1) + (math.log(2 + math.e**2 + math.e) - 2)) / 2
    loss = corpus_dpr_loss(q, corpus, torch.tensor([0, 1]), [[3], []])
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # with nothing left out, row 3 (score 2 for q0) is a negative like any other
    with_gold = corpus_dpr_loss(q, corpus, torch.tensor([0, 1]))
    assert with_gold.item() == pytest.approx(((math.log(2 * math.e + 1 + math.e**2) - 1) +
                                               (math.log(2 + math.e**2 + math.e) - 2)) / 2, rel=1e-6)
    # only the questions get a gradient: the corpus vectors are fixed
    q.requires_grad_(True)
    corpus_dpr_loss(q, corpus, torch.tensor([0, 1]), [[3], []]).backward()
    soft = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.0]), dim=0)
    torch.testing.assert_close(q.grad[1], (soft @ corpus - corpus[1]) / 2)


def test_hardest_negatives_skip_the_positive_and_every_other_gold_row() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # q0: positive row 0, row 1 another gold row; q1: positive row 4
    rows = hardest_negatives(scores, torch.tensor([0, 4]), [[1], []], 2)
    assert rows.tolist() == [[2, 3], [3, 2]]
    assert hardest_negatives(scores, torch.tensor([0, 4]), [[1], []], 0).shape == (2, 0)
    assert scores[0, 0] == 5.0  # the caller's scores are left as they were


def test_rank_metrics_count_the_best_positive_against_every_passage() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.9, 0.3], [0.1, 0.2, 0.3, 0.4]])
    # q0: row 0 first (rank 1); q1: best positive row 1 behind row 2 (rank 2); q2: positive row 0 last (rank 4)
    out = rank_metrics(scores, [[0], [1, 3], [0]], ks=[1, 3])
    assert out == pytest.approx({"recall@1": 1 / 3, "recall@3": 2 / 3, "mrr": (1 + 1 / 2 + 1 / 4) / 3})


def test_a_training_batch_holds_each_passage_once_and_points_at_each_positive(
    tmp_path: Path, make_gen_tokenizer, ctx_tokenizer, synthetic_passages
) -> None:
    from rag_lightning.retrieval.dpr_data import TrainCollator, TrainItem
    from rag_lightning.retrieval.store import CorpusStore

    store = CorpusStore.build(synthetic_passages(10), make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer(),
                              tmp_path / "store")
    items = [TrainItem([101, 7, 102], 3, [5, 6], [9]), TrainItem([101, 102], 5, [3, 8])]  # shared rows 3 and 5
    batch = TrainCollator(store, 0, 0)(items)
    assert batch["passage_rows"].tolist() == [3, 5, 6, 8]
    assert batch["positive"].tolist() == [0, 1]
    assert batch["positive_rows"].tolist() == [3, 5] and batch["other_positive_rows"] == [[9], []]
    for column, row in enumerate(batch["passage_rows"].tolist()):
        n = int(batch["passage_attention_mask"][column].sum())
        assert batch["passage_input_ids"][column, :n].tolist() == store.ctx_tokens(row).tolist()
    assert batch["question_input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    # a fixed context encoder encodes nothing in the step: the passages' tokens stay out of its batches
    fixed = TrainCollator(store, 0, 0, passage_tokens=False)(items)
    assert "passage_input_ids" not in fixed and fixed["passage_rows"].tolist() == [3, 5, 6, 8]


# ------------------------------------------------------------------------------------------ DPR's JSON files
DPR_EXAMPLE = {
    "question": "What is the capital of Aland?",
    "answers": ["Mariehamn"],
    "positive_ctxs": [{"title": "Aland", "text": "...", "passage_id": "c0"}],
    "negative_ctxs": [{"title": "x", "text": "y", "passage_id": 17}],
    "hard_negative_ctxs": [{"title": "Aland river", "text": "...", "psg_id": "d0"}],
}


def test_dpr_biencoder_files_read_with_gold_and_hard_negative_ids(tmp_path: Path) -> None:
    path = tmp_path / "biencoder-train.json"
    path.write_text(json.dumps([DPR_EXAMPLE, {**DPR_EXAMPLE, "question": "Q2?", "hard_negative_ctxs": []}], indent=2))
    rows = read_qa(path)
    assert [r.question for r in rows] == ["What is the capital of Aland?", "Q2?"]
    assert rows[0].gold_passage_ids == ("c0",) and rows[0].hard_negative_ids == ("d0",)
    assert rows[1].hard_negative_ids == () and rows[1].id == "biencoder-train-1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"positive_ctxs": None}, "missing field 'positive_ctxs'"),
        ({"positive_ctxs": "c0"}, "'positive_ctxs' must be a list of passage objects, got str"),
        ({"positive_ctxs": [{"title": "t", "text": "x"}]}, "'positive_ctxs[0]' has no 'passage_id'"),
        ({"hard_negative_ctxs": [3]}, "'hard_negative_ctxs[0]' must be an object"),
        ({"answers": "Mariehamn"}, "'answers' must be a list of strings, got a single string"),
        ({"question": 7}, "field 'question' must be a string, got int"),
    ],
)
def test_malformed_dpr_examples_fail_with_file_and_line(tmp_path: Path, change: dict, reason: str) -> None:
    bad = {k: v for k, v in {**DPR_EXAMPLE, **change}.items() if v is not None}
    path = tmp_path / "biencoder-dev.json"
    path.write_text(json.dumps([DPR_EXAMPLE, bad], indent=2))
    line = 1 + json.dumps([DPR_EXAMPLE, bad], indent=2).split("\n").index("  {", 2)  # where the 2nd object starts
    with pytest.raises(DataError) as err:
        read_qa(path)
    assert err.value.line == line and reason in str(err.value) and f"{path}:{line}:" in str(err.value)
    assert len(read_qa(path, skip_bad_rows=True)) == 1


def test_broken_dpr_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "biencoder.json"
    path.write_text('[\n  {"question": "q?", "answers": ["a"], "positive_ctxs": []},\n  {"question": \n]\n')
    with pytest.raises(DataError, match=r"biencoder\.json:4: malformed JSON"):
        read_qa(path)
    path.write_text('{"question": "q?"}\n')
    with pytest.raises(DataError, match=r"biencoder\.json:1: expected a JSON array"):
        read_qa(path)


# ------------------------------------------------------------------------------------------ the command
def retriever_overrides(root: Path, world: dict[str, str], *extra: str) -> list[str]:
    return [
        "data=jsonl",
        f"data.dir={root / 'data'}",
        f"data.corpus_file={world['corpus']}",
        f"data.train_file={world['train']}",
        f"data.val_file={world['val']}",
        f"data.test_file={world['test']}",
        "data.tokenizer.vocab_size=300",
        f"paths.cache_dir={root / 'cache'}",
        "model/question_encoder=tiny",
        "index.progress=false",
        "dpr.batch_size=2",
        "dpr.warmup_steps=0",
        "dpr.lr=1e-3",
        "dpr.eval_batch_size=8",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        *extra,
    ]


def test_rag_train_retriever_trains_measures_exports_and_resumes(tmp_path: Path, tiny_world, cli) -> None:
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    run_dir = tmp_path / "run"
    args = retriever_overrides(tmp_path, tiny_world, f"run_dir={run_dir}", "dpr.validate_first=true")
    result = cli("rag-train-retriever", *args)
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2 and metrics["mining/examples"] == 8 and metrics["mining/gold_positives"] == 8
    assert metrics["val/passages"] == 24 and metrics["val/kept"] == 4
    for prefix in ("start/", "val/"):
        assert 0.0 <= metrics[f"{prefix}recall@1"] <= metrics[f"{prefix}recall@3"] <= metrics[f"{prefix}recall@20"] == 1.0
    assert "recall@1" in result.out and "model/question_encoder=path" in result.out
    export = run_dir / "encoders"
    question = DPRQuestionEncoder.from_pretrained(export / "question_encoder")
    context = DPRContextEncoder.from_pretrained(export / "context_encoder")
    assert (export / "context_encoder" / "tokenizer.json").is_file()
    manifest = json.loads((export / "dpr_export.json").read_text())
    assert manifest["steps"] == 2 and manifest["metrics"]["val/mrr"] == metrics["val/mrr"]
    # separate weights, and both moved away from the shared tiny start
    assert not torch.equal(question.question_encoder.bert_model.embeddings.word_embeddings.weight,
                           context.ctx_encoder.bert_model.embeddings.word_embeddings.weight)
    assert not list(tmp_path.rglob(".encoders.tmp-*"))

    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # written at the end, not only every 100 steps
    resumed = cli("rag-train-retriever", *args, "ckpt_path=last", "trainer.max_steps=4", "dpr.validate_first=false")
    assert resumed.code == 0, resumed.output[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 4


def test_exported_encoders_serve_rag_index_and_an_index_of_another_encoder_is_refused(
    tmp_path: Path, tiny_world, cli
) -> None:
    from transformers import DPRQuestionEncoder

    from rag_lightning.config import IndexConfig, QuestionEncoderConfig
    from rag_lightning.models.encoders import build_context_encoder, encoder_fingerprint
    from rag_lightning.retrieval.faiss_index import IndexMismatchError, PassageIndex

    run_dir = tmp_path / "run"
    assert cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, f"run_dir={run_dir}",
                                                            "dpr.shared_encoder=true")).code == 0
    export = run_dir / "encoders"
    path_encoder = [
        "model/question_encoder=path",
        f"model.question_encoder.question_name_or_path={export / 'question_encoder'}",
        f"model.question_encoder.context_name_or_path={export / 'context_encoder'}",
        "model.question_encoder.ctx_max_length=64",
    ]
    data = retriever_overrides(tmp_path, tiny_world)[:8]
    built = cli("rag-index", *data, *path_encoder, "index.progress=false")
    assert built.code == 0, built.output[-3000:]
    # the index is named after the encoders' path (resolvers._encoder_tag): one per trained retriever
    [index_dir] = (tmp_path / "cache" / "indexes").glob("jsonl-path-????????-flat")
    manifest = json.loads((index_dir / "index_manifest.json").read_text())
    trained = build_context_encoder(QuestionEncoderConfig(kind="path", question_name_or_path=str(export / "question_encoder"),
                                                          context_name_or_path=str(export / "context_encoder")))
    assert manifest["encoder_fingerprint"] == encoder_fingerprint(trained)
    # shared weights: the exported context encoder is the question encoder's BERT
    q = DPRQuestionEncoder.from_pretrained(export / "question_encoder")
    for (name, a), (_, b) in zip(q.question_encoder.state_dict().items(), trained.ctx_encoder.state_dict().items()):
        assert torch.equal(a, b), name
    # a run whose context encoder is another one (the untrained tiny) refuses this index
    other = encoder_fingerprint(build_context_encoder(QuestionEncoderConfig(kind="tiny")))
    expect = {k: manifest[k] for k in ("corpus_hash", "passages", "index_type")} | {"encoder_fingerprint": other}
    with pytest.raises(IndexMismatchError, match="encoder_fingerprint"):
        PassageIndex.load(index_dir, expect=expect, cfg=IndexConfig(type="flat"))


def test_a_qa_set_without_any_positive_stops_naming_the_file(tmp_path: Path, tiny_world, cli) -> None:
    train = Path(tiny_world["train"]).with_name("nowhere.jsonl")
    train.write_text("".join(json.dumps({"question": f"Where is Zembla {i}?", "answers": ["Nowhere land"]}) + "\n"
                             for i in range(3)))
    result = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, f"data.train_file={train}",
                                                             f"run_dir={tmp_path / 'run'}"))
    assert result.code == 2
    assert f"{train}: none of its 3 questions has a positive passage" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "run").exists()


def test_bad_dpr_options_name_their_key(tmp_path: Path, tiny_world, cli) -> None:
    result = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, "dpr.negatives=random"))
    assert result.code == 2 and "dpr.negatives='random' is not one of bm25, dense, mixed" in result.err
    result = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, "index=flat"))
    assert result.code == 2 and "run it with index=bm25" in result.err


def test_a_fixed_context_encoder_trains_questions_against_the_cached_passage_vectors(
    tmp_path: Path, tiny_world, cli
) -> None:
    from transformers import DPRContextEncoder

    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models.encoders import build_context_encoder, encoder_fingerprint

    run_dir = tmp_path / "run"
    result = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, f"run_dir={run_dir}",
                                                             "dpr.train_context_encoder=false"))
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2 and 0.0 <= metrics["val/recall@1"] <= 1.0
    assert "val/corpus_encode_s" not in metrics  # nothing re-encoded at validation
    # the passage vectors came from (and stay in) the vectors cache the dense index of this encoder uses
    assert (tmp_path / "cache" / "vectors" / "jsonl-tiny" / "vectors.npy").is_file()
    exported = DPRContextEncoder.from_pretrained(run_dir / "encoders" / "context_encoder")
    assert encoder_fingerprint(exported) == encoder_fingerprint(build_context_encoder(QuestionEncoderConfig(kind="tiny")))
    bad = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, "dpr.train_context_encoder=false",
                                                          "dpr.shared_encoder=true"))
    assert bad.code == 2 and "dpr.shared_encoder=true trains the one encoder for passages too" in bad.err


def test_corpus_negatives_train_the_question_encoder_against_every_passage(
    tmp_path: Path, tiny_world, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_lightning.models import dpr

    scored: list[tuple[int, int]] = []  # (questions, passages) of each training step's softmax

    def spy(q, corpus, positive_rows, other_positive_rows=()):
        scored.append((q.shape[0], corpus.shape[0]))
        assert q.requires_grad and not corpus.requires_grad
        return corpus_dpr_loss(q, corpus, positive_rows, other_positive_rows)

    monkeypatch.setattr(dpr, "corpus_dpr_loss", spy)
    run_dir = tmp_path / "run"
    result = cli("rag-train-retriever", *retriever_overrides(
        tmp_path, tiny_world, f"run_dir={run_dir}", "dpr.train_context_encoder=false", "dpr.corpus_negatives=true",
        "dpr.hard_negatives=0"))
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2 and 0.0 <= metrics["val/recall@1"] <= 1.0
    assert scored == [(2, metrics["val/passages"])] * 2  # both steps: 2 questions against all 24 passages
    # one encoder for both sides would make the bank of passage vectors stale at every step
    bad = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, "dpr.corpus_negatives=true",
                                                          "dpr.shared_encoder=true"))
    assert bad.code == 2 and "set dpr.shared_encoder=false" in bad.err and "Traceback" not in bad.err


def test_corpus_negatives_train_the_context_encoders_top_layer_against_a_refreshed_bank(
    tmp_path: Path, tiny_world, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import DPRContextEncoder

    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models import dpr
    from rag_lightning.models.encoders import build_context_encoder

    scored: list[tuple[int, int, bool]] = []  # (questions, passages, gradient into the passages) per step
    refreshes: list[int] = []

    def spy(q, corpus, positive_rows, other_positive_rows=()):
        scored.append((q.shape[0], corpus.shape[0], corpus.requires_grad))
        return corpus_dpr_loss(q, corpus, positive_rows, other_positive_rows)

    refresh = dpr.DPRModule.refresh_bank

    def counted(module):
        refreshes.append(module.global_step)
        refresh(module)

    monkeypatch.setattr(dpr, "corpus_dpr_loss", spy)
    monkeypatch.setattr(dpr.DPRModule, "refresh_bank", counted)
    run_dir = tmp_path / "run"
    args = retriever_overrides(tmp_path, tiny_world, f"run_dir={run_dir}", "dpr.corpus_negatives=true",
                               "dpr.bank.refresh_steps=2", "dpr.bank.fresh_negatives=2", "trainer.max_steps=3")
    result = cli("rag-train-retriever", *args)
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 3 and metrics["val/passages"] == 24 and 0.0 <= metrics["val/recall@1"] <= 1.0
    assert metrics["time/bank_states_s"] >= 0 and metrics["time/bank_refresh_s"] >= 0
    assert "val/corpus_encode_s" not in metrics  # validation ranks against the refreshed bank
    assert scored == [(2, 24, True)] * 3  # every passage in each softmax, the fresh ones with gradient
    assert refreshes == [2, 3]  # after step 2 (refresh_steps), then at validation
    # only the context encoder's top layer moved (dpr.bank.layers=1); the tiny encoder has 2
    start = build_context_encoder(QuestionEncoderConfig(kind="tiny")).ctx_encoder.bert_model.state_dict()
    trained = DPRContextEncoder.from_pretrained(run_dir / "encoders" / "context_encoder").ctx_encoder.bert_model
    moved = {name.split(".")[2] for name, w in trained.state_dict().items() if not torch.equal(w, start[name])}
    assert moved == {"1"}, moved
    # resumed: the bank rebuilt from the restored weights before the first step
    refreshes.clear()
    resumed = cli("rag-train-retriever", *args, "ckpt_path=last", "trainer.max_steps=5")
    assert resumed.code == 0, resumed.output[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 5
    assert refreshes[0] == 3
    bad = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, "dpr.corpus_negatives=true",
                                                          "dpr.bank.layers=3"))
    assert bad.code == 2 and "dpr.bank.layers=3: the context encoder has 2 layers" in bad.err


# in_batch is slow-marked: the bank run covers launching the stage's ranks, and the 2-process gloo test below
# covers the gathered in-batch loss and its gradients
@pytest.mark.parametrize("mode", [
    pytest.param([], id="in_batch", marks=pytest.mark.slow),
    pytest.param(["dpr.corpus_negatives=true", "dpr.bank.refresh_steps=2"], id="bank"),
])
def test_rag_train_retriever_trains_under_two_process_ddp(tmp_path: Path, tiny_world, cli_subprocess, mode) -> None:
    """`trainer=ddp_cpu`: rank 1 re-runs this stage (not rag-train's), the ranks train together, rank 0 exports."""
    from transformers import DPRContextEncoder

    run_dir = tmp_path / "run"
    result = cli_subprocess("rag-train-retriever", *retriever_overrides(
        tmp_path, tiny_world, f"run_dir={run_dir}", "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=3",
        "logger=csv", *mode))
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 3
    assert "val/recall@1" not in metrics  # the whole-corpus validation runs in one process only (a warning says so)
    rank1 = (run_dir / "train_retriever_ddp_rank1.log").read_text()  # rank 1 ran this stage and trained
    assert "mined 8 train examples" in rank1 and "GLOBAL_RANK: 1" in rank1
    DPRContextEncoder.from_pretrained(run_dir / "encoders" / "context_encoder")


def test_ddp_children_run_the_stage_of_their_root_config() -> None:
    from rag_lightning.ddp import stage_of

    assert stage_of("train_retriever") == ("rag_lightning.train_retriever", "rag-train-retriever")
    assert stage_of("train") == stage_of(None) == ("rag_lightning.train", "rag-train")


@pytest.mark.parametrize("negatives", ["dense", "mixed"])
def test_dense_and_mixed_hard_negatives_train(tmp_path: Path, tiny_world, cli, negatives: str) -> None:
    run_dir = tmp_path / "run"
    result = cli("rag-train-retriever", *retriever_overrides(tmp_path, tiny_world, f"run_dir={run_dir}",
                                                             f"dpr.negatives={negatives}", "dpr.hard_negatives=2"))
    assert result.code == 0, result.output[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2 and metrics["mining/short_negatives"] == 0


# ------------------------------------------------------------------------------------------ 2 gloo processes
def _gather_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from rag_lightning.models.dpr import gathered_dpr_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        q, p, positive = _rank_batch(rank)
        q.requires_grad_(True)
        p.requires_grad_(True)
        loss = gathered_dpr_loss(q, p, positive)
        loss.backward()
        torch.save({"loss": loss.detach(), "q_grad": q.grad, "p_grad": p.grad}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank 0: 2 questions, 3 passages; rank 1: 2 questions, 4 passages (unequal counts, as dedup makes them)."""
    generator = torch.Generator().manual_seed(10 + rank)
    q = torch.randn(2, 5, generator=generator)
    p = torch.randn(3 + rank, 5, generator=generator)
    return q, p, torch.tensor([0, 2]) if rank == 0 else torch.tensor([1, 3])


def test_two_ranks_gathered_loss_and_gradients_equal_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (q0, p0, pos0), (q1, p1, pos1) = _rank_batch(0), _rank_batch(1)
    q = torch.cat([q0, q1]).requires_grad_(True)
    p = torch.cat([p0, p1]).requires_grad_(True)
    single = dpr_loss(q, p, torch.cat([pos0, pos1 + len(p0)]))
    single.backward()
    # DDP averages over the 2 ranks: the mean of the rank losses, and of the rank gradients
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single.detach())
    torch.testing.assert_close(torch.cat([ranks[0]["q_grad"], ranks[1]["q_grad"]]) / 2, q.grad)
    torch.testing.assert_close(torch.cat([ranks[0]["p_grad"], ranks[1]["p_grad"]]) / 2, p.grad)


def test_an_interrupted_export_keeps_the_previous_encoders(tmp_path: Path) -> None:
    from rag_lightning.dpr_stage import export_atomically

    class Breaks:
        def export_encoders(self, directory: Path, tokenizer: object) -> None:
            (Path(directory) / "question_encoder").mkdir(parents=True)
            (Path(directory) / "question_encoder" / "model.safetensors").write_bytes(b"half")
            raise OSError("disk full")

    class Works:
        def export_encoders(self, directory: Path, tokenizer: object) -> None:
            for name in ("question_encoder", "context_encoder"):
                (Path(directory) / name).mkdir(parents=True)
                (Path(directory) / name / "model.safetensors").write_bytes(b"new")

    out = tmp_path / "encoders"
    with pytest.raises(OSError, match="disk full"):
        export_atomically(Breaks(), None, out, {})
    assert not out.exists()
    export_atomically(Works(), None, out, {"steps": 1})
    with pytest.raises(OSError, match="disk full"):
        export_atomically(Breaks(), None, out, {})
    assert (out / "question_encoder" / "model.safetensors").read_bytes() == b"new"
    assert json.loads((out / "dpr_export.json").read_text()) == {"steps": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["encoders"]  # no temporary directory left either
