"""Make sure the corpus store and the FAISS index of a run exist and fit it; build what does not.

Used by ``rag-index`` and by every stage that retrieves (:func:`open_retriever`). Each piece is reused only
when its manifest matches what the sections ask for now:

- store (``index.store_dir``): corpus hash, both tokenizers, ``ctx_max_length``, ``gen_max_passage_tokens``,
  ``title_separator``. The corpus file is hashed only when its size or mtime changed since the build.
- vectors (``index.vectors_dir``): context-encoder weights fingerprint and corpus hash (resumable encoding).
- index (``index.dir``): the above plus index type and build parameters. Search-time parameters (``nprobe``,
  ``ef_search``, ``rerank``) never force a rebuild.
- BM25 index (``index.dir`` for ``index=bm25``; :func:`bm25_dir` beside the dense index for ``index.hybrid``):
  corpus hash, passage count and the BM25 parameters.

The data itself must be prepared first (``rag-prepare``'s work, ``data.prepare_data.ensure_prepared``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rag_lightning.config import ContextConfig, DataConfig, IndexConfig, QuestionEncoderConfig
from rag_lightning.files import sha256_file
from rag_lightning.models.encoders import (
    build_context_encoder,
    encoder_fingerprint,
    encoder_name,
    load_encoder_tokenizer,
)
from rag_lightning.retrieval.distributed import DistributedSearch, LazyPassageIndex
from rag_lightning.retrieval.encode import encode_passages
from rag_lightning.retrieval.faiss_index import (
    IndexCorruptError,
    IndexMismatchError,
    IndexStateError,
    PassageIndex,
)
from rag_lightning.retrieval.retriever import HybridScoring, Retriever
from rag_lightning.retrieval.store import CorpusStore, StoreError, manifest_differences, tokenizer_fingerprint

log = logging.getLogger(__name__)


@dataclass
class RetrievalSpec:
    """What retrieval needs from a run's config: its typed sections and two plain facts of the run."""

    data: DataConfig
    encoder: QuestionEncoderConfig
    index: IndexConfig
    context: ContextConfig
    cache_dir: str  # where the build lock lives (shared by sweep jobs and DDP ranks)
    rebuild_command: str = "rag-index"  # what an error message tells the user to run
    # `index` keys (store_dir, dir) the user named for this call (rag-eval / rag-predict): a store or index found
    # there is used when it fits and refused when it was built for other inputs, never rebuilt over
    named: tuple[str, ...] = ()


class NamedIndexError(IndexStateError):
    """A store or index named on the command line was built for another corpus, encoder or parameters."""


def refuse_named(key: str, path: Path, what: str, why: str) -> NamedIndexError:
    """The error for a store or index the user named that was built for other inputs (or is damaged)."""
    return NamedIndexError(
        f"index.{key}={path} holds {what} that does not fit this run:\n  {why.strip()}\nIt was named on the "
        f"command line, so it is used as it is or not at all. Fix: point index.{key} at a new or empty directory "
        f"(built on first use), or leave index.{key} out (derived from data.name), or check that data.corpus_file "
        "and the run's encoder are the ones this index was built for"
    )



def corpus_path(data: DataConfig) -> Path:
    """``data.corpus_file`` as given, else relative to ``data.dir``."""
    path = Path(data.corpus_file)
    if not path.is_absolute() and not path.exists() and data.dir:
        path = Path(data.dir) / path
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} (data.corpus_file) does not exist: run `rag-prepare data={data.name}` "
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


def ensure_store(spec: RetrievalSpec, gen_tokenizer: Any, ctx_tokenizer: Any) -> CorpusStore:
    """The corpus store of ``spec``, rebuilt from the corpus file when missing or built for other inputs."""
    store_dir = Path(spec.index.store_dir)
    path = corpus_path(spec.data)
    expect = {
        "corpus_hash": _corpus_hash(path, store_dir),
        "gen_tokenizer": tokenizer_fingerprint(gen_tokenizer),
        "ctx_tokenizer": tokenizer_fingerprint(ctx_tokenizer),
        "ctx_max_length": spec.encoder.ctx_max_length,
        "gen_max_passage_tokens": spec.index.gen_max_passage_tokens,
        "title_separator": spec.index.title_separator,
    }
    manifest = CorpusStore.read_manifest(store_dir)
    if manifest is not None:
        differences = manifest_differences(manifest, expect)
        if differences and "store_dir" in spec.named:
            raise refuse_named("store_dir", store_dir, "a corpus store", "\n  ".join(f"- {d}" for d in differences))
        if not differences:
            try:
                store = CorpusStore.open(store_dir)
                log.info("corpus store %s is up to date (%d passages)", store_dir, manifest["passages"])
                return store
            except StoreError as why:
                log.warning("rebuilding the corpus store: %s", why)
        else:
            log.info("rebuilding the corpus store %s: %s", store_dir, "; ".join(differences))
    from rag_lightning.data.readers import read_corpus

    start = time.time()
    passages = read_corpus(path, skip_bad_rows=spec.data.skip_bad_rows)
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


def index_expectation(spec: RetrievalSpec, store: CorpusStore, ctx_encoder: torch.nn.Module) -> dict[str, Any]:
    """What an index must have been built from to serve ``spec`` (compared with its manifest)."""
    return {
        "encoder_name": encoder_name(spec.encoder, "context"),
        "encoder_fingerprint": encoder_fingerprint(ctx_encoder),
        "ctx_tokenizer": store.manifest["ctx_tokenizer"],
        "ctx_max_length": store.manifest["ctx_max_length"],
        "corpus_hash": store.corpus_hash,
        "passages": len(store),
        "index_type": spec.index.type,
        "build_params": spec.index.build_params(),
    }


def encode_device(index: IndexConfig) -> str:
    if index.encode_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return index.encode_device


@contextmanager
def build_lock(cache_dir: str | Path) -> Iterator[None]:
    """One check-or-build at a time per cache directory: parallel sweep jobs and DDP ranks share the store,
    the vectors and the index, and must not write them at the same time (the others then reuse them)."""
    path = Path(cache_dir) / ".retrieval.lock"
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


def ensure_index(
    spec: RetrievalSpec, gen_tokenizer: Any, full_check: bool = False
) -> tuple[CorpusStore, Path, dict[str, Any]]:
    """(store, index directory, the index's expected manifest), building the store and the index when needed.

    ``gen_tokenizer`` is the tokenizer the generator reads contexts with: the store is tokenised with it.
    Index and vectors are checked by size and sampled hash (``full_check``: whole sha256, rag-index's check);
    a damaged one is rebuilt, with a warning naming the file.
    """
    with build_lock(spec.cache_dir):
        store = ensure_store(spec, gen_tokenizer, load_encoder_tokenizer(spec.encoder, "context"))
        if spec.index.type == "bm25":
            return (store, *_ensure_bm25(spec, store, Path(spec.index.dir), "dir"))
        if spec.index.hybrid:
            _ensure_bm25(spec, store, bm25_dir(spec), "bm25_dir")
        ctx_encoder = build_context_encoder(spec.encoder)
        expect = index_expectation(spec, store, ctx_encoder)
        index_dir = Path(spec.index.dir)
        try:
            PassageIndex.check(
                index_dir, expect=expect, rebuild_command=spec.rebuild_command, verify_checksum=full_check
            )
            log.info("FAISS index %s is up to date", index_dir)
            return store, index_dir, expect
        except (IndexCorruptError, IndexMismatchError) as why:
            if "dir" in spec.named:
                raise refuse_named("dir", index_dir, "a FAISS index", str(why).split("Rebuild it with")[0]) from None
            if isinstance(why, IndexMismatchError):
                log.info("building the FAISS index: %s", str(why).splitlines()[0])
            else:
                log.warning("rebuilding the FAISS index: %s", str(why).split(": the index cannot")[0].split(" Rebuild it")[0])
        except IndexStateError as why:
            log.info("building the FAISS index: %s", str(why).splitlines()[0])
        start = time.time()
        vectors = encode_passages(
            ctx_encoder,
            store,
            spec.index.vectors_dir,
            batch_size=spec.index.batch_size,
            shard_size=spec.index.shard_size,
            device=encode_device(spec.index),
            progress=spec.index.progress,
            verify_full=full_check,
        )
        encoded = time.time()
        index = PassageIndex.build(vectors, spec.index)
        index.save(index_dir, expect)
        log.info(
            "FAISS %s index of %d passages in %s (encode %.1fs, index %.1fs)",
            expect["index_type"],
            len(store),
            index_dir,
            encoded - start,
            time.time() - encoded,
        )
        return store, index_dir, expect


def bm25_dir(spec: RetrievalSpec) -> Path:
    """Where a hybrid run's BM25 index lives: ``index.bm25_dir``, else beside the dense index under the name
    ``index=bm25`` gives its own (``<data.name>-bm25``, so the two share one build), with the tokenisation
    keys in it when they are not the defaults (so indexes of two tokenisations never rebuild each other)."""
    if spec.index.bm25_dir:
        return Path(spec.index.bm25_dir)
    name = f"{spec.data.name}-bm25"
    if spec.index.bm25_ngram != 1:
        name += f"-ngram{spec.index.bm25_ngram}"
    if spec.index.bm25_min_word_chars != 2:
        name += f"-chars{spec.index.bm25_min_word_chars}"
    if spec.index.bm25_whole_numbers:
        name += "-wholenum"
    if spec.index.pairs_adjacent:
        name += "-adjacent"
    return Path(spec.index.dir).parent / name


def _ensure_bm25(spec: RetrievalSpec, store: CorpusStore, index_dir: Path, key: str) -> tuple[Path, dict[str, Any]]:
    """The BM25 index of ``spec`` in ``index_dir`` (the ``index`` key ``key``; no encoder involved), built
    when missing or built for other inputs."""
    from rag_lightning.retrieval.bm25 import BM25Index, bm25_expectation

    expect = bm25_expectation(store, spec.index)
    try:
        BM25Index.check(index_dir, expect=expect, rebuild_command=spec.rebuild_command)
        log.info("BM25 index %s is up to date", index_dir)
        return index_dir, expect
    except (IndexCorruptError, IndexMismatchError) as why:
        if key in spec.named:
            raise refuse_named(key, index_dir, "a BM25 index", str(why).split("Rebuild it with")[0]) from None
        log.info("building the BM25 index: %s", str(why).splitlines()[0])
    except IndexStateError as why:
        log.info("building the BM25 index: %s", str(why).splitlines()[0])
    start = time.time()
    BM25Index.build(store, spec.index).save(index_dir)
    log.info("BM25 index of %d passages in %s (%.1fs)", len(store), index_dir, time.time() - start)
    return index_dir, expect


def open_retriever(spec: RetrievalSpec, gen_tokenizer: Any) -> Retriever:
    """The retriever of a training / eval / predict run: store and index ensured (built when missing), the
    index opened lazily (a DDP rank learns its shard only once Lightning has set up the process group) and
    searched as ``index.distributed`` says."""
    store, index_dir, expect = ensure_index(spec, gen_tokenizer)
    if spec.index.type == "bm25":
        from rag_lightning.retrieval.bm25 import BM25Index

        index = BM25Index.load(index_dir, expect=expect, rebuild_command=spec.rebuild_command)
        searcher = None
    else:
        index = LazyPassageIndex.open(
            index_dir,
            expect=expect,
            cfg=spec.index,
            rebuild_command=spec.rebuild_command,
            verify_checksum=spec.index.verify_checksum,
        )
        searcher = DistributedSearch(index, spec.index.distributed, spec.index)
    hybrid = None
    if spec.index.hybrid:
        from rag_lightning.retrieval.bm25 import BM25Index, bm25_expectation

        bm25 = BM25Index.load(bm25_dir(spec), expect=bm25_expectation(store, spec.index),
                              rebuild_command=spec.rebuild_command)
        hybrid = HybridScoring(bm25, spec.index.hybrid_bm25_weight, spec.index.hybrid_candidates,
                               spec.index.hybrid_bm25_norm)
    return Retriever(
        index,
        store,
        max_context_length=spec.context.max_length,
        layout=spec.context.layout,
        title_separator=store.title_separator,
        bos_id=gen_tokenizer.bos_token_id,
        eos_id=gen_tokenizer.eos_token_id,
        pad_id=gen_tokenizer.pad_token_id,
        searcher=searcher,
        hybrid=hybrid,
    )


def describe(store_dir: str | Path, index_dir: str | Path) -> dict[str, str]:
    """What a built store and index hold, from their manifests, as (item, value) rows for people."""
    from rag_lightning.retrieval.bm25 import MANIFEST_FILE as BM25_MANIFEST
    from rag_lightning.retrieval.faiss_index import MANIFEST_FILE

    store = CorpusStore.read_manifest(store_dir) or {}
    if (Path(index_dir) / BM25_MANIFEST).is_file():
        bm25 = json.loads((Path(index_dir) / BM25_MANIFEST).read_text(encoding="utf-8"))
        return {
            "passages": f"{store.get('passages', 0):,}",
            "index": f"bm25 (bm25s {bm25['bm25s_version']}) {bm25['method']} k1={bm25['k1']} b={bm25['b']} "
            f"stopwords={bm25['stopwords']}",
            "store dir": str(store_dir),
            "index dir": str(index_dir),
        }
    index = json.loads((Path(index_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
    params = ", ".join(f"{k}={v}" for k, v in {**index["effective_params"], **index["search_params"]}.items())
    return {
        "passages": f"{store.get('passages', 0):,}",
        "tokens (generator / context encoder)": f"{store.get('gen_tokens', 0):,} / {store.get('ctx_tokens', 0):,}",
        "encoder": f"{index['encoder_name']} ({index['encoder_fingerprint'][:12]})",
        "index": f"{index['index_type']} {params}".strip(),
        "vectors": f"{index['passages']:,} x {index['dim']} float32",
        "index file": f"{index['index_bytes'] / 2**20:,.1f} MiB (faiss {index['faiss_version']})",
        "store dir": str(store_dir),
        "index dir": str(index_dir),
    }
