"""Context-encoder training with index refresh (model.train_context_encoder): the doc scores are q · the
trained context encoder's vectors of the retrieved passages, with its gradient; a refresh re-encodes the corpus
into an index equal to a fresh rag-index of the same weights, swapped in atomically; rag-train refreshes,
resumes with the refreshed index, and 2 DDP ranks encoding their shares give the single-process index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_lightning.config import ConfigError, IndexConfig, ModelConfig, check_context_training, section
from rag_lightning.pipeline import setup
from rag_lightning.retrieval.faiss_index import MANIFEST_FILE, PassageIndex
from rag_lightning.retrieval.refresh import CURRENT, current_index, refresh


@pytest.fixture
def context_module(tmp_path, tiny_train_config):
    """(sections, module training its context encoder, one training batch): tiny models on the tiny world."""
    torch.manual_seed(0)
    s, module, datamodule = setup(tiny_train_config(tmp_path, "model.train_context_encoder=true"))
    return s, module, next(iter(datamodule.train_dataloader()))


def _perturb(encoder: torch.nn.Module, seed: int = 1) -> None:
    """Move the weights away from those the starting index was built with."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _encode_by_hand(encoder: torch.nn.Module, store, rows: list[int]) -> torch.Tensor:
    """Passage vectors straight from the store's token ids, one passage at a time (no padding)."""
    out = []
    for r in rows:
        ids = torch.tensor(np.asarray(store.ctx_tokens(r)), dtype=torch.int64)[None]
        out.append(encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output[0])
    return torch.stack(out)


def test_doc_scores_are_q_dot_the_context_encoders_passages_and_carry_its_gradient(context_module) -> None:
    _, module, batch = context_module
    module.eval()  # no dropout: the hand computation compares exactly
    _perturb(module.context_encoder)
    ret = module.retrieve(batch, module.cfg.n_docs)
    q = module.question_encoder(
        input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
    ).pooler_output
    rows = ret["rows"]
    passages = _encode_by_hand(module.context_encoder, module.retriever.store, rows.reshape(-1).tolist())
    expected = (q[:, None, :] * passages.reshape(*rows.shape, -1)).sum(-1)
    torch.testing.assert_close(ret["doc_scores"], expected, rtol=1e-5, atol=1e-5)
    # ... and not the index's stale vectors of the starting weights
    stale = (q[:, None, :] * module.retriever.vectors(rows)).sum(-1)
    assert (ret["doc_scores"] - stale).abs().max() > 1e-3
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    grads = {n: p.grad for n, p in module.context_encoder.named_parameters()}
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert any("embeddings" in n for n in nonzero) and any("layer.1." in n for n in nonzero), sorted(nonzero)[:5]
    # the optimizer trains it, at the question encoder's rate
    optimized = {id(p) for group in _optimizer_groups(module) for p in group["params"]}
    assert all(id(p) in optimized for p in module.context_encoder.parameters())


def _optimizer_groups(module) -> list[dict]:
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    try:
        return module.configure_optimizers()["optimizer"].param_groups
    finally:
        module._trainer = None


def test_off_by_default_the_doc_scores_use_the_index_vectors(tmp_path, tiny_train_config) -> None:
    _, module, datamodule = setup(tiny_train_config(tmp_path))
    assert module.context_encoder is None and not any(k.startswith("context_encoder.") for k in module.state_dict())
    module.eval()
    batch = next(iter(datamodule.train_dataloader()))
    ret = module.retrieve(batch, module.cfg.n_docs)
    torch.testing.assert_close(ret["doc_scores"], (ret["question_vectors"][:, None] * module.retriever.vectors(ret["rows"])).sum(-1))


def test_the_context_encoder_waits_for_the_question_encoders_warm_up(tmp_path, tiny_train_config) -> None:
    _, module, datamodule = setup(tiny_train_config(tmp_path, "model.train_context_encoder=true",
                                                    "model.question_encoder_warmup_steps=5"))
    module.eval()
    batch = next(iter(datamodule.train_dataloader()))
    module.training_step(batch, 0).backward()
    assert all(p.grad is None for p in module.context_encoder.parameters())


def _fresh_rag_index(cli, tmp_path: Path, data_overrides: list[str], encoder) -> tuple[np.ndarray, dict]:
    """`rag-index` with `encoder` saved by save_pretrained (model/question_encoder=path): vectors, manifest."""
    from transformers import BertTokenizerFast

    from rag_lightning.models.encoders import minilm_dir

    export = tmp_path / "export"
    tokenizer = BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)
    for side in ("context_encoder", "question_encoder"):  # rag-index encodes with the context side only
        encoder.save_pretrained(export / side)
        tokenizer.save_pretrained(export / side)
    result = cli(
        "rag-index", *data_overrides, f"paths.cache_dir={tmp_path / 'fresh'}", "index.progress=false",
        "model/question_encoder=path", f"model.question_encoder.question_name_or_path={export / 'question_encoder'}",
        f"model.question_encoder.context_name_or_path={export / 'context_encoder'}",
        "model.question_encoder.ctx_max_length=64",
    )
    assert result.code == 0, result.output[-3000:]
    (index_dir,) = (tmp_path / "fresh" / "indexes").iterdir()
    return np.load(index_dir / "vectors.npy"), json.loads((index_dir / MANIFEST_FILE).read_text())


def test_a_refreshed_index_equals_a_fresh_rag_index_of_the_same_weights(
    context_module, cli, tmp_path, tiny_overrides
) -> None:
    s, module, batch = context_module
    _perturb(module.context_encoder)
    module.train()  # a refresh encodes without dropout whatever the mode, and restores it
    done = refresh(module.retriever, module.context_encoder, tmp_path / "run_index", s.index, step=3)
    assert module.context_encoder.training
    assert current_index(tmp_path / "run_index") == done.directory and done.directory.name.startswith("step0000003-")
    assert module.retriever.index.manifest["encoder_fingerprint"] == done.fingerprint
    refreshed = np.load(done.directory / "vectors.npy")
    data = [o for o in tiny_overrides(tmp_path) if o.startswith("data")]  # the tiny world the module reads
    fresh, manifest = _fresh_rag_index(cli, tmp_path, data, module.context_encoder)
    assert manifest["encoder_fingerprint"] == done.fingerprint  # the same weights, identified the same way
    assert refreshed.shape == fresh.shape and np.abs(refreshed - fresh).max() <= 1e-5
    # the retriever searches the new vectors: its top-3 is the brute-force top-3 over them
    q = torch.from_numpy(refreshed[[3, 7]] + 0.5)
    found = module.retriever.retrieve(q, 3)
    brute = (q.numpy() @ refreshed.T).argsort(axis=1)[:, ::-1][:, :3]
    assert found.rows.tolist() == brute.tolist()


def test_a_failed_refresh_leaves_the_old_index_in_place_and_in_use(context_module, tmp_path, monkeypatch) -> None:
    s, module, batch = context_module
    root = tmp_path / "run_index"
    first = refresh(module.retriever, module.context_encoder, root, s.index, step=1)
    _perturb(module.context_encoder)

    def save_half_then_fail(self, directory, manifest):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "vectors.npy").write_bytes(b"\x93NUMPY half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PassageIndex, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        refresh(module.retriever, module.context_encoder, root, s.index, step=2)
    monkeypatch.undo()
    assert (root / CURRENT).read_text().strip() == first.directory.name
    assert sorted(p.name for p in root.iterdir()) == sorted([CURRENT, first.directory.name])  # nothing half-written
    PassageIndex.check(first.directory, expect={"encoder_fingerprint": first.fingerprint}, verify_checksum=True)
    assert module.retriever.index.manifest["encoder_fingerprint"] == first.fingerprint
    module.eval()
    ret = module.retrieve(batch, module.cfg.n_docs)  # still searching the old index
    assert ret["rows"].shape == (4, module.cfg.n_docs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"index_refresh_every_n_steps": 2}, "needs model.train_context_encoder=true"),
        ({"train_context_encoder": True, "mode": "closed_book"}, "needs retrieval: mode=closed_book"),
        ({"train_context_encoder": True, "freeze_question_encoder": True}, "freeze_question_encoder=true freezes it"),
        ({"index_refresh_every_n_steps": -1}, "index_refresh_every_n_steps=-1 must be >= 0"),
    ],
)
def test_impossible_combinations_are_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        section(ModelConfig, overrides, "model")


def test_bm25_with_a_trained_context_encoder_is_a_config_error(tmp_path, tiny_train_config) -> None:
    with pytest.raises(ConfigError, match="index=bm25 scores passages without one"):
        check_context_training(ModelConfig(train_context_encoder=True), IndexConfig(type="bm25"))
    with pytest.raises(ConfigError, match="index=bm25"):
        setup(tiny_train_config(tmp_path, "model.train_context_encoder=true", "index=bm25"))


# ------------------------------------------------------------------------------------------ rag-train
def test_rag_train_refreshes_every_n_steps_and_resumes_with_the_refreshed_index(
    tmp_path: Path, tiny_overrides, cli, eval_config
) -> None:
    from transformers import DPRContextEncoder

    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models.encoders import _tiny_config, encoder_fingerprint
    from rag_lightning.pipeline import evaluate

    run = tmp_path / "run"
    args = [*tiny_overrides(tmp_path), "model.train_context_encoder=true", "model.index_refresh_every_n_steps=1",
            f"run_dir={run}", "+trainer.enable_progress_bar=false",
            "model.optim.scheduler=constant"]  # a linear decay to 0 at the first run's end would stall the resumed steps
    first = cli("rag-train", *args)
    assert first.code == 0, first.output[-4000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # 8 questions, batch 4, 1 epoch
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("IndexRefresh")]
    assert state["refreshes"] == 2 and state["last_step"] == 2
    logged = [json.loads(json.dumps(r)) for r in _csv_rows(run)]
    assert [r["index/refreshes"] for r in logged if r.get("index/refreshes")] == ["1.0", "2.0"]
    directory = current_index(run / "index")
    assert directory is not None and directory.name.startswith("step0000002-")
    # the index in use holds the checkpoint's context encoder's vectors
    encoder = DPRContextEncoder(_tiny_config(QuestionEncoderConfig(kind="tiny")))
    encoder.load_state_dict({k.removeprefix("context_encoder."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("context_encoder.")})
    fingerprint = encoder_fingerprint(encoder)
    assert state["in_use"] == fingerprint
    assert json.loads((directory / MANIFEST_FILE).read_text())["encoder_fingerprint"] == fingerprint
    assert (run / "checkpoints" / "hf" / "context_encoder" / "model.safetensors").is_file()

    resumed = cli("rag-train", *args, "ckpt_path=last", "trainer.max_epochs=2")
    assert resumed.code == 0, resumed.output[-4000:]
    assert f"resumed with the refreshed index {directory}" in resumed.output
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("IndexRefresh")]
    assert ckpt["global_step"] == 4 and state["refreshes"] == 4
    assert current_index(run / "index").name.startswith("step0000004-")
    assert len([p for p in (run / "index").iterdir() if p.is_dir()]) == 1  # older indexes removed
    # the test of the best checkpoint (step 2, other weights than the last refresh) searched an index of its own
    best = next((run / "checkpoints").glob("step*.ckpt"))
    assert "step000002" in best.name and current_index(run / "index_test").name.startswith("step0000004-")

    # rag-eval of the last checkpoint searches the run's index of its weights (nothing re-encoded)
    evaluate(eval_config(run / "checkpoints" / "last.ckpt", tmp_path / "eval"))
    assert not (tmp_path / "eval" / "index").exists()
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()

    # the index the checkpoint searched is gone: the resumed run re-encodes the corpus with its weights first
    import shutil

    shutil.rmtree(run / "index")
    again = cli("rag-train", *args, "ckpt_path=last", "trainer.max_epochs=3", "test=false")
    assert again.code == 0, again.output[-4000:]
    assert "the index refreshed at step 4 is gone" in again.output
    assert "index re-encoded for the resumed checkpoint at step 4" in again.output  # not counted as a refresh
    assert current_index(run / "index").name.startswith("step0000006-")


def _csv_rows(run: Path) -> list[dict]:
    import csv

    (path,) = (run / "csv").rglob("metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ 2 gloo processes
def _refresh_worker(rank: int, init_file: str, store_dir: str, index_dir: str, root: str, queries: torch.Tensor) -> None:
    import torch.distributed as dist

    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models.encoders import build_context_encoder
    from rag_lightning.retrieval.distributed import DistributedSearch, LazyPassageIndex
    from rag_lightning.retrieval.retriever import Retriever
    from rag_lightning.retrieval.store import CorpusStore

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = IndexConfig(type="flat", num_threads=1)
        index = LazyPassageIndex.open(index_dir, expect={}, cfg=cfg)
        retriever = Retriever(index, CorpusStore.open(store_dir), max_context_length=64,
                              searcher=DistributedSearch(index, "sharded", cfg))
        encoder = build_context_encoder(QuestionEncoderConfig(kind="tiny"))
        _perturb(encoder)
        done = refresh(retriever, encoder, root, cfg, step=5)
        found = retriever.retrieve(queries[rank::2], 3)  # a sharded search of the new index: a collective
        torch.save({"fingerprint": done.fingerprint, "rows": found.rows, "in_use": retriever.index.manifest["encoder_fingerprint"]},
                   Path(root).parent / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_encode_their_shares_into_the_single_process_index(context_module, tmp_path) -> None:
    import torch.multiprocessing as mp

    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models.encoders import build_context_encoder

    s, module, _ = context_module
    queries = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    ddp_root = tmp_path / "ddp" / "index"
    mp.spawn(_refresh_worker, args=(str(tmp_path / "init"), s.index.store_dir, s.index.dir, str(ddp_root), queries),
             nprocs=2, join=True)
    encoder = build_context_encoder(QuestionEncoderConfig(kind="tiny"))
    _perturb(encoder)
    single = refresh(module.retriever, encoder, tmp_path / "single" / "index", s.index, step=5)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] == single.fingerprint
    assert all(r["in_use"] == single.fingerprint for r in ranks)  # both ranks swapped in the new index
    ddp_dir = current_index(ddp_root)
    assert ddp_dir is not None and ddp_dir.name == single.directory.name
    ddp_vectors, single_vectors = np.load(ddp_dir / "vectors.npy"), np.load(single.directory / "vectors.npy")
    assert ddp_vectors.shape == single_vectors.shape and np.abs(ddp_vectors - single_vectors).max() <= 1e-5
    for rank in range(2):
        assert ranks[rank]["rows"].tolist() == module.retriever.retrieve(queries[rank::2], 3).rows.tolist()


@pytest.mark.slow  # 35 s in CI; covered faster by test_two_ranks_encode_their_shares_into_the_single_process_index (DDP shares)
# and test_rag_train_refreshes_every_n_steps_and_resumes_with_the_refreshed_index (the refresh in training)
def test_ddp_cpu_training_refreshes_the_index_the_single_process_way(
    tmp_path: Path, rag_train, tiny_overrides, tiny_train_config
) -> None:
    """rag-train trainer=ddp_cpu (2 gloo processes): each refresh is encoded in two shares and gathered; the run's
    last index equals a single-process refresh with the last checkpoint's context encoder."""
    run = tmp_path / "run"
    rag_train(tmp_path, *tiny_overrides(tmp_path), "trainer=ddp_cpu", "model.train_context_encoder=true",
              "model.index_refresh_every_n_steps=1", "model.optim.scheduler=constant", "logger=csv", "test=false",
              f"run_dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("IndexRefresh")]
    assert ckpt["global_step"] == 2 and state["refreshes"] == 2  # 8 questions, 2 per rank x 2 ranks
    s, module, _ = setup(tiny_train_config(tmp_path, "model.train_context_encoder=true"))
    module.load_state_dict(ckpt["state_dict"])
    single = refresh(module.retriever, module.context_encoder, tmp_path / "single", s.index, step=2)
    ddp_dir = current_index(run / "index")
    assert ddp_dir is not None and ddp_dir.name == single.directory.name  # same step, same weights' fingerprint
    ddp_vectors, single_vectors = np.load(ddp_dir / "vectors.npy"), np.load(single.directory / "vectors.npy")
    assert np.abs(ddp_vectors - single_vectors).max() <= 1e-5
