"""Drills: damaged passage vectors, shards, store arrays and index files are named and rebuilt or refused
with a rebuild command that works; never indexed, never a traceback, never silently wrong results."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_bytes_written_over_the_vectors_are_found_and_the_index_rebuilt(drill_world, script, stray_temporaries):
    """Random bytes over part of vectors.npy (the encoder's and the index's: one hard-linked file) used to give
    "up to date" and an index over garbage; rag-index now names the file and encodes the corpus again."""
    vectors = drill_world.cache("vectors") / "vectors.npy"
    good = np.load(vectors).copy()
    overwrite(vectors, 300, np.random.default_rng(0).bytes(1500))
    assert not np.array_equal(np.load(vectors), good)
    done = script(drill_world.root, "rag-index", *drill_world.index_overrides)
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "does not match its recorded sampled sha256" in done.output and str(drill_world.cache("indexes")) in done.output
    assert "encoding the corpus again" in done.output
    np.testing.assert_array_equal(np.load(drill_world.cache("indexes") / "vectors.npy"), good)
    np.testing.assert_array_equal(np.load(vectors), good)
    assert not stray_temporaries(drill_world.root / "cache")


def test_a_truncated_vectors_file_is_rebuilt_by_rag_eval_not_a_traceback(drill_world, script, tmp_path):
    """`mmap length is greater than file size` came out of rag-eval as a traceback."""
    vectors = drill_world.cache("vectors") / "vectors.npy"
    good = np.load(vectors).copy()
    truncate(vectors, 1000)
    done = script(drill_world.root, "rag-eval", f"ckpt_path={drill_world.run / 'checkpoints' / 'last.ckpt'}",
                  "accelerator=cpu", f"hydra.run.dir={tmp_path / 'eval'}")
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "1000 bytes" in done.output and "vectors.npy" in done.output
    np.testing.assert_array_equal(np.load(drill_world.cache("indexes") / "vectors.npy"), good)


def test_a_corrupt_index_file_is_refused_and_the_command_named_rebuilds_it(drill_world, script, tmp_path):
    """Same size, other bytes, between the blocks the cheap check samples (a large file's case, made here by
    recording the damaged file's sampled hash): rag-eval refuses it by its whole sha256 and names a rebuild
    command; that command, run as printed, rebuilds the index (it used to say "up to date"), and rag-eval
    works again."""
    from rag_lightning.files import sampled_sha256

    index_file = drill_world.cache("indexes") / "index.faiss"
    size = index_file.stat().st_size
    overwrite(index_file, size // 2, bytes(64))
    manifest_path = index_file.with_name("index_manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "index_sampled_sha256": sampled_sha256(index_file)}))
    ckpt = f"ckpt_path={drill_world.run / 'checkpoints' / 'last.ckpt'}"
    refused = script(drill_world.root, "rag-eval", ckpt, "accelerator=cpu", f"hydra.run.dir={tmp_path / 'e1'}")
    assert refused.code == 2 and "Traceback" not in refused.output, refused.output[-3000:]
    (message,) = [line for line in refused.err.splitlines() if line.startswith("error: ")]
    assert str(index_file) in message and "sha256" in message
    command = shlex.split(message.split("Rebuild it with: ")[1].split("   (or delete")[0])
    assert command[0] == "rag-index" and not any(a.startswith("ckpt_path") for a in command)
    rebuilt = script(drill_world.root, *command)
    assert rebuilt.code == 0, rebuilt.output[-3000:]
    assert "rebuilding the FAISS index" in rebuilt.output
    again = script(drill_world.root, "rag-eval", ckpt, "accelerator=cpu", f"hydra.run.dir={tmp_path / 'e2'}")
    assert again.code == 0, again.output[-3000:]
    first = json.loads((drill_world.run / "metrics.json").read_text())
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["test/em"] == pytest.approx(first["test/em"])


def test_a_damaged_store_array_is_rebuilt(drill_world, script):
    store = drill_world.cache("stores")
    values = store / "gen_values.npy"
    good = values.read_bytes()
    truncate(values, len(good) - 8)
    done = script(drill_world.root, "rag-index", *drill_world.index_overrides)
    assert done.code == 0 and "Traceback" not in done.output, done.output[-3000:]
    assert "rebuilding the corpus store" in done.output and "gen_values.npy" in done.output
    assert values.read_bytes() == good


def test_a_truncated_shard_is_encoded_again_on_resume(tmp_path, synthetic_passages, make_gen_tokenizer, ctx_tokenizer):
    """Encoding killed after two shards, one of them then truncated: the rerun names it, encodes it again (it
    used to fail on every rerun), and ends with the vectors of an uninterrupted run."""
    from rag_lightning.config import QuestionEncoderConfig
    from rag_lightning.models.encoders import build_context_encoder
    from rag_lightning.retrieval.encode import encode_passages
    from rag_lightning.retrieval.store import CorpusStore

    store = CorpusStore.build(synthetic_passages(30), make_gen_tokenizer(tmp_path / "tok"), ctx_tokenizer(),
                              tmp_path / "store")
    encoder = build_context_encoder(QuestionEncoderConfig(kind="tiny"))
    whole = np.asarray(encode_passages(encoder, store, tmp_path / "a", shard_size=8, progress=False)).copy()

    def kill_after_second(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_passages(encoder, store, tmp_path / "b", shard_size=8, progress=False, on_shard_done=kill_after_second)
    shard = tmp_path / "b" / "shards" / "shard_00000.npy"
    truncate(shard, shard.stat().st_size // 2)
    again: list[int] = []
    resumed = encode_passages(encoder, store, tmp_path / "b", shard_size=8, progress=False, on_shard_done=again.append)
    assert again == [0, 2, 3]  # the damaged shard and the two never written
    np.testing.assert_array_equal(np.asarray(resumed), whole)


def test_what_killed_writers_left_under_temporary_names_is_cleared(drill_world, script, stray_temporaries):
    """A kill -9 mid-write leaves a temporary file (the real one is only ever replaced by rename); the next
    build under the same lock clears them: no stray .tmp files pile up in the cache."""
    vectors_dir, index_dir = drill_world.cache("vectors"), drill_world.cache("indexes")
    (vectors_dir / "shards").mkdir(exist_ok=True)
    planted = [vectors_dir / "vectors.npy.tmp", vectors_dir / "shards" / "shard_00000.npy.tmp",
               index_dir / "index.faiss.tmp", index_dir / "index_manifest.json.tmp"]
    for path in planted:
        path.write_bytes(b"half a file")
    (vectors_dir / "vectors.npy").unlink()  # the encoder's copy gone: the index rebuild re-encodes
    (index_dir / "index_manifest.json").unlink()
    done = script(drill_world.root, "rag-index", *drill_world.index_overrides)
    assert done.code == 0, done.output[-3000:]
    assert not stray_temporaries(drill_world.root / "cache")
