"""The FAISS index over passage vectors (inner product), with a manifest that guards every reuse.

An index directory holds ``index.faiss`` (``faiss.write_index``), ``vectors.npy`` (N, d) float32 — the exact
passage vectors, memory-mapped — and ``index_manifest.json``: what the vectors were computed from (encoder
name and weights fingerprint, corpus hash, passage count), the index type and build parameters, the faiss
version, and the size and sha256 of ``index.faiss``. The manifest is written last, so its presence means the
directory is complete; :meth:`PassageIndex.load` refuses a directory built for other inputs or whose files
are damaged, with a message that says what to rebuild.

Types: ``flat`` (``IndexFlatIP``, exact), ``hnsw`` (``IndexHNSWFlat``, inner product), ``ivfpq``
(``IndexIVFPQ``, inner product, trained on a seeded sample; its top-k is re-ranked with the exact vectors
from ``vectors.npy``, ``rerank`` candidates per result, so memory stays at the PQ codes).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag_lightning.config import INDEX_TYPES, SEARCH_KEYS, ConfigError, IndexConfig
from rag_lightning.errors import UserError
from rag_lightning.files import fingerprint_problem, remove_stale_temporaries, sampled_sha256, sha256_file
from rag_lightning.retrieval.store import manifest_differences

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "index_manifest.json"
ADD_CHUNK = 65_536  # rows copied from the memmap per add(): bounded memory on top of the index itself
RERANK_BYTES = 64 * 2**20  # candidate vectors gathered at once when re-ranking


class IndexStateError(UserError, RuntimeError):
    """An index directory that cannot be used as it is; the message says how to rebuild it."""


class IndexMissingError(IndexStateError):
    pass


class IndexMismatchError(IndexStateError):
    pass


class IndexCorruptError(IndexStateError):
    pass


def set_num_threads(threads: int) -> None:
    """``index.num_threads`` > 0 caps faiss's OpenMP threads (0 keeps faiss's default)."""
    if threads > 0:
        faiss.omp_set_num_threads(threads)


def to_gpu(index: Any, index_type: str, device: int = 0) -> tuple[Any, Any]:
    """The index cloned to GPU ``device``, and the GpuResources that must live as long as it (faiss
    segfaults else)."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "StandardGpuResources") or gpus == 0:
        raise RuntimeError(
            f"index.device=gpu needs faiss built with GPU support and a visible CUDA device; found faiss "
            f"{faiss.__version__} with {gpus} GPU(s). Install it with: pip install -e '.[gpu]' && pip "
            "uninstall -y faiss-cpu, or run with index.device=cpu"
        )
    if index_type == "hnsw":
        raise RuntimeError("faiss runs HNSW on CPU only: use index=flat or index=ivfpq with index.device=gpu")
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = index_type == "ivfpq"  # float16 lookup tables: needed above 56 PQ bytes per vector
    return faiss.index_cpu_to_gpu(resources, device, index, options), resources


class PassageIndex:
    """A faiss index plus the exact passage vectors it was built from."""

    def __init__(
        self,
        index: Any,
        vectors: np.ndarray,
        index_type: str,
        build_params: dict[str, int],
        search_params: dict[str, int],
        *,
        effective_params: dict[str, int] | None = None,
        manifest: dict[str, Any] | None = None,
        gpu_resources: Any = None,
    ) -> None:
        self.index, self.vectors, self.index_type = index, vectors, index_type
        self.build_params, self.manifest = build_params, manifest or {}
        self.search_params = dict(search_params)
        # build parameters with automatic values (0) resolved; build_params keeps them as configured
        self.effective_params = dict(effective_params or build_params)
        self._gpu_resources = gpu_resources  # a GPU index must not outlive its resources
        self._apply_search_params()

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, cfg: IndexConfig) -> PassageIndex:
        """Build the index that the ``index`` section names over ``vectors`` (N, d) float32."""
        index_type = cfg.type
        if index_type not in INDEX_TYPES:
            raise ConfigError(f"index.type={index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"passage vectors must be (N, d) float32, got {vectors.shape} {vectors.dtype}")
        set_num_threads(cfg.num_threads)
        n, dim = vectors.shape
        configured = cfg.build_params()
        params = dict(configured)
        if index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
        else:
            params = {**params, **ivfpq_shape(dim, n, params)}
            index = _untrained_ivfpq(dim, n, params)
        gpu_resources = None
        if cfg.device == "gpu":
            index, gpu_resources = to_gpu(index, index_type)
        if index_type == "ivfpq":
            index.train(_training_sample(vectors, params))
        for start in range(0, n, ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK]))
        search = cfg.search_params()
        return cls(
            index,
            vectors,
            index_type,
            configured,
            search,
            effective_params=params,
            gpu_resources=gpu_resources,
        )

    def save(self, directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Write index, vectors (unless already there) and the manifest (last); returns the manifest."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # the directory is incomplete until it is rewritten
        remove_stale_temporaries(out)  # what a killed save left
        vectors_path = out / VECTORS_FILE
        source = Path(getattr(self.vectors, "filename", "") or "")
        if source.resolve() != vectors_path.resolve():
            _place_vectors(vectors_path, self.vectors, source)
            self.vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if _on_gpu(self.index) else self.index
        tmp = out / (INDEX_FILE + ".tmp")
        faiss.write_index(cpu_index, str(tmp))
        os.replace(tmp, out / INDEX_FILE)
        full = {
            **dict(manifest),
            "format_version": FORMAT_VERSION,
            "index_type": self.index_type,
            "build_params": self.build_params,
            "effective_params": self.effective_params,
            "search_params": self.search_params,
            "metric": "inner_product",
            "dim": int(self.vectors.shape[1]),
            "passages": int(self.vectors.shape[0]),
            "faiss_version": faiss.__version__,
            "index_file": INDEX_FILE,
            "index_bytes": (out / INDEX_FILE).stat().st_size,
            "index_sha256": sha256_file(out / INDEX_FILE),
            "index_sampled_sha256": sampled_sha256(out / INDEX_FILE),
            "vectors_file": VECTORS_FILE,
            "vectors_bytes": vectors_path.stat().st_size,
            "vectors_sampled_sha256": sampled_sha256(vectors_path),
            "vectors_sha256": sha256_file(vectors_path),
        }
        tmp_manifest = out / (MANIFEST_FILE + ".tmp")
        tmp_manifest.write_text(json.dumps(full, indent=2, sort_keys=True))
        os.replace(tmp_manifest, out / MANIFEST_FILE)
        self.manifest = full
        return full

    # ---- loading --------------------------------------------------------------------------------
    @staticmethod
    def check(
        directory: str | os.PathLike[str],
        *,
        expect: Mapping[str, Any],
        rebuild_command: str = "rag-index",
        verify_checksum: bool = False,
    ) -> dict[str, Any]:
        """The manifest of a usable index built for ``expect``; else an :class:`IndexStateError` that says why.

        Cheap by default (manifest, file sizes and sampled hashes); ``verify_checksum`` also hashes
        ``index.faiss`` and ``vectors.npy`` whole.
        """
        d = Path(directory)
        hint = f"Rebuild it with: {rebuild_command}   (or delete {d})"
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise IndexMissingError(f"no FAISS index in {d} ({MANIFEST_FILE} is missing). {hint}") from None
        except (OSError, ValueError) as err:
            raise IndexCorruptError(f"{d / MANIFEST_FILE} is unreadable ({err}). {hint}") from err
        differences = manifest_differences(manifest, {"format_version": FORMAT_VERSION, **expect})
        if differences:
            lines = "\n  - ".join(differences)
            raise IndexMismatchError(
                f"the FAISS index in {d} was built for other inputs:\n  - {lines}\n{hint}"
            )
        for name, size_key in (("index_file", "index_bytes"), ("vectors_file", "vectors_bytes")):
            path = d / str(manifest.get(name, ""))
            size = path.stat().st_size if path.is_file() else None
            if size != manifest.get(size_key):
                raise IndexCorruptError(
                    f"{path} is {'missing' if size is None else f'{size} bytes'} but the manifest records "
                    f"{manifest.get(size_key)} bytes: truncated or corrupt. {hint}"
                )
        for name in ("index", "vectors"):
            record = {key: manifest.get(f"{name}_{key}") for key in ("bytes", "sampled_sha256", "sha256")}
            problem = fingerprint_problem(d / manifest[f"{name}_file"], record, full=verify_checksum)
            if problem:
                raise IndexCorruptError(f"{problem}: the index cannot be trusted. {hint}")
        return manifest

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expect: Mapping[str, Any],
        cfg: IndexConfig | None = None,
        rebuild_command: str = "rag-index",
        verify_checksum: bool = True,
    ) -> PassageIndex:
        """Open an index built for ``expect``; ``cfg`` (the ``index`` section) sets device, threads and
        search parameters (None: CPU, faiss's threads, the search parameters it was built with)."""
        d = Path(directory)
        manifest = cls.check(
            d, expect=expect, rebuild_command=rebuild_command, verify_checksum=verify_checksum
        )
        hint = f"Rebuild it with: {rebuild_command}   (or delete {d})"
        try:
            index = faiss.read_index(str(d / manifest["index_file"]))
        except RuntimeError as err:
            raise IndexCorruptError(f"faiss cannot read {d / manifest['index_file']}: {err}. {hint}") from err
        try:
            vectors = np.load(d / manifest["vectors_file"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexCorruptError(f"cannot map {d / manifest['vectors_file']}: {err}. {hint}") from err
        expected_shape = (manifest["passages"], manifest["dim"])
        if index.ntotal != manifest["passages"] or vectors.shape != expected_shape:
            raise IndexCorruptError(
                f"{d} holds {index.ntotal} indexed and {vectors.shape} stored vectors, the manifest records "
                f"{expected_shape}. {hint}"
            )
        index_type = manifest["index_type"]
        gpu_resources = None
        search = manifest["search_params"]
        if cfg is not None:
            set_num_threads(cfg.num_threads)
            if cfg.device == "gpu":
                index, gpu_resources = to_gpu(index, index_type)
            search = {key: int(getattr(cfg, key)) for key in SEARCH_KEYS[index_type]}
        return cls(
            index,
            vectors,
            index_type,
            manifest["build_params"],
            search,
            effective_params=manifest.get("effective_params"),
            manifest=manifest,
            gpu_resources=gpu_resources,
        )

    # ---- searching ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _apply_search_params(self) -> None:
        if self.index_type == "hnsw":
            self.index.hnsw.efSearch = self.search_params["ef_search"]
        elif self.index_type == "ivfpq":
            if _on_gpu(self.index):
                faiss.GpuParameterSpace().set_index_parameter(
                    self.index, "nprobe", self.search_params["nprobe"]
                )
            else:
                self.index.nprobe = self.search_params["nprobe"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` passages by inner product: scores (B, k) float32 and rows (B, k) int64, best first.

        An approximate index that finds fewer than ``k`` candidates pads with row -1 and score -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}) float32, got {q.shape}")
        if not 0 < k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the number of indexed passages ({len(self)})")
        rerank = self.search_params.get("rerank", 1) if self.index_type == "ivfpq" else 1
        scores, rows = self.index.search(q, min(len(self), k * max(1, rerank)))
        if rerank > 1:
            scores, rows = self._rerank(q, rows, k)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32, copy=False)
        return scores, rows.astype(np.int64, copy=False)

    def _rerank(self, q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of the candidates (read from the memmap), keeping the best ``k``.

        Queries go in chunks so the gathered candidate vectors stay under RERANK_BYTES whatever the batch.
        """
        exact = np.empty(candidates.shape, dtype=np.float32)
        per_chunk = max(1, RERANK_BYTES // (candidates.shape[1] * self.dim * 4))
        for start in range(0, len(q), per_chunk):
            cand = candidates[start : start + per_chunk]
            vectors = np.asarray(self.vectors[np.maximum(cand, 0).ravel()], dtype=np.float32)
            scores = np.einsum("bd,bkd->bk", q[start : start + per_chunk], vectors.reshape(*cand.shape, -1))
            exact[start : start + per_chunk] = np.where(cand >= 0, scores, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def _on_gpu(index: Any) -> bool:
    return "Gpu" in type(index).__name__


def ivfpq_shape(dim: int, n: int, params: Mapping[str, int]) -> dict[str, int]:
    """``nlist`` and ``m`` with 0 meaning automatic: about 4*sqrt(N) lists (at most N/64, so each list
    gets training points) and a sub-quantizer per 8 dimensions (48 codes bytes for 384-d, 96 for 768-d)."""
    nlist = params["nlist"] or int(max(1, min(4 * np.sqrt(n), n // 64)))
    m = params["m"] or max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    return {"nlist": nlist, "m": m}


def _untrained_ivfpq(dim: int, n: int, params: dict[str, int]) -> Any:
    nlist, m, nbits = params["nlist"], params["m"], params["nbits"]
    if dim % m:
        raise ValueError(f"index.m={m} must divide the vector dimension {dim}")
    if n < max(nlist, 2**nbits):
        raise ValueError(
            f"ivfpq needs at least max(nlist, 2**nbits) = {max(nlist, 2**nbits)} passages to train, the corpus "
            f"has {n}; lower index.nlist / index.nbits or use index=flat"
        )
    # faiss's Python wrapper keeps the quantizer alive through index.referenced_objects
    return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)


def _training_sample(vectors: np.ndarray, params: dict[str, int]) -> np.ndarray:
    """A seeded sample: ``train_size`` rows, by default 64 per coarse centroid or PQ code (faiss asks >= 39)."""
    n = len(vectors)
    size = params["train_size"] or 64 * max(params["nlist"], 2 ** params["nbits"])
    if size >= n:
        return np.ascontiguousarray(vectors[:], dtype=np.float32)
    rows = np.sort(np.random.default_rng(params["seed"]).choice(n, size=size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _place_vectors(path: Path, vectors: np.ndarray, source: Path) -> None:
    """Put the vectors beside the index: a hard link to their ``.npy`` when possible (no copy), else a write.

    Encoding replaces its ``vectors.npy`` by rename, so a linked index keeps the vectors it was built with.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    if source.suffix == ".npy" and source.is_file():
        try:
            os.link(source, tmp)
            os.replace(tmp, path)
            return
        except OSError:
            pass
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=vectors.shape)
    for start in range(0, len(vectors), ADD_CHUNK):
        out[start : start + ADD_CHUNK] = vectors[start : start + ADD_CHUNK]
    out.flush()
    del out
    os.replace(tmp, path)
