"""The report's tables and plots, as one self-contained HTML page (plots as base64 PNG) and as Markdown."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any

from rag_lightning.report.analysis import Breakdown
from rag_lightning.report.runs import Run, lower_is_better, natural_key

CURVES = ("val/em", "val/recall@1", "val/loss", "train/loss")
MAIN_METRICS = ("em", "f1", "recall@", "loss")  # per split, in the runs table (all of them in the full table)
BEST = "★"
MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass
class Report:
    runs: list[Run]  # best first
    objective: str
    setting_keys: list[str]
    settings: dict[str, dict[str, str]]
    breakdown_run: Run | None = None
    breakdowns: list[Breakdown] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    sample_split: str | None = None
    notes: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # name -> PNG

    @property
    def best(self) -> Run | None:
        first = self.runs[0] if self.runs else None
        return first if first is not None and self.objective in first.metrics else None


# ------------------------------------------------------------------------------------------ metrics
def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if key.startswith("time/") else f"{value:.4f}"


def _split_order(splits: set[str]) -> list[str]:
    first = [s for s in ("val", "test") if s in splits]
    return first + sorted(s for s in splits if s not in first and s != "time")


def _metric_order(name: str) -> tuple:
    for i, prefix in enumerate(("em", "f1", "recall@", "mrr", "loss")):
        if name.startswith(prefix):
            return (i, natural_key(name))
    return (9, natural_key(name))


def all_metric_keys(runs: list[Run], objective: str) -> list[str]:
    """Every metric of the runs' metrics.json: the objective, then split by split, the time last."""
    keys = {k for r in runs for k in r.metrics}
    ordered = [objective] if objective in keys else []
    for split in _split_order({k.split("/", 1)[0] for k in keys}):
        ordered += sorted((k for k in keys if k.split("/", 1)[0] == split and k != objective),
                          key=lambda k: _metric_order(k.split("/", 1)[-1]))
    return ordered + sorted(k for k in keys if k.startswith("time/"))


def table_metric_keys(runs: list[Run], objective: str) -> list[str]:
    """The runs table's columns: the objective, EM, F1, recall@k and loss of every split, the time."""
    return [
        k for k in all_metric_keys(runs, objective)
        if k == objective or k.startswith("time/") or k.split("/", 1)[-1].startswith(MAIN_METRICS)
    ]


# ------------------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(runs: list[Run], metrics: tuple[str, ...] = CURVES) -> Any:
    """One panel per metric, every run's curve on the panel's shared axes, one colour per run."""
    plt = _pyplot()
    cols = 2
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.6 * rows), squeeze=False, sharex=True)
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i_ax, (ax, metric) in enumerate(zip(axes.flat, metrics)):
        ax.set_title(metric)
        if i_ax >= len(metrics) - cols:
            ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        plotted = False
        for i, run in enumerate(runs):
            points = run.curves.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            many = len(points) > 40
            # hollow markers of falling size per run: runs with equal values stay visible, one inside the other
            ax.plot(steps, values, label=run.name, color=colours(i % colours.N), linewidth=1.2,
                    marker=None if many else MARKERS[i % len(MARKERS)], markersize=max(8 - 1.5 * (i % 4), 3),
                    markerfacecolor="none", markeredgewidth=1.3)
            plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if handles else 1))
    return fig


def breakdown_figure(b: Breakdown) -> Any:
    """EM by the first category field, and the wrong answers split into reading and retrieval errors."""
    plt = _pyplot()
    panels = []
    if b.by_field:
        name, groups = next(iter(b.by_field.items()))
        panels.append((f"EM by {name} ({b.split})", [g.name for g in groups], [g.em for g in groups]))
    if b.by_retrieval:
        panels.append((f"EM by gold passage read ({b.split})", [g.name for g in b.by_retrieval],
                       [g.em for g in b.by_retrieval]))
    if not panels:
        return None
    height = max(2.5, 0.3 * max(len(p[1]) for p in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(11, height), squeeze=False)
    for ax, (title, labels, values) in zip(axes.flat, panels):
        ax.barh(range(len(labels)), values, color="#4c72b0")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ shared rows
def runs_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    keys = table_metric_keys(report.runs, report.objective)
    header = ["", "run", *report.setting_keys, *keys]
    rows = []
    for run in report.runs:
        mark = BEST if run is report.best else ""
        rows.append([mark, run.name, *(report.settings[run.name].get(k, "-") for k in report.setting_keys),
                     *(fmt(k, run.metrics.get(k)) for k in keys)])
    return header, rows


def all_metrics_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["metric", *(r.name for r in report.runs)]
    return header, [[k, *(fmt(k, r.metrics.get(k)) for r in report.runs)]
                    for k in all_metric_keys(report.runs, report.objective)]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def group_rows(groups: list, total: Breakdown | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["group", "n", "share", "EM", "F1", "gold passage read"]
    n = sum(g.n for g in groups)
    rows = [[g.name, str(g.n), _pct(g.n / n), f"{g.em:.4f}", f"{g.f1:.4f}", _pct(g.retrieved)] for g in groups]
    if total is not None:
        read = [r["gold_read"] for r in total.records if r["gold_read"] is not None]
        rows.append(["all", str(total.n), "100.0%", f"{total.em:.4f}", f"{total.f1:.4f}",
                     _pct(sum(read) / len(read) if read else None)])
    return header, rows


def error_rows(b: Breakdown) -> tuple[list[str], list[list[str]]]:
    header = ["wrong answers", "n", "share of wrong", "share of all"]
    w = max(b.wrong, 1)
    rows = [
        ["reading errors (a gold passage was read)", str(b.reading_errors), _pct(b.reading_errors / w),
         _pct(b.reading_errors / b.n)],
        ["retrieval errors (no gold passage read)", str(b.retrieval_errors), _pct(b.retrieval_errors / w),
         _pct(b.retrieval_errors / b.n)],
        ["all wrong", str(b.wrong), "100.0%" if b.wrong else "–", _pct(b.wrong / b.n)],
    ]
    return header, rows


def overall_line(b: Breakdown) -> str:
    logged = ", ".join(f"{k} {fmt(k, v)}" for k, v in b.logged.items() if k in ("em", "f1") or k.startswith("recall@"))
    return (f"{b.n} questions from {b.file.name}; EM {b.em:.4f}, F1 {b.f1:.4f} over the records"
            + (f" (metrics.json: {logged})" if logged else ""))


# ------------------------------------------------------------------------------------------ markdown
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: Report, image_files: dict[str, str]) -> str:
    out = [f"# Report: {len(report.runs)} run{'s' if len(report.runs) != 1 else ''}", ""]
    best = report.best
    direction = "lower" if lower_is_better(report.objective) else "higher"
    out.append(f"Objective: `{report.objective}` ({direction} is better)"
               + (f"; best: **{best.name}** ({fmt(report.objective, best.metrics[report.objective])})" if best else ""))
    out += ["", "Runs: " + ", ".join(f"`{r.name}` ({r.dir})" for r in report.runs), ""]
    out += [f"- {n}" for n in report.notes] + ([""] if report.notes else [])
    out += ["## Runs", "", md_table(*runs_rows(report)), "", "### All metrics", "", md_table(*all_metrics_rows(report)), ""]
    out += ["## Curves", ""]
    out.append(f"![curves]({image_files['curves']})" if "curves" in image_files else "(no plots: matplotlib is not installed)")
    out.append("")
    out += [f"- `{r.name}`: " + ", ".join(f"{m} ({len(r.curves.get(m, []))} points)" for m in CURVES) for r in report.runs]
    out.append("")
    if report.breakdown_run is not None:
        out += [f"## Predictions of {report.breakdown_run.name}", ""]
        for b in report.breakdowns:
            out += [f"### {b.split}", "", overall_line(b), ""]
            out += [f"- {n}" for n in b.notes] + ([""] if b.notes else [])
            for name, groups in b.by_field.items():
                out += [f"By `{name}`:", "", md_table(*group_rows(groups, b)), ""]
            if b.by_retrieval:
                out += ["By gold passage read:", "", md_table(*group_rows(b.by_retrieval, b)), ""]
                out += [md_table(*error_rows(b)), ""]
            if f"breakdown_{b.split}" in image_files:
                out += [f"![breakdown {b.split}]({image_files[f'breakdown_{b.split}']})", ""]
        out += [f"## Wrong answers ({len(report.samples)}, {report.sample_split})", ""]
        for r in report.samples:
            cats = ", ".join(f"{k}: {v}" for k, v in r.get("categories", {}).items())
            out += [f"**{r['id']}** {_md_cell(r['question'])}" + (f" _({cats})_" if cats else ""), "",
                    f"- gold: {' / '.join(r['answers'])}; prediction: `{_md_cell(r['prediction']) or '(empty)'}` (F1 {r['f1']:.2f})"]
            for i, (p, hit) in enumerate(zip(r.get("passages", []), r.get("hits", []) or [False] * 99), 1):
                out.append(f"  {i}. p={p['p']:.3f} {'✓ ' if hit else ''}`{p['id']}` {_md_cell(p['title'])}: "
                           f"{_md_cell(p['text'][:200])}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ html
STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
.scroll { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td.text { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 13px; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.sample .q { font-weight: 600; } .sample .pred { color: #b00020; } .sample .gold { color: #1b5e20; }
.passages { font-size: 12px; margin: 4px 0 0 0; } .passages td { vertical-align: top; }
.hit { color: #1b5e20; font-weight: 700; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def html_table(header: list[str], rows: list[list[str]], best_rows: set[int] | None = None, text_cols: int = 1) -> str:
    parts = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = ' class="best"' if best_rows and i in best_rows else ""
        cells = "".join(f'<td class="text">{_e(c)}</td>' if j < text_cols else f"<td>{_e(c)}</td>" for j, c in enumerate(row))
        parts.append(f"<tr{cls}>{cells}</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _img(report: Report, name: str, alt: str) -> str:
    if name not in report.images:
        return '<p class="note">(no plot: matplotlib is not installed)</p>'
    data = base64.b64encode(report.images[name]).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def to_html(report: Report) -> str:
    best = report.best
    direction = "lower" if lower_is_better(report.objective) else "higher"
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>rag_lightning report: {len(report.runs)} runs</title><style>{STYLE}</style></head><body>",
           f"<h1>Report: {len(report.runs)} run{'s' if len(report.runs) != 1 else ''}</h1>",
           f"<p>Objective: <code>{_e(report.objective)}</code> ({direction} is better)"
           + (f"; best: <b>{_e(best.name)}</b> ({fmt(report.objective, best.metrics[report.objective])})" if best else "")
           + "</p>",
           '<p class="note">' + "<br>".join(f"<code>{_e(r.name)}</code>: {_e(r.dir)}" for r in report.runs) + "</p>"]
    out += [f'<p class="note">{_e(n)}</p>' for n in report.notes]
    header, rows = runs_rows(report)
    best_rows = {0} if best is not None else set()
    out += ["<h2>Runs</h2>", '<div class="scroll">', html_table(header, rows, best_rows, text_cols=2 + len(report.setting_keys)),
            "</div>"]
    out += ["<details><summary>All metrics</summary>", html_table(*all_metrics_rows(report)), "</details>"]
    out += ["<h2>Curves</h2>", _img(report, "curves", "validation and training curves")]
    if report.breakdown_run is not None:
        out.append(f"<h2>Predictions of {_e(report.breakdown_run.name)}</h2>")
        for b in report.breakdowns:
            out += [f"<h3>{_e(b.split)}</h3>", f"<p>{_e(overall_line(b))}</p>"]
            out += [f'<p class="note">{_e(n)}</p>' for n in b.notes]
            for name, groups in b.by_field.items():
                out += [f"<p>By <code>{_e(name)}</code>:</p>", html_table(*group_rows(groups, b))]
            if b.by_retrieval:
                out += ["<p>By gold passage read:</p>", html_table(*group_rows(b.by_retrieval, b)),
                        html_table(*error_rows(b))]
            if f"breakdown_{b.split}" in report.images:
                out.append(_img(report, f"breakdown_{b.split}", f"breakdown of {b.split}"))
        out.append(f"<h2>Wrong answers ({len(report.samples)}, {_e(report.sample_split)})</h2>")
        for r in report.samples:
            cats = ", ".join(f"{k}: {v}" for k, v in r.get("categories", {}).items())
            out.append('<div class="sample">')
            out.append(f'<div class="q">{_e(r["id"])}: {_e(r["question"])}'
                       + (f' <span class="note">({_e(cats)})</span>' if cats else "") + "</div>")
            out.append(f'<div>gold: <span class="gold">{_e(" / ".join(r["answers"]))}</span> · prediction: '
                       f'<span class="pred">{_e(r["prediction"]) or "(empty)"}</span> · F1 {r["f1"]:.2f}</div>')
            if r.get("passages"):
                out.append('<table class="passages"><tr><th>#</th><th>p(z|x)</th><th>score</th><th>gold</th>'
                           "<th>passage</th></tr>")
                hits = r.get("hits") or [False] * len(r["passages"])
                for i, (p, hit) in enumerate(zip(r["passages"], hits), 1):
                    out.append(f"<tr><td>{i}</td><td>{p['p']:.3f}</td><td>{p.get('score', 0):.2f}</td>"
                               f"<td class=\"hit\">{'✓' if hit else ''}</td><td class=\"text\"><b>{_e(p['title'])}</b> "
                               f"<code>{_e(p['id'])}</code>: {_e(p['text'][:300])}</td></tr>")
                out.append("</table>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
