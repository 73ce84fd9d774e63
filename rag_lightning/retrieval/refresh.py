"""Index refresh while the context encoder trains (``model.train_context_encoder``).

The corpus is re-encoded with the current context encoder and a new FAISS index is built from those vectors,
beside the one in use, in a run's index root (``<run dir>/index``)::

    index/CURRENT              the name of the index in use (one line, replaced atomically)
    index/step0000040-1a2b3c4d/ index.faiss, vectors.npy, index_manifest.json: rag-index's layout

A new index is written under a temporary name, renamed into place once complete, and only then does
``CURRENT`` name it (``os.replace``): a refresh that fails midway leaves ``CURRENT``, the index it names and
the retriever searching it untouched. Older index directories are removed after the swap. The manifest
records the fingerprint of the encoder weights that produced the vectors (as ``rag-index`` does), and the
vectors are batched as ``rag-index`` batches them, so a fresh ``rag-index`` with those weights gives the same
vectors.

Under DDP every rank encodes its share of the rows (:func:`~rag_lightning.retrieval.distributed.shard_bounds`)
and the shares are all-gathered; rank 0 writes the index, and every rank then opens it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rag_lightning.config import IndexConfig
from rag_lightning.files import write_text_atomic
from rag_lightning.models.encoders import encoder_fingerprint
from rag_lightning.retrieval.distributed import (
    DistributedSearch,
    LazyPassageIndex,
    gather_questions,
    rank_and_world_size,
    shard_bounds,
)
from rag_lightning.retrieval.encode import encode_rows
from rag_lightning.retrieval.faiss_index import MANIFEST_FILE, IndexStateError, PassageIndex
from rag_lightning.retrieval.retriever import Retriever
from rag_lightning.retrieval.store import CorpusStore

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
# what a refreshed index shares with the index it replaces (the corpus, the encoder's tokens and name)
KEPT_KEYS = ("encoder_name", "ctx_tokenizer", "ctx_max_length", "corpus_hash")


@dataclass(frozen=True)
class Refreshed:
    """One refresh: the index directory now in use, the encoder fingerprint, and what it cost."""

    directory: Path
    fingerprint: str
    encode_s: float
    total_s: float


def encode_corpus(encoder: torch.nn.Module, store: CorpusStore, *, batch_size: int) -> np.ndarray:
    """Vectors (N, d) of every passage with ``encoder`` (eval mode); under DDP each rank encodes its share and
    the shares are all-gathered in row order."""
    rank, world = rank_and_world_size()
    if len(store) < world:
        raise ValueError(f"{len(store)} passages cannot be shared among {world} processes")
    device = next(encoder.parameters()).device
    start, stop = shard_bounds(len(store), rank, world)
    part = encode_rows(encoder, store, start, stop, batch_size=batch_size, device=device)
    if world == 1:
        return part
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered, _ = gather_questions(torch.from_numpy(part), world, comm)  # any (rows, d) block, padded and trimmed
    return np.ascontiguousarray(gathered, dtype=np.float32)


def current_index(root: str | os.PathLike[str]) -> Path | None:
    """The complete index directory that ``root/CURRENT`` names, or None."""
    pointer = Path(root) / CURRENT
    if not pointer.is_file():
        return None
    directory = Path(root) / pointer.read_text(encoding="utf-8").strip()
    return directory if (directory / MANIFEST_FILE).is_file() else None


def write_index(vectors: np.ndarray, root: str | os.PathLike[str], name: str, cfg: IndexConfig, manifest: dict) -> Path:
    """Build the index of ``vectors`` as ``root/name`` beside the one in use, then point ``CURRENT`` at it and
    remove the older ones. Until the pointer is replaced nothing the current index needs is touched."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if not (final / MANIFEST_FILE).is_file():
        tmp = root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            PassageIndex.build(vectors, cfg).save(tmp, manifest)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete one of the same name (no manifest)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(root / CURRENT, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def open_index(directory: Path, fingerprint: str, cfg: IndexConfig) -> tuple[LazyPassageIndex, DistributedSearch]:
    """A refreshed index opened for search (its manifest checked against the fingerprint), with its search."""
    index = LazyPassageIndex.open(directory, expect={"encoder_fingerprint": fingerprint}, cfg=cfg,
                                  rebuild_command="a refresh (it is rebuilt at the next one)")
    return index, DistributedSearch(index, cfg.distributed, cfg)


def refresh(
    retriever: Retriever, encoder: torch.nn.Module, root: str | os.PathLike[str], cfg: IndexConfig, step: int
) -> Refreshed:
    """Re-encode the corpus with ``encoder``, write its index beside the current one in ``root``, swap it in
    (on disk, then in ``retriever``). A collective under DDP: every rank must call it."""
    began = time.perf_counter()
    fingerprint = encoder_fingerprint(encoder)
    vectors = encode_corpus(encoder, retriever.store, batch_size=cfg.batch_size)
    encoded = time.perf_counter()
    old = getattr(retriever.index, "manifest", None) or {}
    manifest = {**{k: old[k] for k in KEPT_KEYS if k in old}, "encoder_fingerprint": fingerprint,
                "refreshed_at_step": int(step)}
    name = f"step{int(step):07d}-{fingerprint[:8]}"
    rank, world = rank_and_world_size()
    if rank == 0:
        write_index(vectors, root, name, cfg, manifest)
    if world > 1:
        dist.barrier()  # the other ranks open it once rank 0 has written it
    directory = Path(root) / name
    retriever.swap_index(*open_index(directory, fingerprint, cfg))
    done = time.perf_counter()
    return Refreshed(directory, fingerprint, round(encoded - began, 2), round(done - began, 2))


def use_matching(
    retriever: Retriever,
    encoder: torch.nn.Module,
    roots: Sequence[str | os.PathLike[str]],
    cfg: IndexConfig,
    step: int,
) -> Refreshed | None:
    """Make ``retriever`` search an index of ``encoder``'s current weights: the one it has (None), the current
    one of the first of ``roots`` that matches (swapped in), else a new one written to the last root."""
    fingerprint = encoder_fingerprint(encoder)
    if (getattr(retriever.index, "manifest", None) or {}).get("encoder_fingerprint") == fingerprint:
        return None
    for root in roots:
        directory = current_index(root)
        if directory is None:
            continue
        try:
            retriever.swap_index(*open_index(directory, fingerprint, cfg))
        except IndexStateError:
            continue  # built with other weights
        log.info("searching the refreshed index %s (it matches the context encoder's weights)", directory)
        return Refreshed(directory, fingerprint, 0.0, 0.0)
    return refresh(retriever, encoder, roots[-1], cfg, step)
