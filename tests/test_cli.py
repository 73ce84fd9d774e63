"""Every console script run as a user runs it: in this process through sys.argv and its main() (so coverage
sees it) and as a subprocess. Good input exits 0 and writes what it promises; bad input exits 2 with one
short message on stderr naming the key or the file, and no traceback; RAG_DEBUG=1 shows the traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
DEBUG_HINT = "(set RAG_DEBUG=1 for the traceback)"
RATES = ("em", "f1", "recall@1", "recall@2", "mrr")  # metrics that are fractions


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def data_overrides(root: Path, files: dict[str, str], **replace: str | None) -> list[str]:
    """`data=jsonl` on the tiny world's files, data.dir and caches under root; replace (or drop: None) keys."""
    values = {"corpus_file": files["corpus"], "train_file": files["train"], "val_file": files["val"],
              "test_file": files["test"], **replace}
    return [
        "data=jsonl",
        f"data.dir={root / 'data'}",
        *(f"data.{key}={value}" for key, value in values.items() if value is not None),
        "data.tokenizer.vocab_size=300",
        f"paths.cache_dir={root / 'cache'}",
    ]


def index_overrides(root: Path, files: dict[str, str], **replace: str | None) -> list[str]:
    return [*data_overrides(root, files, **replace), "model/question_encoder=tiny", "index.progress=false"]


def assert_user_error(run, *names: str) -> str:
    """Exit 2, one `error:` message on stderr (short, naming each of `names`) and the RAG_DEBUG hint after it,
    no traceback anywhere; returns the message."""
    assert run.code == 2, f"exit {run.code}\n{run.out[-3000:]}\n{run.err[-3000:]}"
    assert "Traceback" not in run.output, run.output[-3000:]
    assert "error:" not in run.out
    block = run.error_block()
    assert block, run.err[-3000:]
    assert sum(line.startswith("error: ") for line in run.err.splitlines()) == 1, run.err
    assert DEBUG_HINT in block, run.err
    message = "\n".join(block[: block.index(DEBUG_HINT)])
    assert len(message) < 600, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.fixture(autouse=True)
def nothing_written_into_the_repository():
    """Runs go under tmp_path (RAG_ROOT, hydra.run.dir, paths.cache_dir), never into the repository's outputs/."""

    def snapshot() -> list[str]:
        outputs = REPO / "outputs"
        return sorted(str(p) for pattern in ("*", "*/*", "*/*/*") for p in outputs.glob(pattern))

    before = snapshot()
    yield
    assert snapshot() == before


def test_the_scripts_are_the_ones_pyproject_installs(entry_points):
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {script: f"{module}:main" for script, module in entry_points.items()}


# ------------------------------------------------------------------------------------------ good input, in process
def test_rag_prepare_checks_and_counts_the_users_files(cli, tmp_path, tiny_world):
    run = cli("rag-prepare", *data_overrides(tmp_path, tiny_world), f"hydra.run.dir={tmp_path / 'run'}")
    assert run.code == 0, run.output[-3000:]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in run.out.splitlines()
            if line.count("│") >= 4}
    assert {k: rows[k] for k in ("corpus_file", "train_file", "val_file", "test_file")} == {
        "corpus_file": "24", "train_file": "8", "val_file": "4", "test_file": "4"}
    assert "data 'jsonl' checked in" in run.out and "Traceback" not in run.output
    assert (tmp_path / "data" / "generator_tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "prepare.log").is_file()
    assert f"data.corpus_file={tiny_world['corpus']}" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()


def test_rag_index_builds_the_store_and_index_then_reuses_them(cli, tmp_path, tiny_world):
    overrides = index_overrides(tmp_path, tiny_world)
    run = cli("rag-index", *overrides, f"hydra.run.dir={tmp_path / 'run1'}")
    assert run.code == 0, run.output[-3000:]
    assert "index 'jsonl-tiny-flat' ready in" in run.out and "24 x 32 float32" in run.out
    index_dir = tmp_path / "cache" / "indexes" / "jsonl-tiny-flat"
    manifest = json.loads((index_dir / "index_manifest.json").read_text())
    assert manifest["passages"] == 24 and manifest["dim"] == 32 and manifest["index_type"] == "flat"
    store_manifest = tmp_path / "cache" / "stores" / "jsonl-tiny-ctx64" / "manifest.json"  # conf/index/common.yaml
    assert json.loads(store_manifest.read_text())["passages"] == 24
    built = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}
    again = cli("rag-index", *overrides, f"hydra.run.dir={tmp_path / 'run2'}")
    assert again.code == 0, again.output[-3000:]
    assert again.out.count("is up to date") == 2  # the store and the index, neither rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()} == built


def test_rag_train_fits_tests_and_exports(tiny_run):
    """The session's tiny_run is `rag-train experiment=tiny` on the tiny world, run through main() here."""
    run, out = tiny_run.run_dir, tiny_run.result.out
    assert tiny_run.result.code == 0 and "Traceback" not in tiny_run.result.output
    assert "results" in out and f"run directory: {run}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for name in (*RATES, "loss"):
            assert f"{split}/{name}" in metrics, f"{split}/{name}"
        for name in RATES:
            assert 0.0 <= metrics[f"{split}/{name}"] <= 1.0, (split, name)
    assert metrics["time/total_s"] > 0
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    for part in ("question_encoder", "generator"):
        assert (run / "checkpoints" / "hf" / part / "config.json").is_file()
    test_ids = [r["id"] for r in read_jsonl(tiny_run.root / "data" / "test.jsonl")]
    assert sorted(r["id"] for r in read_jsonl(run / "predictions_test.jsonl")) == sorted(test_ids)
    resolved = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert resolved["experiment_name"] == "tiny" and resolved["paths"]["output_dir"] == str(run)
    assert "experiment=tiny" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert (run / "train.log").is_file()


def test_rag_eval_scores_a_checkpoint_on_any_qa_file(cli, tmp_path, tiny_run):
    out = tmp_path / "eval"
    train_file = tiny_run.root / "data" / "train.jsonl"
    run = cli("rag-eval", f"ckpt_path={tiny_run.best_checkpoint()}", "accelerator=cpu", f"data.test_file={train_file}",
              "split_name=train", f"hydra.run.dir={out}")
    assert run.code == 0, run.output[-3000:]
    assert "results" in run.out and "Traceback" not in run.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {f"train/{name}" for name in (*RATES, "loss")} <= set(metrics)
    assert all(0.0 <= metrics[f"train/{name}"] <= 1.0 for name in RATES)
    predictions = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in predictions] == [r["id"] for r in read_jsonl(train_file)]  # one row per question
    assert all({"prediction", "passages"} <= set(r) for r in predictions)  # the record rag-predict writes too
    for record in predictions:
        assert len(record["passages"]) == 2  # eval_n_docs of experiment=tiny
        assert all({"id", "title", "text", "score", "p"} <= set(p) for p in record["passages"])
        assert sum(p["p"] for p in record["passages"]) == pytest.approx(1.0, abs=1e-3)
    assert not (out / "predictions_train.jsonl").exists()  # renamed to predictions.jsonl


def test_rag_predict_answers_each_question_with_its_passages(cli, tmp_path, tiny_run):
    out = tmp_path / "predict"
    questions = ["What is the capital of Hyrule?", "What is the capital of Elbonia?"]
    run = cli("rag-predict", f"ckpt_path={tiny_run.run_dir / 'checkpoints' / 'last.ckpt'}", "accelerator=cpu",
              f"question=[{','.join(questions)}]", f"hydra.run.dir={out}")
    assert run.code == 0, run.output[-3000:]
    assert "Traceback" not in run.output
    for question in questions:
        assert f"Q: {question}\nA: " in run.out
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["question"] for r in records] == questions
    corpus_ids = {r["id"] for r in read_jsonl(tiny_run.root / "data" / "corpus.jsonl")}
    for record in records:
        assert len(record["passages"]) == 2  # n_docs of experiment=tiny
        assert {p["id"] for p in record["passages"]} <= corpus_ids
        assert sum(p["p"] for p in record["passages"]) == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------------------------------ bad input, in process
@dataclass
class Setting:
    """What the bad-input cases build their command lines from."""

    tmp: Path
    files: dict[str, str]
    train: list[str]
    ckpt: Path


def _bad_qa_file(tmp: Path) -> Path:
    path = tmp / "bad_qa.jsonl"
    path.write_text('{"question": "What is the capital of Aland?", "answers": ["Mariehamn"]}\n'
                    '{"question": "What is the capital of Dorvia?", "answers": ["Pellin"]}\n'
                    '{"question": "What is the capital of Florin?", "answers": ["Guilder"\n')
    return path


def _lone_checkpoint(s: Setting) -> Path:
    path = s.tmp / "elsewhere" / "model.ckpt"
    path.parent.mkdir()
    shutil.copy(s.ckpt, path)
    return path


# (script, the case, its command line, what the message must name); a name may depend on the setting
BAD_INPUT: list[tuple[str, str, Callable[[Setting], list[str]], Callable[[Setting], list[str]]]] = [
    ("rag-prepare", "missing corpus file",
     lambda s: data_overrides(s.tmp, s.files, corpus_file=str(s.tmp / "nope.jsonl")),
     lambda s: [f"data.corpus_file={s.tmp / 'nope.jsonl'}", "file not found"]),
    ("rag-prepare", "malformed corpus line",
     lambda s: data_overrides(s.tmp, s.files, corpus_file=str(DATA / "corpus_malformed_json.jsonl")),
     lambda s: [f"{DATA / 'corpus_malformed_json.jsonl'}:2", "malformed JSON"]),
    ("rag-prepare", "corpus file not set",
     lambda s: data_overrides(s.tmp, s.files, corpus_file=None),
     lambda s: ["data.corpus_file is not set"]),
    ("rag-prepare", "misspelt data key",
     lambda s: [*data_overrides(s.tmp, s.files), "data.corpus_fil=x.jsonl"],
     lambda s: ["data.corpus_fil is not a config key"]),
    ("rag-index", "missing corpus file",
     lambda s: index_overrides(s.tmp, s.files, corpus_file=str(s.tmp / "nope.jsonl")),
     lambda s: [f"data.corpus_file={s.tmp / 'nope.jsonl'}"]),
    ("rag-index", "unknown encoder kind",
     lambda s: [*index_overrides(s.tmp, s.files), "model.question_encoder.kind=tinyy"],
     lambda s: ["model.question_encoder.kind='tinyy'", "minilm, dpr, tiny, path"]),
    ("rag-index", "unknown index option",
     lambda s: [*index_overrides(s.tmp, s.files), "index=hnw"],
     lambda s: ["index/hnw", "hnsw"]),
    ("rag-index", "unknown index.type",
     lambda s: [*index_overrides(s.tmp, s.files), "index.type=bogus"],
     lambda s: ["index.type='bogus'", "flat, hnsw, ivfpq"]),
    ("rag-train", "misspelt model key",
     lambda s: [*s.train, "model.n_doc=3"],
     lambda s: ["model.n_doc is not a config key"]),
    ("rag-train", "out-of-range value",
     lambda s: [*s.train, "model.n_docs=0"],
     lambda s: ["model.n_docs=0 must be > 0"]),
    ("rag-train", "n_docs larger than the corpus",  # the tiny world has 24 passages
     lambda s: [*s.train, "model.n_docs=25"],
     lambda s: ["model.n_docs=25", "larger than the corpus (24 passages)"]),
    ("rag-train", "missing checkpoint",
     lambda s: [*s.train, f"ckpt_path={s.tmp / 'nope.ckpt'}"],
     lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}", "no such checkpoint"]),
    ("rag-train", "train file with a bad row",
     lambda s: [*s.train, f"data.train_file={DATA / 'qa_missing_question.jsonl'}"],
     lambda s: [f"{DATA / 'qa_missing_question.jsonl'}:2", "question"]),
    ("rag-eval", "missing checkpoint",
     lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}", "accelerator=cpu"],
     lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}", "no such checkpoint"]),
    ("rag-eval", "checkpoint not given",
     lambda s: ["accelerator=cpu"],
     lambda s: ["ckpt_path is not set"]),
    ("rag-eval", "qa file with a malformed line",
     lambda s: [f"ckpt_path={s.ckpt}", "accelerator=cpu", f"data.test_file={_bad_qa_file(s.tmp)}"],
     lambda s: [f"{s.tmp / 'bad_qa.jsonl'}:3", "malformed JSON"]),
    ("rag-eval", "missing qa file",
     lambda s: [f"ckpt_path={s.ckpt}", "accelerator=cpu", f"data.test_file={s.tmp / 'none.jsonl'}"],
     lambda s: [f"data.test_file={s.tmp / 'none.jsonl'}", "file not found"]),
    ("rag-eval", "out-of-range value",
     lambda s: [f"ckpt_path={s.ckpt}", "accelerator=cpu", "model.eval_n_docs=0"],
     lambda s: ["model.eval_n_docs=0 must be > 0"]),
    ("rag-eval", "eval_n_docs larger than the corpus",
     lambda s: [f"ckpt_path={s.ckpt}", "accelerator=cpu", "model.eval_n_docs=30"],
     lambda s: ["model.eval_n_docs=30", "larger than the corpus (24 passages)"]),
    ("rag-eval", "misspelt model key",
     lambda s: [f"ckpt_path={s.ckpt}", "model.eval_n_doc=1"],
     lambda s: ["model.eval_n_doc is not a config key"]),
    ("rag-predict", "missing checkpoint",
     lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}", "question=Where?"],
     lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}", "no such checkpoint"]),
    ("rag-predict", "question not given",
     lambda s: [f"ckpt_path={s.ckpt}"],
     lambda s: ["question is not set"]),
    ("rag-predict", "empty question list",
     lambda s: [f"ckpt_path={s.ckpt}", "question=[]"],
     lambda s: ["question=[]", "no question"]),
    ("rag-predict", "checkpoint outside a run directory",
     lambda s: [f"ckpt_path={_lone_checkpoint(s)}", "question=Where?"],
     lambda s: ["config_resolved.yaml not found", "rag-train run directory"]),
    ("rag-predict", "out-of-range value",
     lambda s: [f"ckpt_path={s.ckpt}", "question=Where?", "accelerator=cpu", "model.decoding.num_beams=0"],
     lambda s: ["model.decoding.num_beams=0 must be > 0"]),
    ("rag-eval", "negative n-gram size",
     lambda s: [f"ckpt_path={s.ckpt}", "accelerator=cpu", "model.decoding.no_repeat_ngram_size=-1"],
     lambda s: ["model.decoding.no_repeat_ngram_size=-1 must be >= 0"]),
]


@pytest.fixture
def setting(tmp_path, tiny_overrides, tiny_world, request) -> Setting:
    """The tiny world under tmp_path; the checkpoint of the session's tiny run only for rag-eval/rag-predict."""
    needs_run = request.node.callspec.params.get("script") in ("rag-eval", "rag-predict")
    ckpt = request.getfixturevalue("tiny_run").best_checkpoint() if needs_run else tmp_path / "unused.ckpt"
    return Setting(tmp_path, tiny_world, tiny_overrides(tmp_path), ckpt)


@pytest.mark.parametrize(("script", "case", "args", "names"), BAD_INPUT,
                         ids=[f"{script}: {case}" for script, case, _, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_message(cli, setting, script, case, args, names):
    run = cli(script, *args(setting), f"hydra.run.dir={setting.tmp / 'run'}")
    assert_user_error(run, *names(setting))


def test_rag_debug_shows_the_traceback_in_process(cli, monkeypatch, tmp_path, tiny_overrides):
    import os

    from hydra.errors import ConfigCompositionException

    from rag_lightning.config import ConfigError

    monkeypatch.setenv("RAG_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"model\.n_docs=0 must be > 0"):
        cli("rag-train", *tiny_overrides(tmp_path), "model.n_docs=0", f"hydra.run.dir={tmp_path / 'run'}")
    with pytest.raises(ConfigCompositionException, match=r"model\.n_doc"):
        cli("rag-train", *tiny_overrides(tmp_path), "model.n_doc=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert "HYDRA_FULL_ERROR" not in os.environ  # set for the call only


# ------------------------------------------------------------------------------------------ as subprocesses
def test_rag_prepare_as_a_subprocess(cli_subprocess, tmp_path, tiny_world):
    run = cli_subprocess("rag-prepare", *data_overrides(tmp_path, tiny_world), f"hydra.run.dir={tmp_path / 'run'}")
    assert run.code == 0, run.output[-3000:]
    assert "data 'jsonl' checked in" in run.out and "corpus_file" in run.out and "Traceback" not in run.output
    assert (tmp_path / "data" / "generator_tokenizer" / "tokenizer.json").is_file()
    # the subprocess ran this checkout: Hydra read the configs next to its rag_lightning package
    hydra_cfg = yaml.safe_load((tmp_path / "run" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main_sources = [s["path"] for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main"]
    assert main_sources == [str(REPO / "conf")]


# one cheap bad input per script (most fail while composing, before torch is imported) and one after loading
SUBPROCESS_BAD_INPUT = [
    ("rag-prepare", lambda s: data_overrides(s.tmp, s.files, corpus_file=str(s.tmp / "nope.jsonl")),
     ["data.corpus_file=", "nope.jsonl"]),
    ("rag-index", lambda s: [*index_overrides(s.tmp, s.files), "index.typ=flat"], ["index.typ is not a config key"]),
    ("rag-train", lambda s: [*s.train, "model.n_doc=3"], ["model.n_doc is not a config key"]),
    ("rag-eval", lambda s: [f"ckpt_path={s.tmp / 'nope.ckpt'}"], ["ckpt_path=", "no such checkpoint"]),
    ("rag-predict", lambda s: ["ckpt_path=x.ckpt", "question=Where?", "model.decoding.num_beam=2"],
     ["model.decoding.num_beam is not a config key"]),
]


@pytest.mark.parametrize(("script", "args", "names"), SUBPROCESS_BAD_INPUT, ids=[s[0] for s in SUBPROCESS_BAD_INPUT])
def test_bad_input_as_a_subprocess(cli_subprocess, tmp_path, tiny_world, tiny_overrides, script, args, names):
    setting = Setting(tmp_path, tiny_world, tiny_overrides(tmp_path), tmp_path / "unused.ckpt")
    run = cli_subprocess(script, *args(setting), f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(run, *names)


def test_rag_debug_shows_the_traceback_in_a_subprocess(cli_subprocess, tmp_path, tiny_world):
    overrides = data_overrides(tmp_path, tiny_world, corpus_file=str(tmp_path / "nope.jsonl"))
    run = cli_subprocess("rag-prepare", *overrides, f"hydra.run.dir={tmp_path / 'run'}", RAG_DEBUG="1")
    assert run.code == 1
    assert "Traceback (most recent call last)" in run.err and "PrepareError" in run.err and "nope.jsonl" in run.err
    run = cli_subprocess("rag-train", "model.n_doc=3", RAG_DEBUG="1")
    assert run.code == 1 and "Traceback (most recent call last)" in run.err and "model.n_doc" in run.err



def test_an_aborting_error_ends_the_process_at_once_with_its_message(tmp_path):
    """A rank-lost error must not go through interpreter shutdown (a broken gloo group can crash it, which
    once turned exit status 2 into a segfault in CI): the message is printed and the process ends with
    status 2 even while a non-daemon thread would keep a normal exit waiting forever."""
    import subprocess
    import sys

    script = tmp_path / "abort.py"
    script.write_text(
        "import threading\n"
        "from rag_lightning.errors import friendly_errors\n"
        "from rag_lightning.pipeline import RankLostError\n"
        "threading.Thread(target=threading.Event().wait).start()\n"
        "print('written before', flush=False)\n"
        "@friendly_errors\n"
        "def main():\n"
        "    raise RankLostError('a DDP process of this job stopped. Fix: resume')\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert "written before" in run.stdout  # buffered output is flushed, not lost
    assert run.stderr.startswith("error: a DDP process of this job stopped. Fix: resume") and "Traceback" not in run.stderr
