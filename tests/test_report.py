"""rag-report: on a 2-job tiny sweep and on a single run it writes report.html and report.md whose runs table
equals the runs' metrics.json, with every run's curve, and breakdowns that sum to the overall metrics; bad
input stops with the path named (exit 2, no traceback)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from rag_lightning.report import build_report
from rag_lightning.report.cli import run as rag_report
from rag_lightning.report.render import CURVES, curves_figure

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
# two jobs of a sweep: what each job was given on top of the tiny world's overrides
JOBS = {"0": ["model.optim.lr=0.001", "trainer.max_epochs=2"], "1": ["model.optim.lr=0.003", "model.n_docs=3"]}


def _add_relations(data: Path) -> None:
    """The world set's QA rows carry a `relation`; give the tiny world's val and test questions two."""
    for split in ("val", "test"):
        path = data / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(rows):
            row["relation"] = "capital" if i % 2 == 0 else "capital_city"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_train_config, tiny_overrides, write_world) -> dict:
    """Two tiny runs with different overrides in one sweep directory (as `rag-train -m` lays them out)."""
    from rag_lightning.pipeline import train

    root = tmp_path_factory.mktemp("report")
    write_world(root / "data")
    _add_relations(root / "data")
    sweep_dir = root / "sweep"
    printed = {}
    for job, extra in JOBS.items():
        cfg = tiny_train_config(root, *extra, "export=false", run_dir=sweep_dir / job)
        with open_dict(cfg):
            cfg.hydra_overrides = [*tiny_overrides(root), *extra, "export=false"]  # Hydra's record of the job
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train(cfg)
        printed[job] = out.getvalue()
    return {"dir": sweep_dir, "printed": printed}


def _md_table(md: str, after: str) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table after the heading `after`."""
    lines = md.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows[0], rows[2:]


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


def _check_table_against_metrics(md: str, run_dirs: dict[str, Path]) -> list[list[str]]:
    header, rows = _md_table(md, "## Runs")
    assert sorted(r[1] for r in rows) == sorted(run_dirs)  # one row per run
    metric_cols = [i for i, h in enumerate(header) if "/" in h]
    assert "val/em" in header and "test/em" in header and "time/total_s" in header
    for row in rows:
        metrics = _metrics(run_dirs[row[1]])
        for i in metric_cols:
            key = header[i]
            if key in metrics:
                assert float(row[i]) == pytest.approx(metrics[key], abs=0.051 if key.startswith("time/") else 5.1e-5)
            else:
                assert row[i] == "–"
    # the full table holds every value of every metrics.json
    full_header, full_rows = _md_table(md, "### All metrics")
    cells = {(r[0], name): value for r in full_rows for name, value in zip(full_header[1:], r[1:])}
    for name, run_dir in run_dirs.items():
        for key, value in _metrics(run_dir).items():
            assert float(cells[(key, name)]) == pytest.approx(value, abs=0.051 if key.startswith("time/") else 5.1e-5)
    return rows


def test_report_of_a_two_job_sweep(sweep, tmp_path) -> None:
    sweep_dir = sweep["dir"]
    written = rag_report([str(sweep_dir)])
    assert written == {"html": sweep_dir / "report.html", "md": sweep_dir / "report.md"}
    md, page = written["md"].read_text(), written["html"].read_text()
    run_dirs = {job: sweep_dir / job for job in JOBS}
    rows = _check_table_against_metrics(md, run_dirs)

    # sorted by the objective (optimized_metric = val/em), the best marked, and only the best
    header, _ = _md_table(md, "## Runs")
    objective = [float(r[header.index("val/em")]) for r in rows]
    assert objective == sorted(objective, reverse=True)
    assert [r[0] for r in rows] == ["★", ""]
    # the overrides that differ, with each job's values; the shared ones (the tiny world's) left out
    assert {"model.optim.lr", "model.n_docs", "trainer.max_epochs"} <= set(header)
    assert "data.corpus_file" not in header and "experiment" not in header
    by_run = {r[1]: dict(zip(header, r)) for r in rows}
    assert by_run["0"]["model.optim.lr"] == "0.001" and by_run["1"]["model.optim.lr"] == "0.003"
    assert by_run["0"]["model.n_docs"] == "-" and by_run["1"]["model.n_docs"] == "3"

    # every run's curve, on each panel's shared axes, equal to its CSV log
    report = build_report([sweep_dir])
    fig = curves_figure(report.runs)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == set(CURVES)
    for metric, ax in panels.items():
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == set(JOBS), metric
        for job, line in lines.items():
            logged = [
                (int(row["step"]), float(row[metric]))
                for row in csv.DictReader((sweep_dir / job / "csv" / "version_0" / "metrics.csv").open())
                if row.get(metric)
            ]
            assert list(line.get_xdata()) == [step for step, _ in logged], (metric, job)
            assert list(line.get_ydata()) == pytest.approx([value for _, value in logged]), (metric, job)
    # the page is one file: plots embedded, no outside resources
    assert page.count('src="data:image/png;base64,') >= 2
    assert "http://" not in page and "https://" not in page
    assert all(f"<td class=\"text\">{job}</td>" in page for job in JOBS) and 'class="best"' in page
    assert (sweep_dir / "report_curves.png").is_file() and "](report_curves.png)" in md

    # the breakdowns of the best run sum to its overall metrics
    best = report.runs[0]
    (b,) = report.breakdowns
    assert report.breakdown_run is best and b.split == "test"
    assert b.em == pytest.approx(best.metrics["test/em"], abs=1e-6)
    assert b.f1 == pytest.approx(best.metrics["test/f1"], abs=1e-6)
    assert list(b.by_field) == ["relation"]
    for groups in (b.by_field["relation"], b.by_retrieval):
        assert sum(g.n for g in groups) == b.n == 4
        assert sum(g.n * g.em for g in groups) / b.n == pytest.approx(b.em)
        assert sum(g.n * g.f1 for g in groups) / b.n == pytest.approx(b.f1)
    n_docs = 3 if best.name == "1" else 2
    read = sum(g.n for g in b.by_retrieval if g.name == "gold passage read") / b.n
    assert read == pytest.approx(best.metrics[f"test/recall@{n_docs}"])  # gold read = recall@n_docs
    assert b.reading_errors + b.retrieval_errors == b.wrong
    assert "By `relation`:" in md and "reading errors" in md and "## Wrong answers" in md
    assert all(r["em"] < 1 for r in report.samples) and len(report.samples) == min(8, b.wrong)


def test_report_of_a_single_run_with_out(sweep, tmp_path) -> None:
    run_dir = sweep["dir"] / "0"
    written = rag_report([str(run_dir), f"out={tmp_path / 'out'}"])
    assert written["html"] == tmp_path / "out" / "report.html" and written["html"].is_file()
    md = written["md"].read_text()
    rows = _check_table_against_metrics(md, {"0": run_dir})
    assert rows[0][0] == "★"
    assert "model.optim.lr" in _md_table(md, "## Runs")[0]  # one run: all of its overrides
    assert "- `0`: val/em (2 points), val/recall@1 (2 points), val/loss (2 points), train/loss (4 points)" in md


def test_rag_train_prints_the_report_command(sweep) -> None:
    for job, printed in sweep["printed"].items():
        assert f"rag-report {sweep['dir'] / job}" in printed


def _fake_run(root: Path, name: str, records: list[dict], qa: list[dict], metrics: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({"data": {"test_file": str(root / "qa.jsonl")}}))
    (run / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_breakdown_sums_to_the_overall_metric(tmp_path) -> None:
    """Non-trivial EM/F1 per group (the tiny runs answer nothing right): weighted sums equal the totals."""
    relations = ["capital", "capital", "capital", "symbol", "symbol", "population"]
    qa = [{"id": f"q{i}", "question": f"Q{i}?", "answers": ["a"], "gold_passage_ids": [f"g{i}"], "relation": rel,
           "subject": f"s{i}"} for i, rel in enumerate(relations)]
    outcomes = [(1, 1.0, True), (0, 0.5, True), (0, 0.0, False), (1, 1.0, True), (0, 0.2, False), (0, 0.0, True)]
    records = [
        {"id": f"q{i}", "question": f"Q{i}?", "prediction": "a" if em else "b", "answers": ["a"], "em": em, "f1": f1,
         "passages": [{"id": f"g{i}" if gold else "x", "title": "t", "text": "text", "score": 1.0, "p": 0.6},
                      {"id": "y", "title": "t", "text": "text", "score": 0.5, "p": 0.4}]}
        for i, (em, f1, gold) in enumerate(outcomes)
    ]
    run = _fake_run(tmp_path, "run", records, qa, {"val/em": 0.5, "test/em": 2 / 6})
    report = build_report([run], samples=2)
    (b,) = report.breakdowns
    assert list(b.by_field) == ["relation"]  # `subject` has a value per question: not a category
    groups = {g.name: g for g in b.by_field["relation"]}
    assert (groups["capital"].n, groups["capital"].em, groups["capital"].f1) == (3, pytest.approx(1 / 3), pytest.approx(0.5))
    for gs in (b.by_field["relation"], b.by_retrieval):
        assert sum(g.n * g.em for g in gs) / b.n == pytest.approx(b.em) == pytest.approx(2 / 6)
        assert sum(g.n * g.f1 for g in gs) / b.n == pytest.approx(b.f1) == pytest.approx(2.7 / 6)
    assert (b.wrong, b.reading_errors, b.retrieval_errors) == (4, 2, 2)
    assert len(report.samples) == 2 and all(r["em"] == 0 for r in report.samples)
    assert build_report([run], fields=["subject"]).breakdowns[0].by_field.keys() == {"subject"}


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("RAG_DEBUG", raising=False)


@pytest.mark.parametrize("case", ["missing", "not_a_run", "no_metrics", "file"])
def test_bad_input_names_the_path(case, tmp_path, capsys, no_debug) -> None:
    path = tmp_path / case
    if case == "not_a_run":
        (path / "something").mkdir(parents=True)
    elif case == "no_metrics":
        path.mkdir()
        (path / "config_resolved.yaml").write_text("seed: 1\n")
    elif case == "file":
        path.write_text("x")
    with pytest.raises(SystemExit) as stop:
        rag_report([str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "Traceback" not in err
    if case == "no_metrics":
        assert "no metrics.json" in err
    assert not (path / "report.html").exists() if path.is_dir() else True


def test_a_sweeps_unfinished_job_is_left_out_with_a_note(tmp_path) -> None:
    record = {"id": "q0", "question": "Q?", "prediction": "a", "answers": ["a"], "em": 1.0, "f1": 1.0}
    qa = [{"id": "q0", "question": "Q?", "answers": ["a"]}]
    _fake_run(tmp_path / "sweep", "0", [record], qa, {"val/em": 1.0})
    _fake_run(tmp_path / "sweep", "1", [record], qa, None)  # still running
    report = build_report([tmp_path / "sweep"])
    assert [r.name for r in report.runs] == ["0"]
    assert any("1: no metrics.json" in n for n in report.notes)


def test_console_script_exits_2_without_traceback(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAG_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "rag_lightning.report", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere") in proc.stderr and "Traceback" not in proc.stderr


def test_runs_sort_by_the_sweeps_objective(tmp_path) -> None:
    """optimized_metric in the runs' config is the objective (a loss: lower first), else val/em (higher first)."""
    record = {"id": "q0", "question": "Q?", "prediction": "a", "answers": ["a"], "em": 1.0, "f1": 1.0}
    qa = [{"id": "q0", "question": "Q?", "answers": ["a"]}]
    values = {"a": (0.2, 3.0), "b": (0.5, 4.0), "c": (0.3, 1.0)}
    for name, (em, loss) in values.items():
        _fake_run(tmp_path / "s", name, [record], qa, {"val/em": em, "val/loss": loss})
    assert [r.name for r in build_report([tmp_path / "s"]).runs] == ["b", "c", "a"]
    for name in values:
        path = tmp_path / "s" / name / "config_resolved.yaml"
        path.write_text(path.read_text() + "optimized_metric: val/loss\n")
    report = build_report([tmp_path / "s"])
    assert report.objective == "val/loss" and [r.name for r in report.runs] == ["c", "a", "b"]
    assert report.best.name == "c"
