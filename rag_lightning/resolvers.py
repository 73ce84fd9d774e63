"""OmegaConf resolvers the configs use; registered on import of the package."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

# encoder kinds whose weights come from a directory or hub name the user chooses: one cache entry per source
_NAMED_KINDS = ("path", "rag")


def _first_set(*values):
    """The first value that is neither null nor empty (e.g. a resumed run's directory, else a new one)."""
    return next((v for v in values if v not in (None, "")), None)


def _encoder_tag(encoder) -> str:
    """The encoder part of the vectors' and index's directory names: the kind, and for encoders loaded from a
    path or name, 8 hex digits of where the context side comes from.

    Runs on two trained retrievers (a sweep over DPR stages, a hot-swap per seed) then keep one index each
    instead of rebuilding a shared ``<data>-path`` one in turn; the manifest still decides whether what a
    directory holds fits the weights.
    """
    kind = encoder.get("kind")
    source = _first_set(encoder.get("context_name_or_path"), encoder.get("question_name_or_path"))
    if kind not in _NAMED_KINDS or source is None:
        return kind
    where = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else str(source)
    return f"{kind}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("first_set", _first_set, replace=True)
    OmegaConf.register_new_resolver("encoder_tag", _encoder_tag, replace=True)
