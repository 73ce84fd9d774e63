"""Resuming a run in place (`rag-train run_dir=<run> ckpt_path=last`), checked before anything is written.

Hydra writes `<run>/.hydra/` as soon as a job starts, so the checks run before Hydra does: the run directory
holds `config_resolved.yaml`, the checkpoint exists and loads (a truncated `last.ckpt` stops here with the
run's other checkpoints named), and the command line is rebuilt as the run's own overrides with the ones given
on the resume line on top (a resume line says only what changes). Should the resumed job still stop on a user
error before training (a checkpoint that does not fit the model, say), the run's `.hydra/` and
`config_resolved.yaml` are put back as they were.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_lightning.errors import UserError

RESOLVED_CONFIG = "config_resolved.yaml"
# overrides of the saved run that the resume line decides (where the run is, what it resumes from)
DROPPED = ("run_dir", "ckpt_path", "hydra.run.dir")
MULTIRUN_FLAGS = ("-m", "--multirun")


class ResumeError(UserError):
    """A resume that cannot start: no run, no checkpoint, or a checkpoint that does not load."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def checkpoint_problem(path: Path) -> str | None:
    """Why a Lightning checkpoint cannot be read (truncated, not a checkpoint), or None when it loads."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        return f"{path} cannot be read: {str(err).splitlines()[0]} (truncated or corrupt)"
    if not isinstance(state, dict) or "state_dict" not in state:
        return f"{path} is not a Lightning checkpoint (no state_dict)"
    return None


def others(path: Path) -> str:
    """The other checkpoints beside ``path``, for the fix of a message."""
    found = sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name)
    return ", ".join(found) if found else "none"


@dataclass
class Snapshot:
    """The files of a run's record as they were before a resume, to put back if it stops on a user error."""

    files: dict[Path, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Path) -> Snapshot:
        paths = [run / RESOLVED_CONFIG, *sorted((run / ".hydra").glob("*"))]
        return cls({p: p.read_bytes() for p in paths if p.is_file()})

    def restore(self) -> None:
        from rag_lightning.files import write_bytes_atomic

        for path, data in self.files.items():
            if not path.is_file() or path.read_bytes() != data:
                write_bytes_atomic(path, data)


def prepare(argv: list[str]) -> tuple[list[str], Snapshot | None]:
    """``argv`` of a `rag-train` command; when it resumes a run (run_dir= and ckpt_path= given), the checked
    command line to run instead, and the snapshot of the run's record. Other command lines come back as they
    are."""
    args = argv[1:]
    given = {_key(a): a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("-")}
    if "run_dir" not in given or given.get("ckpt_path") in (None, "", "null") or any(f in args for f in MULTIRUN_FLAGS):
        return argv, None
    run = Path(given["run_dir"])
    saved = run / RESOLVED_CONFIG
    if not saved.is_file():
        raise ResumeError(
            f"run_dir={run}: no {RESOLVED_CONFIG} there, so it is not a rag-train run directory. Fix: pass the "
            "directory a run printed (`run directory: ...`), e.g. run_dir=outputs/runs/train/<date>_<time>"
        )
    ckpt = run / "checkpoints" / "last.ckpt" if given["ckpt_path"] == "last" else Path(given["ckpt_path"])
    if not ckpt.is_file():
        raise ResumeError(
            f"ckpt_path={given['ckpt_path']}: no checkpoint {ckpt}. Checkpoints of the run: "
            f"{others(run / 'checkpoints' / 'last.ckpt')}; pass one with ckpt_path=<run>/checkpoints/<name>"
        )
    problem = checkpoint_problem(ckpt)
    if problem:
        raise ResumeError(
            f"{problem}. Nothing was written to {run}. Fix: resume from another checkpoint of the run "
            f"(ckpt_path={ckpt.parent}/<name>; there: {others(ckpt)}), or start the run again"
        )
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(saved).get("hydra_overrides") or []
    keys = {_key(a) for a in args if "=" in a} | set(DROPPED)
    kept = [str(o) for o in recorded if _key(str(o)) not in keys]
    return [argv[0], *kept, *args], Snapshot.of(run)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, file too large); the previous ones are intact."""


def _checkpoint_io() -> type:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's checkpoint writer, atomically: a temporary name, fsync, rename. Lightning alone truncates
        `last.ckpt` before writing it again, so a full disk or a kill mid-write leaves no usable checkpoint."""

        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            import errno
            import os
            import shutil

            import torch

            if "://" in str(path):  # remote storage: Lightning's own writer
                return super().save_checkpoint(checkpoint, path, storage_options)
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            from rag_lightning.files import remove_stale_temporaries

            remove_stale_temporaries(target.parent, f".{target.name}.tmp-*")  # a killed write's
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except (OSError, RuntimeError) as err:  # torch.save turns a failed write into a RuntimeError
                tmp.unlink(missing_ok=True)
                cause: BaseException | None = err
                while cause is not None and not isinstance(cause, OSError):
                    cause = cause.__context__
                if not isinstance(cause, OSError) or cause.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
                free = shutil.disk_usage(target.parent).free / 2**30
                raise CheckpointWriteError(
                    f"cannot write the checkpoint {target}: {cause.strerror} (the disk of {target.parent}, "
                    f"{free:.1f} GiB free, or a file size limit). The checkpoints written before are intact. Fix: "
                    f"free space, then resume: rag-train run_dir={target.parent.parent} ckpt_path=last"
                ) from err
            return None

    return AtomicCheckpointIO


def atomic_checkpoint_io() -> Any:
    """A Lightning CheckpointIO plugin that writes checkpoints atomically (see ``_checkpoint_io``)."""
    return _checkpoint_io()()
