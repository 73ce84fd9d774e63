"""File helpers every layer uses: checksums of large files, and writes that never leave half a file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    """sha256 of a file read in chunks (corpus files and indexes can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` under a temporary name, fsync, then rename: a reader sees the old file or the new one."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` under a temporary name, fsync, then rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 4096


def sampled_sha256(path: str | os.PathLike[str], blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BYTES) -> str:
    """sha256 of a file's size and of `blocks` blocks spread evenly over it (the first and last included).

    Cheap enough to check on every use of a multi-GB file, and it catches truncation, a file grown or
    overwritten in large runs (zeros over megabytes); a full :func:`sha256_file` catches the rest.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= blocks * block:
            digest.update(f.read())
        else:
            for i in range(blocks):
                f.seek((size - block) * i // (blocks - 1))
                digest.update(f.read(block))
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike[str], full: bool = True) -> dict[str, Any]:
    """What a manifest records of a file a later stage trusts: size, sampled hash and (``full``) sha256."""
    record: dict[str, Any] = {"bytes": os.path.getsize(path), "sampled_sha256": sampled_sha256(path)}
    if full:
        record["sha256"] = sha256_file(path)
    return record


def fingerprint_problem(path: str | os.PathLike[str], record: dict[str, Any] | None, full: bool = False) -> str | None:
    """Why ``path`` no longer matches its recorded :func:`fingerprint` (None: it matches, or nothing was
    recorded). Size and sampled hash always; the full sha256 when ``full`` and recorded."""
    if not record:
        return None
    p = Path(path)
    if not p.is_file():
        return f"{p} is missing"
    size = p.stat().st_size
    if size != record.get("bytes"):
        return f"{p} is {size} bytes, {record.get('bytes')} were written (truncated or overwritten)"
    if record.get("sampled_sha256") and sampled_sha256(p) != record["sampled_sha256"]:
        return f"{p} does not match its recorded sampled sha256 (its content changed since it was written)"
    if full and record.get("sha256") and sha256_file(p) != record["sha256"]:
        return f"{p} does not match its recorded sha256 (its content changed since it was written)"
    return None


def remove_stale_temporaries(directory: str | os.PathLike[str], pattern: str = "*.tmp*") -> list[Path]:
    """Delete what a killed writer left under a temporary name in ``directory`` (call it while holding the
    lock that serialises the writers); returns what was removed."""
    import shutil

    removed = []
    for path in Path(directory).glob(pattern):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
