"""Lightning DDP inside Hydra jobs, sweeps included: each job's ranks 1..N-1 re-run exactly that job, once.

Lightning 2.6's subprocess launcher starts ranks 1..N-1 by re-running the command line (``sys.argv``) with
``hydra.run.dir=<hydra.run.dir>`` appended (``_hydra_subprocess_cmd``). Under ``-m`` (or a config that sets
``hydra.mode=MULTIRUN``, as ``hparams_search=optuna`` does) every child then runs the whole sweep again, and in
a directory computed from ``hydra.run.dir`` instead of the job's. Inside a joblib worker ``sys.argv`` is not even
the user's command. Upstream fixes (Lightning PR #11617, reverted; PR #18175, open) are not in 2.6.

:class:`HydraDDPStrategy` (the strategy of ``trainer=ddp`` / ``trainer=ddp_cpu``) swaps that command for one
that re-runs this job only, in run mode, in this job's directory::

    python -m <the stage's module> --config-name=<name> <this job's overrides> hydra.mode=RUN
        hydra.run.dir=<this job's output dir> hydra.output_subdir=null hydra.job.name=<name>_ddp_rank<r>
        [hydra.sweep.dir=<the sweep's dir>]            # under a sweep: wandb grouping sees the same sweep

It also cleans up after an earlier DDP job of the same process (the basic launcher runs a sweep's jobs one after
another in one process, a joblib worker runs several): it waits for that job's children, destroys its process
group and restores the ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` / ``NODE_RANK`` variables the launcher
exported; else the next job would find ``LOCAL_RANK`` set, take the processes for externally created (torchrun
style) and wait forever for ranks that never start.

Processes created by the cluster (SLURM ``srun``, ``torchrun``) are left alone: Lightning detects them and launches
nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

log = logging.getLogger(__name__)

LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
CHILD_EXIT_TIMEOUT_S = 300
# the stages that train under DDP, by root config: the module their child ranks run, the command users type
STAGES = {
    "train": ("rag_lightning.train", "rag-train"),
    "train_retriever": ("rag_lightning.train_retriever", "rag-train-retriever"),
}
# what the last job of this process that launched children left behind: env before launch, children
_previous_launch: dict[str, Any] = {}


def _quote(value: str) -> str:
    """A Hydra override value quoted, so paths with spaces, commas or '=' stay one string."""
    return f"'{value}'" if "'" not in value else f'"{value}"'


def hydra_job_command(
    *,
    overrides: Sequence[str],
    output_dir: str,
    config_name: str | None,
    config_dirs: Sequence[str] = (),
    job_name: str,
    rank: int,
    sweep_dir: str | None = None,
    entry: Sequence[str] = ("-m", "rag_lightning.train"),
) -> list[str]:
    """The command that runs one Hydra job again, in run mode, writing into ``output_dir``."""
    command = [sys.executable, *entry]
    if config_name:
        command.append(f"--config-name={config_name}")
    command += [f"--config-dir={d}" for d in config_dirs]
    command += list(overrides)
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(output_dir)}",
        "hydra.output_subdir=null",  # the job's .hydra/ is rank 0's
        f"hydra.job.name={job_name}_ddp_rank{rank}",  # its own log file: <output_dir>/<job>_ddp_rank<r>.log
    ]
    if sweep_dir is not None:
        command.append(f"hydra.sweep.dir={_quote(sweep_dir)}")
    return command


def stage_of(config_name: str | None) -> tuple[str, str]:
    """(module, command) of the stage whose root config is ``config_name`` (rag-train's when unknown)."""
    return STAGES.get(config_name or "train", STAGES["train"])


def current_job_command(rank: int, entry_module: str | None) -> tuple[list[str], str]:
    """:func:`hydra_job_command` for the running Hydra job, and the directory to start it in. ``entry_module``
    "auto": the module of the job's stage (by its root config); None: the running script."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if entry_module == "auto":
        entry_module = stage_of(hc.job.config_name)[0]
    if entry_module:
        entry: list[str] = ["-m", entry_module]
    else:  # Lightning's rule: the running script
        import __main__

        spec = getattr(__main__, "__spec__", None)
        entry = ["-m", spec.name] if spec is not None else [os.path.abspath(sys.argv[0])]
    config_dirs = [str(s.path) for s in hc.runtime.config_sources if s.provider == "command-line"]
    command = hydra_job_command(
        overrides=list(hc.overrides.task),
        output_dir=str(hc.runtime.output_dir),
        config_name=hc.job.config_name,
        config_dirs=config_dirs,
        job_name=str(hc.job.name),
        rank=rank,
        sweep_dir=os.path.abspath(str(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None,
        entry=entry,
    )
    return command, str(hc.runtime.cwd)


def forget_previous_launch() -> None:
    """Undo what an earlier DDP job of this process left behind (see the module docstring)."""
    if not _previous_launch:
        return
    for proc in _previous_launch.get("procs", []):
        try:
            proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("DDP child %d of the previous job did not exit; terminating it", proc.pid)
            proc.kill()
            proc.wait()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _previous_launch.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _previous_launch.clear()


class RankWatch(_ChildProcessObserver):
    """Lightning's watch over the child ranks (every 5 s; a dead rank gets the whole job killed so no rank hangs
    in a collective), ending with a message and exit status 2 instead of a silent SIGKILL of rank 0."""

    def __init__(self, *args: Any, output_dir: str | None = None, command: str = "rag-train", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_dir, self.command = output_dir, command

    def _terminate_all(self) -> None:
        dead = [(i + 1, p.pid, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode]
        for proc in self._child_processes:
            proc.send_signal(self._termination_signal)
        where = self.output_dir or "<the run directory>"
        ranks = ", ".join(f"rank {rank} (pid {pid}) ended with {code}" for rank, pid, code in dead)
        print(
            f"error: a DDP process of this job stopped: {ranks}; the job stops (no rank is left waiting). The "
            f"checkpoints written before are intact. Fix: see the ranks' logs ({where}/*.log), then resume: "
            f"{self.command} run_dir={where} ckpt_path=last",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with children that re-run the current Hydra job only, and a watch over
    them that ends the job with a message when one dies (:class:`RankWatch`)."""

    def __init__(self, *args: Any, entry_module: str | None = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        """Lightning's launch (lightning/pytorch/strategies/launchers/subprocess_script.py) with RankWatch."""
        from hydra.core.hydra_config import HydraConfig
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            hydra = HydraConfig.get() if HydraConfig.initialized() else None
            output_dir = str(hydra.runtime.output_dir) if hydra is not None else None
            command = stage_of(hydra.job.config_name if hydra is not None else None)[1]
            RankWatch(main_pid=os.getpid(), child_processes=self.procs, output_dir=output_dir, command=command).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        env_before = {key: os.environ.get(key) for key in LAUNCH_ENV}
        if not HydraConfig.initialized():  # not a Hydra job: Lightning's own command (sys.argv)
            super()._call_children_scripts()
        else:
            node_rank = self.cluster_environment.node_rank()

            def command(local_rank: int) -> tuple[list[str], str]:
                return current_job_command(node_rank * self.num_processes + local_rank, self.entry_module)

            with _replaced(subprocess_script, "_hydra_subprocess_cmd", command):
                super()._call_children_scripts()
        _previous_launch.update(env=env_before, procs=list(self.procs))


class _replaced:
    """Swap a module attribute for the duration of a block (Lightning builds the child command inline)."""

    def __init__(self, module: Any, name: str, value: Callable) -> None:
        if not hasattr(module, name):
            raise RuntimeError(
                f"{module.__name__}.{name} is gone: this Lightning version launches DDP children differently; "
                "update rag_lightning/ddp.py"
            )
        self.module, self.name, self.value = module, name, value

    def __enter__(self) -> None:
        self.saved = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)

    def __exit__(self, *exc: object) -> None:
        setattr(self.module, self.name, self.saved)


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for Hydra jobs and sweeps; ``entry_module`` is what the children run with ``python -m``
    ("auto": the module of the job's stage, :data:`STAGES`; None: the running script, as Lightning does)."""

    def __init__(self, *args: Any, entry_module: str | None = "auto", **kwargs: Any) -> None:
        forget_previous_launch()
        super().__init__(*args, **kwargs)
        self.entry_module = entry_module

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = HydraJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, entry_module=self.entry_module
            )
