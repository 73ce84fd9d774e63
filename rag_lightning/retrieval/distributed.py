"""Retrieval under Lightning DDP: the index sharded across the ranks (default) or replicated on each.

``index.distributed`` picks the mode:

- ``sharded``: rank r of W holds rows ``[r*N//W, (r+1)*N//W)`` of the corpus. Each retrieval all-gathers the
  question vectors of every rank (padded to the largest batch, with the batch sizes gathered first: gloo's
  ``all_gather`` needs same-size tensors), searches its shard for all of them, all-gathers the per-shard
  top-k (scores, global rows) and merges them; each rank keeps its own questions' rows. Every rank must
  therefore call :meth:`Retriever.retrieve <rag_lightning.retrieval.retriever.Retriever.retrieve>` the same number of times, with the same ``k`` (Lightning's
  distributed samplers give every rank the same number of batches in fit / validate / test; ``predict`` does not,
  so predict with one process or ``replicated``).
- ``replicated``: every rank searches the full index for its own questions; no communication. For corpora
  whose index fits once per process.

Without an initialised process group of more than one process (a single-device run, ``rag-eval``,
``rag-predict``) both modes search the full index. The world size is read at the first search, because
Lightning sets up the process group inside ``trainer.fit``, after the retriever is built.

Tie rule, the same in every mode: passages are ordered by score descending, then by corpus row ascending.
Scores are recomputed from the exact vectors (float64 accumulation, rounded to float32) for each
(question, candidate) pair, so the value of a pair does not depend on the batch, the shard or the faiss
kernel that found it; faiss is asked for ``k + CANDIDATE_MARGIN`` candidates so passages whose faiss
scores differ from the exact ones in the last bits still compete. Hence sharded ``flat`` search returns
exactly the single-process top-k (rows, scores and order).

Shards of the other index types:

- ``hnsw``: each rank builds an HNSW graph over its slice of the memory-mapped vectors at its first search (same
  ``M`` / ``ef_construction``; minutes for millions of rows). The merged top-k is as approximate as HNSW, not
  equal to the single graph's; prefer ``replicated`` when the graph fits in every process.
- ``ivfpq``: each rank reads the trained index and removes the rows outside its shard; coarse quantiser and
  PQ codes are the single index's own. Each shard re-ranks its own ``(k + margin) * rerank`` candidates
  exactly, so the merged candidate pool contains the single index's one: recall is at least the
  single-process recall, the results can differ (only ever by better exact scores).

``index.device=gpu`` puts each rank's shard or replica on that rank's GPU (``torch.cuda.current_device()``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.distributed as dist

from rag_lightning.config import DISTRIBUTED_MODES, SEARCH_KEYS, ConfigError, IndexConfig
from rag_lightning.retrieval.faiss_index import (
    ADD_CHUNK,
    IndexCorruptError,
    PassageIndex,
    set_num_threads,
    to_gpu,
)

log = logging.getLogger(__name__)

MODES = DISTRIBUTED_MODES
CANDIDATE_MARGIN = 8  # extra faiss candidates per question, re-scored exactly before the top-k is taken
_NO_ROW = np.iinfo(np.int64).max


# ------------------------------------------------------------------------------------------ top-k math
def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced rows ``[start, end)`` of rank ``rank``: sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def exact_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Inner products (B, m) of queries (B, d) with their candidates (B, m, d).

    Accumulated in float64 along d, each pair on its own, then rounded to float32: the same bits for a
    (question, passage) pair whatever the batch or the process that computes it.
    """
    q = np.asarray(queries, dtype=np.float64)[:, None, :]
    return (np.asarray(vectors, dtype=np.float64) * q).sum(axis=-1).astype(np.float32)


def rescore(queries: np.ndarray, rows: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact scores of candidate rows (B, m) read from the (memory-mapped) passage vectors; -inf for row -1."""
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    candidates = np.asarray(vectors[safe.reshape(-1)], dtype=np.float32).reshape(*rows.shape, -1)
    return np.where(valid, exact_scores(queries, candidates), -np.inf).astype(np.float32)


def top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each row of (B, m) candidates by the tie rule (score desc, then row asc).

    Row -1 (no passage) scores -inf and comes last; fewer than ``k`` candidates are padded with it.
    """
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    rows = np.where(rows >= 0, rows, -1).astype(np.int64)
    if scores.shape[1] < k:
        pad = ((0, 0), (0, k - scores.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        rows = np.pad(rows, pad, constant_values=-1)
    order = np.lexsort((np.where(rows >= 0, rows, _NO_ROW), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def search_part(
    part: PassageIndex | None, offset: int, queries: np.ndarray, k: int, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, global rows) of one index, the full one or a shard whose row 0 is ``offset``."""
    if part is None or len(part) == 0:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    _, local = part.search(queries, min(len(part), k + CANDIDATE_MARGIN))
    rows = np.where(local >= 0, local + offset, -1)
    return top_k(rescore(queries, rows, vectors), rows, k)


# ------------------------------------------------------------------------------------------ index sources
class LazyPassageIndex:
    """An index directory checked and its vectors memory-mapped now; faiss structures read on first use.

    A rank learns which shard is its own only once Lightning has set up the process group, and a sharded
    rank never needs the full index in memory.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: dict[str, Any],
        cfg: IndexConfig | None = None,
        *,
        expect: dict[str, Any],
        rebuild_command: str = "rag-index",
        verify_checksum: bool = True,
    ) -> None:
        self.directory, self.manifest, self.cfg = Path(directory), manifest, cfg
        self.expect, self.rebuild_command, self.verify_checksum = expect, rebuild_command, verify_checksum
        self.index_type = str(manifest["index_type"])
        self.build_params = dict(manifest["build_params"])
        self.effective_params = dict(manifest.get("effective_params") or self.build_params)
        self.search_params = (
            dict(manifest["search_params"])
            if cfg is None
            else {key: int(getattr(cfg, key)) for key in SEARCH_KEYS[self.index_type]}
        )
        self.vectors = np.load(self.directory / manifest["vectors_file"], mmap_mode="r", allow_pickle=False)
        self._full: PassageIndex | None = None

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        expect: dict[str, Any],
        cfg: IndexConfig | None = None,
        rebuild_command: str = "rag-index",
        verify_checksum: bool = True,
    ) -> LazyPassageIndex:
        """Check the manifest and file sizes (cheap); the checksum is verified when ``index.faiss`` is read."""
        manifest = PassageIndex.check(directory, expect=expect, rebuild_command=rebuild_command)
        return cls(
            directory,
            manifest,
            cfg,
            expect=expect,
            rebuild_command=rebuild_command,
            verify_checksum=verify_checksum,
        )

    def __len__(self) -> int:
        return int(self.manifest["passages"])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def full(self) -> PassageIndex:
        """The whole index, loaded once (on this rank's GPU with ``index.device=gpu``)."""
        if self._full is None:
            index = PassageIndex.load(
                self.directory,
                expect=self.expect,
                cfg=_on_cpu(self.cfg),
                rebuild_command=self.rebuild_command,
                verify_checksum=self.verify_checksum,
            )
            self._full = _to_rank_gpu(index, self.cfg)
        return self._full

    def read_cpu_index(self) -> Any:
        """A fresh CPU copy of the faiss index from ``index.faiss`` (checksum verified when configured)."""
        PassageIndex.check(
            self.directory,
            expect=self.expect,
            rebuild_command=self.rebuild_command,
            verify_checksum=self.verify_checksum,
        )
        path = self.directory / self.manifest["index_file"]
        try:
            return faiss.read_index(str(path))
        except RuntimeError as err:
            raise IndexCorruptError(f"faiss cannot read {path}: {err}. Rebuild it with: {self.rebuild_command}") from err

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`PassageIndex.search` on the full index, so a plain :class:`Retriever` can use this too."""
        return self.full().search(queries, k)


def _full_index(index: LazyPassageIndex | PassageIndex) -> PassageIndex:
    return index.full() if isinstance(index, LazyPassageIndex) else index


def _cpu_faiss_copy(index: LazyPassageIndex | PassageIndex) -> Any:
    if isinstance(index, LazyPassageIndex):
        return index.read_cpu_index()
    inner = index.index
    return faiss.index_gpu_to_cpu(inner) if "Gpu" in type(inner).__name__ else faiss.clone_index(inner)


def _on_cpu(cfg: IndexConfig | None) -> IndexConfig | None:
    """``cfg`` with ``device=cpu``: an index is read on the CPU, then moved by :func:`_to_rank_gpu`."""
    return None if cfg is None else replace(cfg, device="cpu")


def _to_rank_gpu(index: PassageIndex, cfg: IndexConfig | None) -> PassageIndex:
    """The index on this process's GPU when ``index.device=gpu`` (each DDP rank on its own device)."""
    if cfg is None or cfg.device != "gpu":
        return index
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    gpu_index, resources = to_gpu(index.index, index.index_type, device)
    return PassageIndex(
        gpu_index,
        index.vectors,
        index.index_type,
        index.build_params,
        index.search_params,
        effective_params=index.effective_params,
        manifest=index.manifest,
        gpu_resources=resources,
    )


def build_shard(
    index: LazyPassageIndex | PassageIndex, start: int, end: int, cfg: IndexConfig | None = None
) -> tuple[PassageIndex | None, int]:
    """The shard of rows ``[start, end)`` and the global row of its local row 0 (None when empty).

    flat / hnsw: a new index over ``vectors[start:end]`` (only the shard is copied into memory).
    ivfpq: the trained index with the other rows removed; it keeps global row ids, so the offset is 0.
    """
    if end <= start:
        return None, start
    set_num_threads(cfg.num_threads if cfg is not None else 0)
    kind, vectors, dim = index.index_type, index.vectors, int(index.vectors.shape[1])
    params = dict(index.effective_params)
    if kind == "ivfpq":
        inner = _cpu_faiss_copy(index)
        inner.remove_ids(faiss.IDSelectorRange(0, start))
        inner.remove_ids(faiss.IDSelectorRange(end, len(vectors)))
        part = PassageIndex(inner, vectors, kind, index.build_params, index.search_params, effective_params=params)
        return _to_rank_gpu(part, cfg), 0
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = int(params["ef_construction"])
    else:
        raise ValueError(f"index type {kind!r} cannot be sharded")
    for first in range(start, end, ADD_CHUNK):
        inner.add(np.ascontiguousarray(vectors[first : min(first + ADD_CHUNK, end)], dtype=np.float32))
    part = PassageIndex(inner, vectors[start:end], kind, index.build_params, index.search_params, effective_params=params)
    return _to_rank_gpu(part, cfg), start


# ------------------------------------------------------------------------------------------ collectives
def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def gather_questions(
    queries: torch.Tensor, world_size: int, device: torch.device
) -> tuple[np.ndarray, list[int]]:
    """Every rank's question vectors, concatenated in rank order, and each rank's batch size."""
    q = queries.detach().to(device=device, dtype=torch.float32)
    size = torch.tensor([q.shape[0]], dtype=torch.int64, device=device)
    sizes = [int(s.item()) for s in _all_gather(size, world_size)]
    padded = torch.zeros((max(sizes), q.shape[1]), dtype=torch.float32, device=device)
    padded[: q.shape[0]] = q
    gathered = _all_gather(padded, world_size)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).cpu().numpy(), sizes


# ------------------------------------------------------------------------------------------ search
class DistributedSearch:
    """The top-k search of a :class:`~rag_lightning.retrieval.retriever.Retriever`, spread over the DDP
    ranks as ``index.distributed`` says; a single process searches the full index. See the module
    docstring."""

    def __init__(self, index: LazyPassageIndex | PassageIndex, mode: str = "sharded", cfg: IndexConfig | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"index.distributed={mode!r} is not one of {', '.join(MODES)}")
        self.index, self.mode, self.cfg = index, mode, cfg
        self._shard: tuple[tuple[int, int], PassageIndex | None, int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def shard(self, rank: int, world_size: int) -> tuple[PassageIndex | None, int]:
        """This rank's shard, built at the first sharded search (and again only if the world changes)."""
        if self._shard is None or self._shard[0] != (rank, world_size):
            start, end = shard_bounds(len(self.index), rank, world_size)
            began = time.time()
            part, offset = build_shard(self.index, start, end, self.cfg)
            log.info(
                "rank %d/%d: %s shard of passage rows [%d, %d) of %d ready in %.1fs",
                rank, world_size, self.index.index_type, start, end, len(self.index), time.time() - began,
            )
            self._shard = ((rank, world_size), part, offset)
        return self._shard[1], self._shard[2]

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores (B, k) float32, rows (B, k) int64) of this rank's questions, by the tie rule."""
        if not 0 < k <= len(self.index):
            raise ValueError(f"k={k} must be between 1 and the number of indexed passages ({len(self.index)})")
        question_vectors = torch.as_tensor(queries)
        rank, world_size = rank_and_world_size()
        vectors = self.index.vectors
        if world_size == 1 or self.mode == "replicated":
            q = question_vectors.detach().to("cpu", torch.float32).numpy()
            return search_part(_full_index(self.index), 0, q, k, vectors)
        device = _comm_device()
        gathered, sizes = gather_questions(question_vectors, world_size, device)
        part, offset = self.shard(rank, world_size)
        scores, rows = search_part(part, offset, gathered, k, vectors)
        all_scores = _all_gather(torch.from_numpy(scores).to(device), world_size)
        all_rows = _all_gather(torch.from_numpy(rows).to(device), world_size)
        begin = sum(sizes[:rank])
        mine = slice(begin, begin + sizes[rank])
        merged_scores = torch.cat([s[mine] for s in all_scores], dim=1).cpu().numpy()
        merged_rows = torch.cat([r[mine] for r in all_rows], dim=1).cpu().numpy()
        return top_k(merged_scores, merged_rows, k)
