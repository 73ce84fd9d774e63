"""Bad input stops a command with its message alone (file, line or key, and the fix), not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story: the config, the data, the index or the store."""
    from rag_lightning.config import ConfigError
    from rag_lightning.data.prepare_data import PrepareError
    from rag_lightning.data.readers import DataError
    from rag_lightning.retrieval.faiss_index import IndexStateError
    from rag_lightning.retrieval.store import StoreError

    return ConfigError, DataError, PrepareError, IndexStateError, StoreError, FileNotFoundError


def friendly_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one message and exit 2; RAG_DEBUG=1 shows the traceback instead."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except user_errors() as err:
            if os.environ.get("RAG_DEBUG"):
                raise
            print(f"error: {err}\n(set RAG_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
