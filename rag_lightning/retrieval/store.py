"""The corpus store: passages tokenised once, kept on disk as memory-mapped ragged arrays.

Layout of a store directory (every array is a ``.npy`` read with ``mmap_mode="r"``, no pickle)::

    manifest.json              counts, hashes, tokenizer fingerprints, build parameters
    gen_tokenizer.json         the generator tokenizer the ``gen`` tokens came from (for separators)
    {field}_values.npy         flat values of one field, for field in ids, titles, texts (uint8 utf-8),
                               gen, ctx (int32 token ids)
    {field}_offsets.npy        int64 (N + 1,): row r is values[offsets[r]:offsets[r + 1]]

``gen`` holds a passage as the generator reads it after the question: the ids of
``" " + title + title_separator + text`` without special tokens (``" " + text`` when the title is empty).
``ctx`` holds the context encoder's DPR input ``[CLS] title [SEP] text [SEP]`` truncated to ``ctx_max_length``.
Opening a store maps the files, so memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rag_lightning.data.pieces import piece_ids
from rag_lightning.errors import UserError
from rag_lightning.files import fingerprint, fingerprint_problem, remove_stale_temporaries

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FIELDS = {"ids": np.uint8, "titles": np.uint8, "texts": np.uint8, "gen": np.int32, "ctx": np.int32}
CHUNK = 2048  # passages tokenised per call: big enough for the Rust tokenizer, small enough for flat memory


class PassageLike(Protocol):
    id: str
    title: str
    text: str


class StoreError(UserError, RuntimeError):
    """A corpus store that is missing, corrupt, or built for other inputs."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's definition (vocab, merges, normalisation), ignoring call-time state.

    Truncation and padding settings are left out: transformers changes them on the backend at each call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def manifest_differences(found: Mapping[str, Any], expect: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for every expected key whose recorded value differs."""
    return [
        f"{key}: built with {found.get(key)!r}, now {value!r}"
        for key, value in expect.items()
        if found.get(key) != value
    ]


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class RaggedWriter:
    """Appends variable-length rows to a raw file, then writes ``{name}_values.npy`` and ``_offsets.npy``."""

    def __init__(self, directory: Path, name: str, dtype: Any) -> None:
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self._raw_path = directory / f"{name}_values.raw"
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 - closed in finish()
        self._offsets = array("q", [0])

    def append(self, rows: Sequence[Sequence[int] | bytes | np.ndarray]) -> None:
        arrays = [
            np.frombuffer(r, dtype=np.uint8) if isinstance(r, bytes) else np.asarray(r, dtype=self.dtype)
            for r in rows
        ]
        end = self._offsets[-1]
        for a in arrays:
            end += len(a)
            self._offsets.append(end)
        if arrays:
            self._raw.write(np.concatenate(arrays).astype(self.dtype, copy=False).tobytes())

    def finish(self) -> int:
        """Write the two ``.npy`` files; returns the number of values."""
        self._raw.close()
        total = self._offsets[-1]
        with open(self.directory / f"{self.name}_values.npy", "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_2_0(
                out, {"descr": self.dtype.str, "fortran_order": False, "shape": (total,)}
            )
            shutil.copyfileobj(raw, out, 1 << 24)
        self._raw_path.unlink()
        np.save(self.directory / f"{self.name}_offsets.npy", np.frombuffer(self._offsets, dtype=np.int64))
        return total


class Ragged:
    """Read side of a ragged array: two memory-mapped ``.npy`` files."""

    def __init__(self, directory: Path, name: str) -> None:
        self.values = np.load(directory / f"{name}_values.npy", mmap_mode="r", allow_pickle=False)
        self.offsets = np.load(directory / f"{name}_offsets.npy", mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row] : self.offsets[row + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ctx_ids(
    ctx_tokenizer: Any, titles: list[str], texts: list[str], max_length: int
) -> tuple[list[list[int]], int]:
    """DPR passage input: ``[CLS] title [SEP] text [SEP]`` (``[CLS] text [SEP]`` without a title), cut to
    ``max_length``; and how many passages were cut. Tokenised to one token more, so a cut shows as overflow;
    only those passages are tokenised again."""
    out: list[list[int]] = [[] for _ in titles]
    with_title = [i for i, t in enumerate(titles) if t]
    without = [i for i, t in enumerate(titles) if not t]

    def encode(rows: list[int], length: int) -> list[list[int]]:
        kw = {"truncation": "longest_first", "max_length": length}
        if rows and titles[rows[0]]:
            return ctx_tokenizer([titles[i] for i in rows], [texts[i] for i in rows], **kw)["input_ids"]
        return ctx_tokenizer([texts[i] for i in rows], **kw)["input_ids"] if rows else []

    cut = 0
    for rows in (with_title, without):
        ids = encode(rows, max_length + 1)
        long = [k for k, one in enumerate(ids) if len(one) > max_length]
        for k, one in zip(long, encode([rows[k] for k in long], max_length), strict=True):
            ids[k] = one
        cut += len(long)
        for i, one in zip(rows, ids, strict=True):
            out[i] = one
    return out, cut


def _check_piecewise(gen_tokenizer: Any, title_separator: str) -> None:
    """Warn when the generator tokenizer would not tokenise contexts piece by piece (not byte-level BPE)."""
    q, p = "Who wrote it?", f"A title{title_separator}Some passage text."
    joined = gen_tokenizer(f" {q} // {p}", add_special_tokens=False)["input_ids"]
    if piece_ids(gen_tokenizer, q) + piece_ids(gen_tokenizer, "//") + piece_ids(gen_tokenizer, p) != joined:
        log.warning(
            "the generator tokenizer does not tokenise contexts piece by piece; assembled contexts will "
            "differ slightly from tokenising the joined strings"
        )


class CorpusStore:
    """A prepared corpus: passage strings and both tokenisations, memory-mapped from a directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.manifest = self.read_manifest(self.dir)
        if self.manifest is None:
            raise StoreError(f"{self.dir} is not a corpus store (no readable manifest.json); rebuild it")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{self.dir} has store format {self.manifest.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; delete the directory and rebuild it"
            )
        for name, record in (self.manifest.get("files") or {}).items():
            problem = fingerprint_problem(self.dir / name, record)
            if problem:
                raise StoreError(f"{problem}: the corpus store is incomplete or corrupt; delete {self.dir} and rebuild it")
        try:
            self._fields = {name: Ragged(self.dir, name) for name in FIELDS}
        except (OSError, ValueError) as err:
            raise StoreError(f"{self.dir} is incomplete or corrupt ({err}); delete it and rebuild") from err
        n = self.manifest["passages"]
        bad = [name for name, r in self._fields.items() if len(r) != n]
        if bad:
            raise StoreError(f"{self.dir}: fields {bad} do not hold {n} passages; delete it and rebuild")
        self._row_of: dict[str, int] | None = None
        self._gen_tokenizer: Any = None

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        passages: Sequence[PassageLike],
        gen_tokenizer: Any,
        ctx_tokenizer: Any,
        out_dir: str | os.PathLike[str],
        *,
        ctx_max_length: int = 256,
        gen_max_passage_tokens: int = 256,
        title_separator: str = " / ",
        source_hash: str | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> CorpusStore:
        """Tokenise ``passages`` in chunks and write the store atomically (a killed build leaves no store).

        ``source_hash`` (e.g. the corpus file's sha256) becomes the corpus hash, else the content is hashed;
        ``source`` (path, size, mtime of the corpus file) is recorded for cheap up-to-date checks.
        """
        if title_separator != f" {title_separator.strip()} ":
            raise ValueError(f"title_separator={title_separator!r} must start and end with one space")
        if len(passages) == 0:
            raise ValueError("the corpus holds no passages; check the corpus file and its reader")
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        remove_stale_temporaries(out.parent, f".{out.name}.tmp-*")  # killed builds' (callers hold the build lock)
        tmp.mkdir()
        _check_piecewise(gen_tokenizer, title_separator)
        writers = {name: RaggedWriter(tmp, name, dtype) for name, dtype in FIELDS.items()}
        content = hashlib.sha256()
        seen: set[str] = set()
        ctx_cut = gen_cut = 0
        for chunk in _chunks(passages, CHUNK):
            ids = [str(p.id) for p in chunk]
            titles = [p.title.strip() for p in chunk]
            texts = [p.text.strip() for p in chunk]
            for pid in ids:
                if pid in seen:
                    raise ValueError(f"passage id {pid!r} occurs twice in the corpus; ids must be unique")
                seen.add(pid)
            gen_strings = [
                f" {title}{title_separator}{text}" if title else f" {text}"
                for title, text in zip(titles, texts, strict=True)
            ]
            gen = gen_tokenizer(gen_strings, add_special_tokens=False)["input_ids"]
            writers["gen"].append([g[:gen_max_passage_tokens] for g in gen])
            gen_cut += sum(len(g) > gen_max_passage_tokens for g in gen)
            ctx, cut = _ctx_ids(ctx_tokenizer, titles, texts, ctx_max_length)
            writers["ctx"].append(ctx)
            ctx_cut += cut
            for name, values in (("ids", ids), ("titles", titles), ("texts", texts)):
                writers[name].append([v.encode("utf-8") for v in values])
            for pid, title, text in zip(ids, titles, texts, strict=True):
                content.update(f"{pid}\0{title}\0{text}\n".encode())
        totals = {name: w.finish() for name, w in writers.items()}
        backend = getattr(gen_tokenizer, "backend_tokenizer", gen_tokenizer)
        (tmp / "gen_tokenizer.json").write_text(backend.to_str())
        manifest = {
            "format_version": FORMAT_VERSION,
            "passages": len(passages),
            "gen_tokens": totals["gen"],
            "ctx_tokens": totals["ctx"],
            "corpus_hash": source_hash or content.hexdigest(),
            "gen_tokenizer": tokenizer_fingerprint(gen_tokenizer),
            "ctx_tokenizer": tokenizer_fingerprint(ctx_tokenizer),
            "ctx_max_length": ctx_max_length,
            "ctx_truncated": ctx_cut,  # passages longer than ctx_max_length: the context encoder sees their start
            "gen_max_passage_tokens": gen_max_passage_tokens,
            "gen_truncated": gen_cut,  # passages longer than gen_max_passage_tokens: the generator reads their start
            "title_separator": title_separator,
            "gen_form": "' ' + title + title_separator + text, no special tokens",
            "ctx_form": "[CLS] title [SEP] text [SEP], truncated to ctx_max_length",
            "source": dict(source) if source else None,
            # size and sampled hash of every array, checked at each open (files.fingerprint_problem)
            "files": {p.name: fingerprint(p, full=False) for p in sorted(tmp.glob("*.npy"))},
        }
        _write_json_atomic(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        log.info("corpus store: %d passages written to %s", len(passages), out)
        if ctx_cut:
            log.warning(
                "%d of %d passages are longer than ctx_max_length=%d context-encoder tokens: the context encoder "
                "sees only their first %d tokens, so words past them cannot match a question in the dense index. "
                "Fix: raise model.question_encoder.ctx_max_length (up to the encoder's position limit, 512 for "
                "BERT-style encoders)",
                ctx_cut, len(passages), ctx_max_length, ctx_max_length,
            )
        if gen_cut:
            log.warning(
                "%d of %d passages are longer than index.gen_max_passage_tokens=%d generator tokens: the "
                "generator reads only their first %d. Fix: raise index.gen_max_passage_tokens (and "
                "context.max_length, which cuts question and passage together)",
                gen_cut, len(passages), gen_max_passage_tokens, gen_max_passage_tokens,
            )
        return cls(out)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> CorpusStore:
        return cls(directory)

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The manifest of a store directory, or None when there is none (or it is unreadable)."""
        try:
            return json.loads((Path(directory) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None

    # ---- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["passages"])

    @property
    def corpus_hash(self) -> str:
        return str(self.manifest["corpus_hash"])

    @property
    def title_separator(self) -> str:
        return str(self.manifest["title_separator"])

    def _string(self, field: str, row: int) -> str:
        return self._fields[field][row].tobytes().decode("utf-8")

    def passage_id(self, row: int) -> str:
        return self._string("ids", row)

    def title(self, row: int) -> str:
        return self._string("titles", row)

    def text(self, row: int) -> str:
        return self._string("texts", row)

    def row_of(self, passage_id: str) -> int:
        """Row of a passage id (the id table is built on first use)."""
        if self._row_of is None:
            self._row_of = {self.passage_id(r): r for r in range(len(self))}
        try:
            return self._row_of[passage_id]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in the corpus store {self.dir}") from None

    def gen_tokens(self, row: int) -> np.ndarray:
        """Generator ids of ``" " + title + title_separator + text`` (int32, memory-mapped view)."""
        return self._fields["gen"][row]

    def ctx_tokens(self, row: int) -> np.ndarray:
        """Context-encoder ids ``[CLS] title [SEP] text [SEP]`` (int32, memory-mapped view)."""
        return self._fields["ctx"][row]

    def ctx_lengths(self) -> np.ndarray:
        return self._fields["ctx"].lengths()

    def _gen_backend(self) -> Any:
        if self._gen_tokenizer is None:
            from tokenizers import Tokenizer

            self._gen_tokenizer = Tokenizer.from_file(str(self.dir / "gen_tokenizer.json"))
            self._gen_tokenizer.no_truncation()
            self._gen_tokenizer.no_padding()
        return self._gen_tokenizer

    def gen_piece_ids(self, text: str) -> list[int]:
        """:func:`piece_ids` with the generator tokenizer the store was built with (for separators)."""
        return list(self._gen_backend().encode(" " + text.strip(), add_special_tokens=False).ids)

    def gen_token_id(self, token: str) -> int | None:
        """Id of a (special) token in the store's generator tokenizer, None if it has none."""
        return self._gen_backend().token_to_id(token)
