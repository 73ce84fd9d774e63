"""Fault drills: real console scripts killed, fed damaged files or bad input (README, "Reliability").

`drill_world` is one tiny trained run with its data, store, vectors and index under one root; a drill may damage
anything there, and the root is put back (byte for byte, hard links kept) after each drill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUIET = {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


@dataclass
class Proc:
    """A console script's exit status and output."""

    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


def run_script(root: Path, script: str, *args: str, timeout: int = 300, env: dict[str, str] | None = None,
               drop: tuple[str, ...] = (), max_file_bytes: int | None = None) -> Proc:
    """`script args...` as a user runs it: a subprocess in root, this checkout first on the path;
    ``max_file_bytes`` caps the size of any file it writes (RLIMIT_FSIZE: writes beyond fail like a full disk)."""
    full = {**os.environ, **QUIET, "RAG_ROOT": str(root), **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    for key in ("RAG_DEBUG", "HYDRA_FULL_ERROR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                *drop):
        if key not in (env or {}):
            full.pop(key, None)
    installed = Path(sys.executable).with_name(script)
    command = [str(installed)] if installed.is_file() else [sys.executable, "-m", f"rag_lightning.{script[4:]}"]
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.run([*command, *args], cwd=root, env=full, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if max_file_bytes else None)
    return Proc(proc.returncode, proc.stdout, proc.stderr)


def start_script(root: Path, script: str, *args: str, output: Path | None = None) -> subprocess.Popen:
    """`script args...` started in the background (to be killed); stdout and stderr go to ``output`` (else
    discarded)."""
    full = {**os.environ, **QUIET, "RAG_ROOT": str(root)}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    installed = Path(sys.executable).with_name(script)
    command = [str(installed)] if installed.is_file() else [sys.executable, "-m", f"rag_lightning.{script[4:]}"]
    sink = open(output, "w") if output else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    return subprocess.Popen([*command, *args], cwd=root, env=full, stdout=sink, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def script() -> Callable[..., Proc]:
    """``script(root, "rag-train", *args, timeout=300, env=None, drop=(), max_file_bytes=None)``: a console
    script in a subprocess."""
    return run_script


@pytest.fixture(scope="session")
def start() -> Callable[..., subprocess.Popen]:
    """``start(root, "rag-train", *args, output=None)``: a console script started in the background."""
    return start_script


@dataclass
class DrillWorld:
    """A tiny trained run: ``root`` holds data/, cache/ and run/; ``overrides`` are its rag-train overrides."""

    root: Path
    overrides: list[str]

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def index_overrides(self) -> list[str]:
        """The same data, encoder and index for rag-index (which has no `experiment` group)."""
        return ["model/question_encoder=tiny", *(o for o in self.overrides if o != "experiment=tiny")]

    def cache(self, kind: str) -> Path:
        """The one store, vectors or index directory under cache/."""
        (found,) = (self.root / "cache" / kind).iterdir()
        return found


def _copy(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # -a keeps the vectors' hard link


@pytest.fixture(scope="session")
def _drill_world(tmp_path_factory: pytest.TempPathFactory, tiny_overrides) -> Iterator[tuple[DrillWorld, Path]]:
    root = tmp_path_factory.mktemp("drills") / "world"
    root.mkdir()
    overrides = tiny_overrides(root)
    done = run_script(root, "rag-train", *overrides, f"hydra.run.dir={root / 'run'}", "export=false")
    assert done.code == 0, done.output[-4000:]
    pristine = root.parent / "pristine"
    _copy(root, pristine)
    yield DrillWorld(root, overrides), pristine


@pytest.fixture
def drill_world(_drill_world: tuple[DrillWorld, Path]) -> Iterator[DrillWorld]:
    """The drills' tiny trained run, restored after the drill whatever it damaged."""
    world, pristine = _drill_world
    yield world
    _copy(pristine, world.root)


def _files_of(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), for 'nothing was changed' checks."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _stray_temporaries(*directories: Path) -> list[str]:
    """Files left under a temporary name by an interrupted or failed write."""
    return [str(p) for d in directories for p in d.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="session")
def files_of() -> Callable[..., dict[str, bytes]]:
    """``files_of(directory, skip=())``: every file under it, relative path -> bytes."""
    return _files_of


@pytest.fixture(scope="session")
def stray_temporaries() -> Callable[..., list[str]]:
    """``stray_temporaries(*directories)``: files left under a temporary name."""
    return _stray_temporaries
