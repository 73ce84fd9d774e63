"""OmegaConf resolvers the configs use; registered on import of the package."""

from __future__ import annotations

from omegaconf import OmegaConf


def _first_set(*values):
    """The first value that is neither null nor empty (e.g. a resumed run's directory, else a new one)."""
    return next((v for v in values if v not in (None, "")), None)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("first_set", _first_set, replace=True)
