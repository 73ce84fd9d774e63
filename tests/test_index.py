"""FAISS index (exactness, recall, persistence, manifest guards) and resumable passage encoding."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from rag_lightning.config import IndexConfig, QuestionEncoderConfig, section
from rag_lightning.models.encoders import build_context_encoder
from rag_lightning.retrieval.encode import encode_passages
from rag_lightning.retrieval.faiss_index import (
    INDEX_FILE,
    MANIFEST_FILE,
    IndexCorruptError,
    IndexMismatchError,
    IndexMissingError,
    PassageIndex,
)
from rag_lightning.retrieval.store import CorpusStore

N, D = 4000, 64
# one faiss thread: OpenMP's spinning threads crawl on a small shared machine, and the sets are tiny
CONFIGS = {
    "flat": IndexConfig(type="flat", num_threads=1),
    "hnsw": IndexConfig(type="hnsw", num_threads=1, M=16, ef_construction=40, ef_search=64),
    "ivfpq": IndexConfig(type="ivfpq", num_threads=1, nlist=32, m=32, nbits=6, nprobe=8, rerank=4),
}
MANIFEST = {"encoder_name": "test", "encoder_fingerprint": "f" * 64, "corpus_hash": "c" * 64}


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around fixed random centres (``seed`` draws the points): neighbourhoods like real
    passage embeddings have, with many near-ties inside a cluster."""
    centres = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(N, D, 50, seed=0), clustered(100, D, 50, seed=1)


@pytest.fixture(scope="module")
def flat(data: tuple[np.ndarray, np.ndarray]) -> PassageIndex:
    return PassageIndex.build(data[0], CONFIGS["flat"])


def test_flat_equals_brute_force_topk(flat: PassageIndex, data: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = data
    scores, rows = flat.search(queries, 10)
    ref_scores, ref_rows = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(vectors).T, 10, dim=1)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == (100, 10)
    assert np.array_equal(rows, ref_rows.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall_at_10(kind: str, flat: PassageIndex, data: tuple[np.ndarray, np.ndarray]) -> None:
    vectors, queries = data
    index = PassageIndex.build(vectors, CONFIGS[kind])
    _, truth = flat.search(queries, 10)
    _, rows = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert recall >= 0.95, f"{kind} recall@10 = {recall:.3f}"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_round_trip(kind: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    vectors, queries = data
    index = PassageIndex.build(vectors, CONFIGS[kind])
    before = index.search(queries, 5)
    manifest = index.save(tmp_path, MANIFEST)
    assert manifest["faiss_version"] == faiss.__version__ and manifest["passages"] == N
    loaded = PassageIndex.load(tmp_path, expect=MANIFEST)
    after = loaded.search(queries, 5)
    assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
    assert isinstance(loaded.vectors, np.memmap) and np.array_equal(loaded.vectors, vectors)


def test_mismatch_says_what_differs_and_how_to_rebuild(flat: PassageIndex, tmp_path: Path) -> None:
    flat.save(tmp_path, MANIFEST)
    expect = {**MANIFEST, "corpus_hash": "d" * 64, "index_type": "flat"}
    with pytest.raises(IndexMismatchError) as err:
        PassageIndex.load(tmp_path, expect=expect, rebuild_command="rag-index data=world")
    message = str(err.value)
    assert "corpus_hash: built with 'ccc" in message and "now 'ddd" in message
    assert "rag-index data=world" in message and "encoder_fingerprint" not in message
    with pytest.raises(IndexMissingError, match="no FAISS index"):
        PassageIndex.load(tmp_path / "elsewhere", expect=MANIFEST)


def test_truncated_or_corrupt_files_get_clear_errors(flat: PassageIndex, tmp_path: Path) -> None:
    flat.save(tmp_path, MANIFEST)
    path = tmp_path / INDEX_FILE
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IndexCorruptError, match="truncated or corrupt"):
        PassageIndex.load(tmp_path, expect=MANIFEST)
    path.write_bytes(bytes(64) + good[64:])  # same size, header wiped
    with pytest.raises(IndexCorruptError, match="sha256"):
        PassageIndex.load(tmp_path, expect=MANIFEST)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    from rag_lightning.files import sampled_sha256, sha256_file

    manifest["index_sha256"] = sha256_file(path)  # damaged file whose checksum was recorded: faiss must fail
    manifest["index_sampled_sha256"] = sampled_sha256(path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="faiss cannot read"):
        PassageIndex.load(tmp_path, expect=MANIFEST)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IndexCorruptError, match="unreadable"):
        PassageIndex.load(tmp_path, expect=MANIFEST)


def test_search_argument_errors(flat: PassageIndex) -> None:
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        flat.search(np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k=5000"):
        flat.search(np.zeros((2, D), np.float32), 5000)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the message on machines without faiss GPUs")
def test_gpu_request_without_gpu_faiss_is_explained(data: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(RuntimeError, match=r"index.device=gpu needs faiss built with GPU support"):
        PassageIndex.build(data[0][:300], IndexConfig(type="flat", device="gpu"))


# ------------------------------------------------------------------------------------ encoding
@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, synthetic_passages, make_gen_tokenizer, ctx_tokenizer
) -> CorpusStore:
    tmp = tmp_path_factory.mktemp("enc")
    return CorpusStore.build(
        synthetic_passages(50), make_gen_tokenizer(tmp / "tok"), ctx_tokenizer(), tmp / "s"
    )


TINY = section(QuestionEncoderConfig, {"kind": "tiny", "tiny": {"hidden_size": 32, "layers": 2, "heads": 2}}, "encoder")


def test_interrupted_encode_resumes_to_the_same_vectors(store: CorpusStore, tmp_path: Path) -> None:
    encoder = build_context_encoder(TINY)
    whole = np.array(
        encode_passages(encoder, store, tmp_path / "a", batch_size=8, shard_size=12, progress=False)
    )

    class Killed(Exception):
        pass

    def kill_after_two(shard: int) -> None:
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        encode_passages(
            encoder, store, tmp_path / "b", batch_size=8, shard_size=12, on_shard_done=kill_after_two
        )
    assert sorted(p.name for p in (tmp_path / "b" / "shards").glob("*.npy")) == [
        "shard_00000.npy",
        "shard_00001.npy",
    ]
    resumed_shards: list[int] = []
    resumed = encode_passages(
        encoder, store, tmp_path / "b", batch_size=8, shard_size=12, on_shard_done=resumed_shards.append
    )
    assert resumed_shards == [2, 3, 4]
    assert isinstance(resumed, np.memmap) and resumed.shape == (50, 32) and resumed.dtype == np.float32
    assert np.array_equal(np.asarray(resumed), whole)
    assert not (tmp_path / "b" / "shards").exists()


def test_encoded_vectors_match_one_by_one_encoding(store: CorpusStore, tmp_path: Path) -> None:
    encoder = build_context_encoder(TINY)
    vectors = encode_passages(encoder, store, tmp_path, batch_size=16, shard_size=100, progress=False)
    with torch.no_grad():
        for row in (0, 7, 33):
            ids = torch.from_numpy(store.ctx_tokens(row).astype(np.int64))[None]
            single = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output[0].numpy()
            np.testing.assert_allclose(vectors[row], single, atol=1e-5)


def test_changed_encoder_starts_over(store: CorpusStore, tmp_path: Path) -> None:
    a = encode_passages(
        build_context_encoder(TINY), store, tmp_path, batch_size=16, shard_size=20, progress=False
    )
    other = build_context_encoder(replace(TINY, tiny=replace(TINY.tiny, seed=1)))
    b = encode_passages(other, store, tmp_path, batch_size=16, shard_size=20, progress=False)
    assert not np.allclose(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ ensure_index
def compose_index_cfg(tmp: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from rag_lightning.conf_path import CONFIG_DIR

    base = [
        "data=jsonl",
        f"data.corpus_file={tmp / 'corpus.jsonl'}",
        f"data.train_file={tmp / 'train.jsonl'}",
        "data.val_file=null",
        "data.test_file=null",
        f"data.generator_tokenizer={tmp / 'tok'}",
        "model/question_encoder=tiny",
        f"paths.cache_dir={tmp / 'cache'}",
        "index.progress=false",
        "index.num_threads=1",
        "index.shard_size=16",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="index", overrides=[*base, *overrides])


def index_spec(tmp: Path, *overrides: str):
    """What rag-index builds for the composed config: the retrieval spec and the generator's tokenizer."""
    from rag_lightning.config import ContextConfig, DataConfig
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer
    from rag_lightning.pipeline import rebuild_command
    from rag_lightning.retrieval.build import RetrievalSpec

    cfg = compose_index_cfg(tmp, *overrides)
    data = section(DataConfig, cfg.data, "data")
    spec = RetrievalSpec(
        data,
        section(QuestionEncoderConfig, cfg.model.question_encoder, "model.question_encoder"),
        section(IndexConfig, cfg.index, "index"),
        ContextConfig(),
        cfg.paths.cache_dir,
        rebuild_command(cfg),
    )
    return spec, load_generator_tokenizer(data.generator_tokenizer)


def built_dirs(tmp: Path, *overrides: str) -> tuple[Path, Path]:
    from rag_lightning.retrieval.build import ensure_index

    store, index_dir, _ = ensure_index(*index_spec(tmp, *overrides))
    return Path(store.dir), Path(index_dir)


@pytest.fixture()
def user_data(tmp_path: Path, synthetic_passages, make_gen_tokenizer) -> Path:
    lines = [json.dumps({"id": p.id, "title": p.title, "text": p.text}) for p in synthetic_passages(40)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"question": "Where is Paris?", "answers": ["France"]}) + "\n"
    )
    make_gen_tokenizer(tmp_path / "tok")
    return tmp_path


def test_ensure_index_builds_then_reuses_and_rebuilds_only_what_changed(user_data: Path) -> None:
    from rag_lightning.retrieval.build import open_retriever

    store_dir, index_dir = built_dirs(user_data)
    assert store_dir == user_data / "cache" / "stores" / "jsonl-tiny-ctx64"
    assert index_dir == user_data / "cache" / "indexes" / "jsonl-tiny-flat"
    store_stamp = (store_dir / "manifest.json").stat().st_mtime_ns
    index_stamp = (index_dir / INDEX_FILE).stat().st_mtime_ns

    assert built_dirs(user_data) == (store_dir, index_dir)  # reused: nothing rewritten
    assert (store_dir / "manifest.json").stat().st_mtime_ns == store_stamp
    assert (index_dir / INDEX_FILE).stat().st_mtime_ns == index_stamp

    _, hnsw_dir = built_dirs(user_data, "index=hnsw")  # same vectors, linked not copied
    vectors = user_data / "cache" / "vectors" / "jsonl-tiny" / "vectors.npy"
    assert (Path(hnsw_dir) / "vectors.npy").stat().st_ino == vectors.stat().st_ino

    built_dirs(user_data, "model.question_encoder.tiny.seed=1")  # new encoder weights
    assert (store_dir / "manifest.json").stat().st_mtime_ns == store_stamp
    assert (index_dir / INDEX_FILE).stat().st_mtime_ns != index_stamp

    with open(user_data / "corpus.jsonl", "a") as f:  # the corpus grows: store and index follow
        f.write(json.dumps({"id": "new", "title": "New", "text": "A new passage."}) + "\n")
    retriever = open_retriever(*index_spec(user_data))
    assert len(retriever) == 41 and len(retriever.index) == 41
    assert retriever.passages([40])[0].id == "new" and retriever.rows_of(["new", "nope"]) == [40, None]
    found = retriever.retrieve(torch.randn(2, 32), 3)
    assert found.rows.shape == (2, 3)


def test_another_passage_length_encodes_the_corpus_again(user_data: Path) -> None:
    """The vectors directory is shared by every passage length (its name does not carry it): vectors of the
    corpus cut to 64 tokens must not be reused for the corpus cut to 12."""
    from rag_lightning.retrieval.build import ensure_index
    from rag_lightning.retrieval.encode import encode_rows

    built_dirs(user_data)
    vectors = user_data / "cache" / "vectors" / "jsonl-tiny" / "vectors.npy"
    before = np.load(vectors)
    spec, gen_tok = index_spec(user_data, "model.question_encoder.ctx_max_length=12")
    store, _, expect = ensure_index(spec, gen_tok)
    assert store.manifest["ctx_max_length"] == 12 and expect["ctx_max_length"] == 12
    after = np.load(vectors)
    fresh = encode_rows(build_context_encoder(spec.encoder), store, 0, len(store))
    np.testing.assert_allclose(after, fresh, atol=1e-6)
    assert np.abs(after - before).max() > 1e-3


# each key the store is built from, changed alone, with the store's directory pinned (the default directory
# name carries ctx_max_length, so only a pinned one shows that the manifest itself decides)
STORE_KEYS = [
    ("model.question_encoder.ctx_max_length=12", "ctx_max_length", 12),
    ("index.title_separator=' | '", "title_separator", " | "),
    ("index.gen_max_passage_tokens=6", "gen_max_passage_tokens", 6),
]


@pytest.mark.parametrize(("override", "key", "value"), STORE_KEYS, ids=[k for _, k, _ in STORE_KEYS])
def test_the_store_is_rebuilt_when_one_of_its_keys_changes(user_data: Path, override: str, key: str, value) -> None:
    from rag_lightning.models.encoders import load_encoder_tokenizer
    from rag_lightning.retrieval.build import ensure_store

    pinned = f"index.store_dir={user_data / 'store'}"
    spec, gen_tok = index_spec(user_data, pinned)
    ctx_tok = load_encoder_tokenizer(spec.encoder, "context")
    store = ensure_store(spec, gen_tok, ctx_tok)
    assert store.manifest[key] != value
    before_gen = [store.gen_tokens(r).tolist() for r in range(len(store))]
    before_ctx = [store.ctx_tokens(r).tolist() for r in range(len(store))]
    titles_texts = [(store.title(r), store.text(r)) for r in range(len(store))]
    stamp = (user_data / "store" / "manifest.json").stat().st_mtime_ns
    assert ensure_store(spec, gen_tok, ctx_tok).manifest == store.manifest  # same keys: reused as it is
    assert (user_data / "store" / "manifest.json").stat().st_mtime_ns == stamp

    spec, _ = index_spec(user_data, pinned, override)
    store = ensure_store(spec, gen_tok, ctx_tok)
    assert store.manifest[key] == value
    assert Path(store.dir) == user_data / "store"
    gen = [store.gen_tokens(r).tolist() for r in range(len(store))]
    ctx = [store.ctx_tokens(r).tolist() for r in range(len(store))]
    if key == "ctx_max_length":  # the context encoder's input truncated to the new length
        assert max(len(ids) for ids in before_ctx) > value
        for (title, text), ids in zip(titles_texts, ctx):
            args = (title, text) if title else (text,)
            assert ids == ctx_tok(*args, truncation="longest_first", max_length=value)["input_ids"]
        assert gen == before_gen
    elif key == "gen_max_passage_tokens":  # the generator's passage cut to the new length
        assert max(len(ids) for ids in before_gen) > value
        assert gen == [ids[:value] for ids in before_gen]
        assert ctx == before_ctx
    else:  # the generator reads "title | text"
        for (title, text), ids in zip(titles_texts, gen):
            joined = f" {title} | {text}" if title else f" {text}"
            assert ids == gen_tok(joined, add_special_tokens=False)["input_ids"]
        assert gen != before_gen and ctx == before_ctx
        assert store.title_separator == " | "


def test_mismatched_index_message_names_the_rebuild_command(user_data: Path) -> None:
    spec, _ = index_spec(user_data)
    _, index_dir = built_dirs(user_data)
    with pytest.raises(
        IndexMismatchError, match=r"encoder_fingerprint.*\n.*Rebuild it with: rag-index data=jsonl index=flat"
    ):
        PassageIndex.load(index_dir, expect={"encoder_fingerprint": "x"}, rebuild_command=spec.rebuild_command)


def test_rerank_in_small_chunks_gives_the_same_results(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rag_lightning.retrieval.faiss_index as fi

    index = PassageIndex.build(data[0], CONFIGS["ivfpq"])
    whole = index.search(data[1], 10)
    monkeypatch.setattr(fi, "RERANK_BYTES", 3 * 40 * D * 4)  # 3 queries per chunk, 100 queries
    chunked = index.search(data[1], 10)
    assert np.array_equal(whole[1], chunked[1]) and np.array_equal(whole[0], chunked[0])
    exact = np.einsum("bd,bkd->bk", data[1], data[0][chunked[1]])
    np.testing.assert_allclose(chunked[0], exact, rtol=0, atol=1e-6)  # re-ranked scores are exact


def test_concurrent_ensure_index_calls_build_once_and_agree(user_data: Path) -> None:
    """Parallel sweep jobs / DDP ranks share the cache: the lock lets one build while the other waits."""
    from concurrent.futures import ThreadPoolExecutor

    from rag_lightning.retrieval.build import ensure_index

    spec, tok = index_spec(user_data)
    with ThreadPoolExecutor(2) as pool:
        results = [(Path(s.dir), d) for s, d, _ in pool.map(lambda _: ensure_index(spec, tok), range(2))]
    assert results[0] == results[1]
    assert PassageIndex.load(results[0][1], expect={}).search(np.zeros((1, 32), np.float32), 3)[1].shape == (
        1,
        3,
    )
