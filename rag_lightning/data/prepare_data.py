"""Make sure the data a run names is there before any model is built.

``data.build: world`` builds the embedded world set into ``data.dir`` when it is missing or its manifest
was made from other options or package versions; otherwise the existing manifest is returned at once.
``data.build: null`` is users' data: every named file must exist (errors name the config key), and the
generator tokenizer is trained from the corpus when ``data.tokenizer.train_if_missing`` is true.

Call it from one process (rank 0, e.g. Lightning's ``prepare_data``): builds write to a temporary
directory and move it into place, so a reader never sees half a build, but two builders would duplicate work.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rag_lightning.config import DataConfig, WorldOptions
from rag_lightning.data.gen_tokenizer import train_generator_tokenizer
from rag_lightning.data.readers import ReadReport, iter_corpus, iter_qa
from rag_lightning.errors import UserError
from rag_lightning.files import write_json_atomic

T = TypeVar("T")
log = logging.getLogger(__name__)

# what the world builder writes into data.dir (the builder itself, and the packages it reads facts from,
# are imported only when the world set is built: users' data needs none of them)
WORLD_FILE_KEYS = {
    "corpus_file": "corpus.jsonl",
    "train_file": "train.jsonl",
    "val_file": "val.jsonl",
    "test_file": "test.jsonl",
    "generator_tokenizer": "generator_tokenizer",
}
# the world's further test splits, named in data.extra_test_files (conf/data/world.yaml): test_seen = train
# entities in the phrasing train never uses; test_paraphrase = the test facts in phrasings written apart from
# the templates (data/world_paraphrases.py)
WORLD_EXTRA_TEST_FILES = {"test_seen": "test_seen.jsonl", "test_paraphrase": "test_paraphrase.jsonl"}
WORLD_MANIFEST = "manifest.json"
USER_FILE_KEYS = ("corpus_file", "train_file", "val_file", "test_file")
WORLD_BUILDER = "rag_lightning.data.world"  # the manifest's "builder": whose directory this is
TRAINED_FROM = "trained_from.json"  # beside a tokenizer we trained for users' data: what it was trained on


class PrepareError(UserError, ValueError):
    """The data config cannot be satisfied; the message names the config key and what to do."""


def ensure_prepared(data: DataConfig, *, validate: bool = False) -> dict[str, Any]:
    """Build or check the data named by the `data` section; returns its manifest.

    ``validate`` also reads users' files through the readers (honouring ``data.skip_bad_rows``) and
    adds their row counts; ``rag-prepare`` does this, training runs skip it for speed.
    """
    if data.build == "world":
        return _ensure_world(data)
    if data.build == "world_counterfactual":
        from rag_lightning.data.world_counterfactual import ensure_counterfactual

        return ensure_counterfactual(data)
    if data.build is None:
        return _ensure_user_data(data, validate)
    raise PrepareError(
        f"data.build={data.build!r} is unknown. Fix: use data.build=world (or world_counterfactual), or null for "
        "your own files"
    )


# ----------------------------------------------------------------------------- the world set


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / WORLD_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(manifest: dict[str, Any] | None, key: str, out_dir: Path) -> bool:
    if not manifest or manifest.get("build_key") != key:
        return False
    return all((out_dir / name).is_file() for name in manifest.get("files", {}))


def _check_world_options(options: WorldOptions) -> None:
    from rag_lightning.data.world_templates import QUESTIONS

    most = min(len(p) for p in QUESTIONS.values()) - 1  # the last phrasing is test_seen's
    if not 1 <= options.train_phrasings <= most:
        raise PrepareError(
            f"data.world.train_phrasings={options.train_phrasings} must be between 1 and {most} "
            "(the training phrasings each relation has)"
        )


def _ensure_world(cfg: DataConfig) -> dict[str, Any]:
    out_dir = Path(cfg.dir)
    options = cfg.world
    _check_world_options(options)
    from rag_lightning.data import world

    key = world.build_key(options)
    manifest = read_manifest(out_dir)
    status = "reused"
    if not _is_current(manifest, key, out_dir):
        reason = "missing" if manifest is None else "built from other options or package versions"
        log.info("building the world data set into %s (%s)", out_dir, reason)
        manifest = _build_world_atomically(out_dir, options)
        status = "built"
    _check_world_paths(cfg, out_dir)
    return {**manifest, "dir": str(out_dir.resolve()), "status": status}


def _build_world_atomically(out_dir: Path, options: WorldOptions) -> dict[str, Any]:
    previous = read_manifest(out_dir) or {}
    if out_dir.exists() and any(out_dir.iterdir()) and previous.get("builder") != WORLD_BUILDER:
        # never delete a directory the builder did not write
        raise PrepareError(
            f"data.dir={out_dir} is not empty and holds no world manifest. "
            "Fix: point data.dir at a new or empty directory"
        )
    from rag_lightning.data import world

    return build_directory_atomically(out_dir, lambda tmp: world.build_world(tmp, options))


def build_directory_atomically(out_dir: Path, build: Callable[[Path], T]) -> T:
    """``build`` writes a whole directory beside ``out_dir``, which replaces it only once complete: an
    interrupted build leaves the previous directory (or none) in place, never half a data set."""
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = build(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _check_world_paths(cfg: DataConfig, out_dir: Path) -> None:
    """The trainer reads data.*_file; they must name what the builder wrote."""
    for key, name in WORLD_FILE_KEYS.items():
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            raise PrepareError(
                f"data.{key}={value} does not exist after building the world set into data.dir={out_dir}. "
                f"Fix: leave data.{key} at its default (${{data.dir}}/{name})"
            )
    for split, name in WORLD_EXTRA_TEST_FILES.items():
        value = cfg.extra_test_files.get(split)
        if value is not None and not Path(value).exists():
            raise PrepareError(
                f"data.extra_test_files.{split}={value} does not exist after building the world set into "
                f"data.dir={out_dir}. Fix: leave it at its default (${{data.dir}}/{name}), or set it to null"
            )


def world_test_file(data: DataConfig, split: str) -> str | None:
    """The file of a test split: the one the data config names, else, for the world set, the file the builder
    writes for it (a run trained before ``test_paraphrase`` existed is still evaluated on it by rag-eval)."""
    named = data.test_files().get(split)
    if named or data.build != "world" or split not in WORLD_EXTRA_TEST_FILES:
        return named
    return str(Path(data.dir) / WORLD_EXTRA_TEST_FILES[split])


# ----------------------------------------------------------------------------- users' data


def _user_files(cfg: DataConfig) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for key in USER_FILE_KEYS:
        value = getattr(cfg, key)
        if value is None and key in ("corpus_file", "train_file"):
            raise PrepareError(f"data.{key} is null but required. Fix: pass data.{key}=...")
        if value is not None:
            files[key] = Path(value)
    for group in ("extra_test_files", "extra_train_files"):
        for name, value in getattr(cfg, group).items():
            if value is not None:
                files[f"{group}.{name}"] = Path(value)
    for key, path in files.items():
        if not path.is_file():
            raise PrepareError(
                f"data.{key}={path}: file not found. Fix: check the path (relative paths start where rag-* runs)"
            )
    return files


def _ensure_user_data(cfg: DataConfig, validate: bool) -> dict[str, Any]:
    files = _user_files(cfg)
    skip = cfg.skip_bad_rows
    manifest: dict[str, Any] = {
        "builder": None,
        "files": {key: str(path) for key, path in files.items()},
        "generator_tokenizer": _ensure_user_tokenizer(cfg, files, skip),
    }
    if validate:
        manifest["counts"] = {key: _count(key, path, skip) for key, path in files.items()}
    return manifest


def _count(key: str, path: Path, skip_bad_rows: bool) -> dict[str, int]:
    report = ReadReport(path=str(path))
    rows: Iterator[Any] = (iter_corpus if key == "corpus_file" else iter_qa)(
        path, skip_bad_rows=skip_bad_rows, report=report
    )
    for _ in rows:
        pass
    return {"rows": report.rows, "skipped": report.skipped}


def _fingerprint(path: Path) -> dict[str, Any]:
    """Cheap identity of a possibly huge file: hashing 13 GB of DPR passages on every run is not."""
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _ensure_user_tokenizer(cfg: DataConfig, files: dict[str, Path], skip_bad_rows: bool) -> str | None:
    if cfg.generator_tokenizer is None:
        return None  # the generator brings its own tokenizer (a pretrained BART)
    tok_dir = Path(cfg.generator_tokenizer)
    opts = cfg.tokenizer
    wanted = {
        "corpus": _fingerprint(files["corpus_file"]),
        "train": _fingerprint(files["train_file"]),
        "vocab_size": opts.vocab_size,
        "max_passages": opts.max_passages,
    }
    trained_from = tok_dir / TRAINED_FROM
    if (tok_dir / "tokenizer.json").is_file():
        if not trained_from.is_file():
            return str(tok_dir)  # the user's own tokenizer: used as it is
        if json.loads(trained_from.read_text(encoding="utf-8")) == wanted:
            return str(tok_dir)
        log.info(
            "retraining the generator tokenizer in %s: its corpus, train file or options changed", tok_dir
        )
    elif not opts.train_if_missing:
        raise PrepareError(
            f"data.generator_tokenizer={tok_dir} has no tokenizer.json. Fix: point it at a tokenizer directory, "
            "set data.tokenizer.train_if_missing=true to train one from the corpus, or set it to null to use "
            "the pretrained generator's own tokenizer"
        )
    passages = iter_corpus(files["corpus_file"], skip_bad_rows=skip_bad_rows)
    questions = iter_qa(files["train_file"], skip_bad_rows=skip_bad_rows)
    texts = itertools.chain(
        (t for p in itertools.islice(passages, wanted["max_passages"]) for t in (p.title, p.text)),
        (q.question for q in questions),
    )
    log.info("training a generator tokenizer (vocab %d) into %s", wanted["vocab_size"], tok_dir)
    train_generator_tokenizer(texts, tok_dir, vocab_size=wanted["vocab_size"])
    write_json_atomic(trained_from, wanted)
    return str(tok_dir)
