"""rag-report: runs and sweeps compared on one page (report.html, self-contained, and report.md).

`runs` reads run directories (metrics.json, config_resolved.yaml, the CSV logs, predictions), `analysis` breaks
a run's predictions down by category and by retrieval, `render` draws the plots and writes the pages, `cli` is
the console script. It reads files only: no model, no index, no Hydra composition.
"""

from __future__ import annotations

from pathlib import Path

from rag_lightning.files import write_bytes_atomic, write_text_atomic
from rag_lightning.report.analysis import breakdown, wrong_answers
from rag_lightning.report.render import Report, breakdown_figure, curves_figure, png, to_html, to_markdown
from rag_lightning.report.runs import differing_settings, find_runs, objective_of, sort_runs

__all__ = ["build_report", "write_report"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(paths: list[str | Path], samples: int = 8, fields: list[str] | None = None) -> Report:
    """Everything the pages show, for the runs under ``paths``."""
    runs, skipped = find_runs(paths)
    objective = objective_of(runs)
    runs = sort_runs(runs, objective)
    keys, settings = differing_settings(runs)
    report = Report(runs=runs, objective=objective, setting_keys=keys, settings=settings, notes=list(skipped))
    if missing := [r.name for r in runs if objective not in r.metrics]:
        report.notes.append(f"no {objective} in the metrics.json of {', '.join(missing)}: listed last")
    plots = _has_matplotlib()
    if not plots:
        report.notes.append("matplotlib is not installed: no plots (pip install matplotlib)")
    else:
        report.images["curves"] = png(curves_figure(runs))
    # the predictions of the best run (or the first that has any)
    chosen = next((r for r in runs if r.predictions), None)
    if chosen is not None:
        report.breakdown_run = chosen
        splits = sorted(chosen.predictions, key=lambda s: (s != "test", s))
        report.breakdowns = [breakdown(chosen, s, fields) for s in splits]
        first = report.breakdowns[0]
        report.sample_split = first.split
        report.samples = wrong_answers(first, samples)
        if plots:
            for b in report.breakdowns:
                fig = breakdown_figure(b)
                if fig is not None:
                    report.images[f"breakdown_{b.split}"] = png(fig)
    else:
        report.notes.append("no predictions_<split>.jsonl in any run: no breakdown or wrong answers")
    return report


def write_report(report: Report, out: str | Path) -> dict[str, Path]:
    """report.html (self-contained) and report.md with its PNGs (report_<plot>.png) in ``out``."""
    out = Path(out)
    image_files = {name: f"report_{name}.png" for name in report.images}
    for name, data in report.images.items():
        write_bytes_atomic(out / image_files[name], data)
    written = {"html": out / "report.html", "md": out / "report.md"}
    write_text_atomic(written["html"], to_html(report))
    write_text_atomic(written["md"], to_markdown(report, image_files))
    return written
