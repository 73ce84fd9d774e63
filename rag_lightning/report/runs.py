"""Reading run directories: which paths are runs, and what each run wrote (metrics, config, overrides, curves,
predictions). Only files: nothing here builds a model or imports torch."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rag_lightning.errors import UserError

RESOLVED_CONFIG = "config_resolved.yaml"  # what rag-train writes (rag_lightning.pipeline.RESOLVED_CONFIG)
DEFAULT_OBJECTIVE = "val/em"
# metrics that get better as they fall
_LOWER_IS_BETTER = ("loss", "nll", "time", "perplexity", "entropy")


class ReportError(UserError):
    """A path rag-report cannot read as a run or a sweep; the message names it."""


@dataclass
class Run:
    """What one run directory holds."""

    dir: Path
    name: str
    metrics: dict[str, float]
    config: dict[str, Any]
    overrides: list[str]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    predictions: dict[str, Path] = field(default_factory=dict)  # split -> predictions file

    @property
    def objective(self) -> str:
        return str(self.config.get("optimized_metric") or DEFAULT_OBJECTIVE)


def natural_key(text: str) -> list:
    """`2` before `10`: job directories of a sweep in their order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("metrics.json", RESOLVED_CONFIG, ".hydra/config.yaml"))


def find_runs(paths: list[str | Path]) -> tuple[list[Run], list[str]]:
    """The finished runs under ``paths`` (run directories, or sweep directories holding runs), and a note for
    each unfinished job of a sweep that was skipped.

    A run directory named on its own must have finished (metrics.json); inside a sweep an unfinished job is
    skipped with a note, unless none finished.
    """
    if not paths:
        raise ReportError("no path given: rag-report PATH [PATH...] (a run directory or a sweep directory)")
    dirs: list[Path] = []
    skipped: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path}: no such directory. Give a run directory (outputs/runs/train/<date>_<time>) "
                              "or a sweep directory (outputs/multiruns/train/<date>_<time>)")
        if not path.is_dir():
            raise ReportError(f"{path} is a file, not a run directory or a sweep directory")
        if is_run_dir(path):
            if not (path / "metrics.json").is_file():
                raise ReportError(
                    f"{path} has no metrics.json: the run has not finished (it is still running, or it stopped "
                    "early). Report it once it has finished, or resume it: rag-train run_dir=<it> ckpt_path=last"
                )
            dirs.append(path)
            continue
        jobs = sorted((c for c in path.iterdir() if c.is_dir() and is_run_dir(c)), key=lambda c: natural_key(c.name))
        if not jobs:
            raise ReportError(
                f"{path} is not a run directory (no metrics.json, {RESOLVED_CONFIG} or .hydra/) and holds none: "
                "give rag-train's run directory or a sweep directory whose jobs are run directories"
            )
        finished = [j for j in jobs if (j / "metrics.json").is_file()]
        if not finished:
            raise ReportError(f"{path}: none of its {len(jobs)} runs has a metrics.json yet (none has finished)")
        skipped += [f"{j}: no metrics.json (unfinished or failed), left out" for j in jobs if j not in finished]
        dirs += finished
    unique = list(dict.fromkeys(d.resolve() for d in dirs))
    names = run_names(unique)
    return [load_run(d, n) for d, n in zip(unique, names)], skipped


def run_names(dirs: list[Path]) -> list[str]:
    """Each run's path relative to what the runs share (a sweep's jobs: `0`, `1`, ...; one run: its name)."""
    if len(dirs) == 1:
        return [dirs[0].name]
    common = Path(os.path.commonpath([str(d) for d in dirs]))
    return [str(d.relative_to(common)) for d in dirs]


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:  # ValueError: invalid UTF-8
        raise ReportError(f"{path}: cannot read it as YAML ({err})") from None


def load_run(path: Path, name: str) -> Run:
    metrics_file = path / "metrics.json"
    try:
        raw = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ReportError(f"{metrics_file}: not a JSON file of metrics ({err})") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{metrics_file}: expected a JSON object of metric names to numbers")
    metrics = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    config: dict[str, Any] = {}
    for candidate in (path / RESOLVED_CONFIG, path / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config = _read_yaml(candidate) or {}
            if not isinstance(config, dict):
                raise ReportError(f"{candidate}: expected a YAML mapping (a run's config), got a {type(config).__name__}")
            break
    overrides = config.get("hydra_overrides")
    if overrides is None and (path / ".hydra" / "overrides.yaml").is_file():
        overrides = _read_yaml(path / ".hydra" / "overrides.yaml")
    predictions = {}
    for file in sorted(path.glob("predictions*.jsonl")):
        split = file.stem.removeprefix("predictions").lstrip("_") or str(config.get("split_name") or "predictions")
        predictions[split] = file
    return Run(
        dir=path,
        name=name,
        metrics=metrics,
        config=config if isinstance(config, dict) else {},
        overrides=[str(o) for o in overrides or []],
        curves=read_curves(path),
        predictions=predictions,
    )


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the CSV logs (`csv/version_*/metrics.csv`, a resumed run's versions in order) as
    (step, value) points."""
    curves: dict[str, list[tuple[int, float]]] = {}
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: natural_key(p.parent.name))
    for file in files:
        # a damaged log (invalid UTF-8, NUL bytes, a cut row) loses its bad rows, not the report
        with file.open(newline="", encoding="utf-8", errors="replace") as f:
            for row in _csv_rows(file, f):
                try:
                    step = int(float(row.get("step") or "nan"))
                except ValueError:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        continue
                    if math.isfinite(number):
                        curves.setdefault(key, []).append((step, number))
    return curves


def _csv_rows(file: Path, handle: Any) -> Any:
    reader = csv.DictReader(line.replace("\0", "") for line in handle)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ReportError(f"{file}:{reader.line_num}: not a CSV log row ({err})") from None


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in _LOWER_IS_BETTER)


def objective_of(runs: list[Run]) -> str:
    """The sweep's objective: `optimized_metric` of the runs' config (the most common one), else val/em."""
    names = [r.objective for r in runs]
    return max(dict.fromkeys(names), key=names.count)


def sort_runs(runs: list[Run], objective: str) -> list[Run]:
    """Best first by the objective; runs without it last, in their order."""
    have = [r for r in runs if objective in r.metrics]
    sign = 1.0 if lower_is_better(objective) else -1.0
    return sorted(have, key=lambda r: sign * r.metrics[objective]) + [r for r in runs if objective not in r.metrics]


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        out[key.lstrip("+~")] = "(deleted)" if key.startswith("~") else value if sep else ""
    return out


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list | dict) else str(node)}


# config keys that differ between runs without saying anything about the experiment
_IGNORED_CONFIG_PREFIXES = ("paths.", "hydra_overrides", "run_dir", "ckpt_path", "logger.", "callbacks.")


def differing_settings(runs: list[Run]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(keys, per run name: key -> value) of the settings that tell the runs apart.

    From the job overrides where the runs recorded them (Hydra's record): the keys whose values differ, a key a
    run did not override shows `-`. One run: all of its overrides. Runs without recorded overrides are compared
    by their resolved configs instead (paths, loggers and callbacks left out).
    """
    if any(r.overrides for r in runs):
        parsed = {r.name: parse_overrides(r.overrides) for r in runs}
        keys = list(dict.fromkeys(k for r in runs for k in parsed[r.name]))
        if len(runs) > 1:
            keys = [k for k in keys if len({parsed[r.name].get(k, "-") for r in runs}) > 1]
        return keys, {name: {k: p.get(k, "-") for k in keys} for name, p in parsed.items()}
    if len(runs) == 1:
        return [], {runs[0].name: {}}
    flat = {
        r.name: {
            k: v for k, v in _flatten(r.config).items()
            if not k.startswith(_IGNORED_CONFIG_PREFIXES) and str(r.dir) not in v
        }
        for r in runs
    }
    keys = sorted({k for f in flat.values() for k in f if len({g.get(k, "-") for g in flat.values()}) > 1})
    return keys, {name: {k: f.get(k, "-") for k in keys} for name, f in flat.items()}
