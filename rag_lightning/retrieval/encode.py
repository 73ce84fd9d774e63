"""Passage vectors from the context encoder: sharded, resumable, then joined into one memory-mapped file.

``out_dir`` holds ``encode_state.json`` (what is being encoded: encoder fingerprint, corpus hash, the context
tokenizer and passage length, shard size), ``shards/shard_00000.npy`` ... written atomically as each finishes
(their sizes and hashes in ``shards/sums.json``), and at the end ``vectors.npy`` (N, d) float32 with its size
and hashes in ``vectors.json``. A killed run started again with the same inputs skips the finished shards;
different inputs start over. A shard or ``vectors.npy`` that no longer matches its recorded size and sampled hash (truncated,
overwritten) is encoded again, with a warning naming it: nothing damaged is ever joined or indexed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rag_lightning.files import fingerprint, fingerprint_problem, remove_stale_temporaries, write_json_atomic
from rag_lightning.models.encoders import encode_texts, encoder_fingerprint, encoder_pad_id
from rag_lightning.padding import pad_right
from rag_lightning.retrieval.store import CorpusStore

log = logging.getLogger(__name__)

VECTORS_FILE = "vectors.npy"
VECTORS_SUMS = "vectors.json"
STATE_FILE = "encode_state.json"
SHARD_SUMS = "sums.json"


def _shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / "shards" / f"shard_{shard:05d}.npy"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _intact_shards(out: Path, n_shards: int) -> list[int]:
    """Shards on disk that match the size and hashes recorded when they were written; a damaged one (or one
    whose record a kill cut off) is deleted so it is encoded again."""
    sums = _read_json(out / "shards" / SHARD_SUMS)
    done = []
    for shard in range(n_shards):
        path = _shard_path(out, shard)
        if not path.exists():
            continue
        record = sums.get(path.name)
        problem = fingerprint_problem(path, record, full=True) if record else f"{path} has no recorded checksum"
        if problem:
            log.warning("passage vectors: %s; encoding that shard again", problem)
            path.unlink()
        else:
            done.append(shard)
    return done


def _record_shard(out: Path, shard: int) -> None:
    sums_path = out / "shards" / SHARD_SUMS
    sums = _read_json(sums_path)
    sums[_shard_path(out, shard).name] = fingerprint(_shard_path(out, shard))
    write_json_atomic(sums_path, sums)


def _intact_vectors(out: Path, full: bool) -> np.memmap | None:
    """The finished ``vectors.npy`` when it still matches its record (``full``: its whole sha256), else None
    (damaged: removed, with a warning, so it is encoded again)."""
    path = out / VECTORS_FILE
    problem = fingerprint_problem(path, _read_json(out / VECTORS_SUMS) or None, full=full)
    if problem is None:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            problem = f"{path} cannot be read ({err})"
    log.warning("passage vectors: %s; encoding the corpus again", problem)
    path.unlink(missing_ok=True)
    (out / VECTORS_SUMS).unlink(missing_ok=True)
    return None


def _batch(store: CorpusStore, rows: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_right([store.ctx_tokens(int(r)) for r in rows], pad_id)


@torch.inference_mode()
def _encode_shard(
    encoder: torch.nn.Module,
    store: CorpusStore,
    start: int,
    stop: int,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    advance: Callable[[int], None],
) -> np.ndarray:
    """Vectors of rows [start, stop); batches group passages of similar length so little is padding."""
    lengths = store.ctx_lengths()[start:stop]
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for b in range(0, len(order), batch_size):
        local = order[b : b + batch_size]
        ids, mask = _batch(store, local + start, pad_id)
        vec = encode_texts(encoder, ids.to(device), mask.to(device)).float().cpu().numpy()
        if out is None:
            out = np.empty((stop - start, vec.shape[1]), dtype=np.float32)
        out[local] = vec
        advance(len(local))
    assert out is not None
    return out


def encode_rows(
    ctx_encoder: torch.nn.Module,
    store: CorpusStore,
    start: int,
    stop: int,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Vectors (stop - start, d) float32 of rows [start, stop), batched as :func:`encode_passages` batches them
    (so a range of one shard gets the same vectors), in eval mode (no dropout); the mode is restored after."""
    if stop <= start:
        raise ValueError(f"rows [{start}, {stop}) hold no passage to encode")
    was_training = ctx_encoder.training
    ctx_encoder.eval()
    try:
        return _encode_shard(ctx_encoder, store, start, stop, batch_size, torch.device(device),
                             encoder_pad_id(ctx_encoder), lambda _: None)
    finally:
        ctx_encoder.train(was_training)


def _join_shards(out_dir: Path, n_shards: int, n: int, dim: int) -> Path:
    """Concatenate the shards into ``vectors.npy`` (written through a memmap, then renamed into place)."""
    tmp = out_dir / (VECTORS_FILE + ".tmp")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    row = 0
    for shard in range(n_shards):
        part = np.load(_shard_path(out_dir, shard), mmap_mode="r", allow_pickle=False)
        joined[row : row + len(part)] = part
        row += len(part)
    joined.flush()
    del joined
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    final = out_dir / VECTORS_FILE
    (out_dir / VECTORS_SUMS).unlink(missing_ok=True)
    os.replace(tmp, final)
    write_json_atomic(out_dir / VECTORS_SUMS, fingerprint(final))
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    return final


def encode_passages(
    ctx_encoder: torch.nn.Module,
    store: CorpusStore,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    shard_size: int = 50_000,
    device: str | torch.device = "cpu",
    progress: bool = True,
    pad_id: int | None = None,
    on_shard_done: Callable[[int], Any] | None = None,
    verify_full: bool = False,
) -> np.memmap:
    """Encode every passage of ``store`` with ``ctx_encoder``; returns ``vectors.npy`` memory-mapped (N, d).

    ``on_shard_done(shard_index)`` runs after each shard is on disk (tests use it to simulate a kill).
    A finished ``vectors.npy`` is reused after its size and sampled hash are checked (``verify_full``: its
    whole sha256).
    """
    if len(store) == 0:
        raise ValueError(f"the corpus store {store.dir} holds no passages; nothing to encode")
    if pad_id is None:
        pad_id = encoder_pad_id(ctx_encoder)
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for stale in (out, out / "shards"):  # half-written files of a killed run (the caller holds the build lock)
        remove_stale_temporaries(stale)
    n = len(store)
    n_shards = max(1, -(-n // shard_size))
    state = {
        "encoder_fingerprint": encoder_fingerprint(ctx_encoder),
        "corpus_hash": store.corpus_hash,
        # the encoder's input: the same corpus cut to another length gives other vectors
        "ctx_tokenizer": store.manifest["ctx_tokenizer"],
        "ctx_max_length": store.manifest["ctx_max_length"],
        "passages": n,
        "shard_size": shard_size,
        "shards": n_shards,
    }
    state_path = out / STATE_FILE
    previous = json.loads(state_path.read_text()) if state_path.exists() else None
    if previous != state:
        if previous is not None:
            log.info("encoding inputs changed since the last run in %s; starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)
        (out / VECTORS_FILE).unlink(missing_ok=True)
        (out / VECTORS_SUMS).unlink(missing_ok=True)
        (out / "shards").mkdir(parents=True)
        write_json_atomic(state_path, state)
    elif (out / VECTORS_FILE).exists():
        vectors = _intact_vectors(out, verify_full)
        if vectors is not None:
            return vectors
        (out / "shards").mkdir(parents=True, exist_ok=True)

    done = _intact_shards(out, n_shards)
    todo = [s for s in range(n_shards) if s not in set(done)]
    dev = torch.device(device)
    was_training = ctx_encoder.training
    ctx_encoder.to(dev).eval()
    columns = (TextColumn("encoding passages"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("encode", total=n, completed=sum(_rows(s, shard_size, n) for s in done))
            for shard in todo:
                start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
                vectors = _encode_shard(
                    ctx_encoder,
                    store,
                    start,
                    stop,
                    batch_size,
                    dev,
                    pad_id,
                    lambda k: bar.advance(task, k),
                )
                _save_npy_atomic(_shard_path(out, shard), vectors)
                _record_shard(out, shard)
                if on_shard_done is not None:
                    on_shard_done(shard)
    finally:
        ctx_encoder.train(was_training)
    dim = np.load(_shard_path(out, 0), mmap_mode="r", allow_pickle=False).shape[1]
    return np.load(_join_shards(out, n_shards, n, dim), mmap_mode="r", allow_pickle=False)


def _rows(shard: int, shard_size: int, n: int) -> int:
    return min(n, (shard + 1) * shard_size) - shard * shard_size
