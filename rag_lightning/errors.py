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

from omegaconf.errors import MissingMandatoryValue

DEBUG_HINT = "(set RAG_DEBUG=1 for the traceback)"


class UserError(Exception):
    """Something the user can fix: the message names the file, line or key, and what to do."""


class AbortingError(UserError):
    """A user error after which this process cannot shut down cleanly (a DDP process group whose peer died:
    tearing it down at interpreter exit can crash, turning exit status 2 into a segfault): the message is
    printed and the process ends at once, after flushing its output."""


def user_message(err: BaseException) -> str:
    """The one message a user sees for a user error."""
    key = getattr(err, "full_key", None)
    if isinstance(err, MissingMandatoryValue) and key:  # a `???` value nobody set
        return f"{key} is not set. Fix: pass {key}=<value> on the command line"
    return str(err)


def exit_with(message: str) -> None:
    print(f"error: {message}\n{DEBUG_HINT}", file=sys.stderr)
    raise SystemExit(2) from None


def friendly_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one message and exit 2; RAG_DEBUG=1 shows the traceback instead."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (UserError, FileNotFoundError, MissingMandatoryValue) as err:
            if os.environ.get("RAG_DEBUG"):
                raise
            if isinstance(err, AbortingError):
                print(f"error: {user_message(err)}\n{DEBUG_HINT}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(2)
            exit_with(user_message(err))

    return wrapper


def composition_message(err: BaseException) -> str:
    """Hydra's message for a command line that does not compose, without the config search path."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:  # an override of a key that is not there
        return f"{key} is not a config key (misspelt?). Fix: check the spelling; --cfg job prints the composed config"
    return str(err).split("\nConfig search path:")[0].strip()


def friendly_hydra_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Around a ``@hydra.main`` function: a command line that does not compose (a misspelt key, an unknown
    group option, an override that does not parse) stops like any user error, one message and exit status 2,
    where Hydra alone would exit with 1. RAG_DEBUG=1 or HYDRA_FULL_ERROR=1 shows the traceback instead."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hydra.errors import ConfigCompositionException, OverrideParseException

        before = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting with status 1
        try:
            return main(*args, **kwargs)
        except (ConfigCompositionException, OverrideParseException) as err:
            if os.environ.get("RAG_DEBUG") or before == "1":
                raise
            exit_with(composition_message(err))
        finally:
            if before is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = before

    return wrapper
