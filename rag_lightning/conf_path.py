"""Locate the Hydra config directory in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The `conf/` of a source checkout (editable installs), else the copy shipped in the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "paths").is_dir():
            return str(candidate)
    raise FileNotFoundError(f"no Hydra config directory found next to {here}; reinstall rag_lightning")


CONFIG_DIR = config_dir()
