"""Bad input stops a command with its message alone (file, line or key, and the fix), not a traceback.

Every error a user can fix (config, data, prepare, index state, store) derives from :class:`UserError`, so
this module depends on nothing else of ours and the entry points catch one family.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Something the user can fix: the message names the file, line or key, and what to do."""


def friendly_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one message and exit 2; RAG_DEBUG=1 shows the traceback instead."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (UserError, FileNotFoundError) as err:
            if os.environ.get("RAG_DEBUG"):
                raise
            print(f"error: {err}\n(set RAG_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
