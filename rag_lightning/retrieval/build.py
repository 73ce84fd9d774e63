"""Make sure the corpus store and the FAISS index for a composed config exist and fit it; build what does not.

Used by ``rag-index`` and by every stage that retrieves (``open_retriever``). Each piece is reused only when
its manifest matches what the config asks for now:

- store (``index.store_dir``): corpus hash, both tokenizers, ``ctx_max_length``, ``gen_max_passage_tokens``,
  ``title_separator``. The corpus file is hashed only when its size or mtime changed since the build.
- vectors (``index.vectors_dir``): context-encoder weights fingerprint and corpus hash (resumable encoding).
- index (``index.dir``): the above plus index type and build parameters. Search-time parameters (``nprobe``,
  ``ef_search``, ``rerank``) never force a rebuild.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rag_lightning.config import ConfigError
from rag_lightning.models.encoders import (
    build_context_encoder,
    encoder_fingerprint,
    encoder_name,
    load_encoder_tokenizer,
)
from rag_lightning.retrieval.encode import encode_passages
from rag_lightning.retrieval.faiss_index import BUILD_DEFAULTS, IndexStateError, PassageIndex
from rag_lightning.retrieval.retriever import Retriever
from rag_lightning.retrieval.store import (
    CorpusStore,
    manifest_differences,
    sha256_file,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)


def _opt(node: Any, key: str, default: Any) -> Any:
    value = node.get(key, default) if node is not None else default
    return default if value is None else value


def rebuild_command(cfg: Any) -> str:
    """The command that rebuilds what this config needs: the current Hydra overrides when there are any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        overrides = [
            f"data={cfg.data.name}",
            f"model/question_encoder={cfg.model.question_encoder.kind}",
            f"index={cfg.index.type}",
        ]
    return " ".join(["rag-index", *overrides])


def corpus_path(data_cfg: Any) -> Path:
    """``data.corpus_file`` as given, else relative to ``data.dir``."""
    path = Path(str(data_cfg.corpus_file))
    if not path.is_absolute() and not path.exists() and data_cfg.get("dir"):
        path = Path(str(data_cfg.dir)) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} (data.corpus_file) does not exist: run `rag-prepare data={data_cfg.name}` "
            "or point data.corpus_file at a JSONL/TSV corpus"
        )
    return path


def _source(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _corpus_hash(path: Path, store_dir: Path) -> str:
    """sha256 of the corpus file, taken from the store's manifest when the file has not changed since."""
    manifest = CorpusStore.read_manifest(store_dir) or {}
    if manifest.get("source") == _source(path):
        return str(manifest["corpus_hash"])
    return sha256_file(path)


def generator_tokenizer(cfg: Any) -> Any:
    """The tokenizer the generator will read contexts with: ``model.generator``'s when the config has one,
    else ``data.generator_tokenizer`` (rag-index composes no generator)."""
    generator_cfg = cfg.get("model", {}).get("generator")
    if generator_cfg is not None:
        from rag_lightning.models.generator import load_generator_tokenizer_for

        return load_generator_tokenizer_for(generator_cfg)
    from rag_lightning.data.gen_tokenizer import load_generator_tokenizer

    return load_generator_tokenizer(cfg.data.generator_tokenizer)


def prepare_data(cfg: Any) -> None:
    """Build the data set when it is ours to build (``rag-prepare``'s work), before reading the corpus."""
    try:
        from rag_lightning.data.prepare_data import ensure_prepared
    except ImportError:  # the data stage is optional: a user's corpus needs no preparation
        return
    ensure_prepared(cfg.data)


def ensure_store(cfg: Any, gen_tokenizer: Any, ctx_tokenizer: Any) -> CorpusStore:
    """The corpus store for ``cfg``, rebuilt from the corpus file when missing or built for other inputs."""
    store_dir = Path(str(cfg.index.store_dir))
    path = corpus_path(cfg.data)
    expect = {
        "corpus_hash": _corpus_hash(path, store_dir),
        "gen_tokenizer": tokenizer_fingerprint(gen_tokenizer),
        "ctx_tokenizer": tokenizer_fingerprint(ctx_tokenizer),
        "ctx_max_length": int(cfg.model.question_encoder.ctx_max_length),
        "gen_max_passage_tokens": int(_opt(cfg.index, "gen_max_passage_tokens", 256)),
        "title_separator": str(_opt(cfg.index, "title_separator", " / ")),
    }
    manifest = CorpusStore.read_manifest(store_dir)
    if manifest is not None:
        differences = manifest_differences(manifest, expect)
        if not differences:
            log.info("corpus store %s is up to date (%d passages)", store_dir, manifest["passages"])
            return CorpusStore.open(store_dir)
        log.info("rebuilding the corpus store %s: %s", store_dir, "; ".join(differences))
    from rag_lightning.data.readers import read_corpus

    start = time.time()
    passages = read_corpus(path, skip_bad_rows=bool(cfg.data.get("skip_bad_rows", False)))
    store = CorpusStore.build(
        passages,
        gen_tokenizer,
        ctx_tokenizer,
        store_dir,
        ctx_max_length=expect["ctx_max_length"],
        gen_max_passage_tokens=expect["gen_max_passage_tokens"],
        title_separator=expect["title_separator"],
        source_hash=expect["corpus_hash"],
        source=_source(path),
    )
    log.info("corpus store: %d passages from %s in %.1fs", len(store), path, time.time() - start)
    return store


def index_expectation(cfg: Any, store: CorpusStore, ctx_encoder: torch.nn.Module) -> dict[str, Any]:
    """What an index must have been built from to serve this config (compared with its manifest)."""
    index_type = str(cfg.index.type)
    if index_type not in BUILD_DEFAULTS:
        raise ConfigError(f"index.type={index_type!r} is not one of {', '.join(BUILD_DEFAULTS)}")
    return {
        "encoder_name": encoder_name(cfg.model.question_encoder, "context"),
        "encoder_fingerprint": encoder_fingerprint(ctx_encoder),
        "ctx_tokenizer": store.manifest["ctx_tokenizer"],
        "ctx_max_length": store.manifest["ctx_max_length"],
        "corpus_hash": store.corpus_hash,
        "passages": len(store),
        "index_type": index_type,
        "build_params": {
            key: int(_opt(cfg.index, key, default)) for key, default in BUILD_DEFAULTS[index_type].items()
        },
    }


def _encode_device(cfg: Any) -> str:
    device = str(_opt(cfg.index, "encode_device", "auto"))
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextmanager
def build_lock(cfg: Any) -> Iterator[None]:
    """One check-or-build at a time per cache directory: parallel sweep jobs and DDP ranks share the store,
    the vectors and the index, and must not write them at the same time (the others then reuse them)."""
    path = Path(str(cfg.paths.cache_dir)) / ".retrieval.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, run builds one at a time
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure(cfg: Any) -> tuple[CorpusStore, Path, dict[str, Any], Any]:
    prepare_data(cfg)
    with build_lock(cfg):
        return _ensure_locked(cfg)


def _ensure_locked(cfg: Any) -> tuple[CorpusStore, Path, dict[str, Any], Any]:
    qe_cfg = cfg.model.question_encoder
    gen_tokenizer = generator_tokenizer(cfg)
    store = ensure_store(cfg, gen_tokenizer, load_encoder_tokenizer(qe_cfg, "context"))
    ctx_encoder = build_context_encoder(qe_cfg)
    expect = index_expectation(cfg, store, ctx_encoder)
    index_dir = Path(str(cfg.index.dir))
    command = rebuild_command(cfg)
    try:
        PassageIndex.check(index_dir, expect=expect, rebuild_command=command)
        log.info("FAISS index %s is up to date", index_dir)
        return store, index_dir, expect, gen_tokenizer
    except IndexStateError as why:
        log.info("building the FAISS index: %s", str(why).splitlines()[0])
    start = time.time()
    vectors = encode_passages(
        ctx_encoder,
        store,
        str(cfg.index.vectors_dir),
        batch_size=int(_opt(cfg.index, "batch_size", 64)),
        shard_size=int(_opt(cfg.index, "shard_size", 50_000)),
        device=_encode_device(cfg),
        progress=bool(_opt(cfg.index, "progress", True)),
    )
    encoded = time.time()
    index = PassageIndex.build(vectors, cfg.index)
    index.save(index_dir, expect)
    log.info(
        "FAISS %s index of %d passages in %s (encode %.1fs, index %.1fs)",
        expect["index_type"],
        len(store),
        index_dir,
        encoded - start,
        time.time() - encoded,
    )
    del ctx_encoder
    return store, index_dir, expect, gen_tokenizer


def ensure_index(cfg: Any) -> tuple[str, str]:
    """(store_dir, index_dir) for the composed config, building the store and the index when needed."""
    store, index_dir, _, _ = _ensure(cfg)
    return str(store.dir), str(index_dir)


def make_retriever(cfg: Any, index: Any, store: CorpusStore, gen_tokenizer: Any) -> Retriever:
    """A Retriever over `index` and `store`; context length and layout from the root config's `context`."""
    context = cfg.get("context")
    return Retriever(
        index,
        store,
        max_context_length=int(_opt(context, "max_length", 128)),
        layout=str(_opt(context, "layout", "question_first")),
        title_separator=store.title_separator,
        bos_id=gen_tokenizer.bos_token_id,
        eos_id=gen_tokenizer.eos_token_id,
        pad_id=gen_tokenizer.pad_token_id,
    )


def ensure_and_open(cfg: Any, open_index: Callable[..., Any]) -> Retriever:
    """Store and index ensured (built when missing), the index opened with ``open_index``
    (``PassageIndex.load`` or ``LazyPassageIndex.open``), wrapped in a Retriever."""
    store, index_dir, expect, gen_tokenizer = _ensure(cfg)
    index = open_index(
        index_dir,
        expect=expect,
        cfg=cfg.index,
        rebuild_command=rebuild_command(cfg),
        verify_checksum=bool(_opt(cfg.index, "verify_checksum", True)),
    )
    return make_retriever(cfg, index, store, gen_tokenizer)


def open_retriever(cfg: Any) -> Retriever:
    """The single-process Retriever: store and index ensured, then loaded."""
    return ensure_and_open(cfg, PassageIndex.load)
