"""Shared fixtures: a tiny synthetic QA world and the tiny-model configs composed on it, the synthetic corpus
of the store/index tests, and the console scripts run as a user runs them (in process and as subprocesses).

Test modules take these as fixtures; no test module imports another.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_lightning.conf_path import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ the tiny QA world
COUNTRIES = [
    ("Aland", "Mariehamn"), ("Borduria", "Szohod"), ("Carpania", "Valdek"), ("Dorvia", "Pellin"),
    ("Elbonia", "Mudville"), ("Florin", "Guilder"), ("Genovia", "Pyrus"), ("Hyrule", "Kakariko"),
    ("Ixania", "Zorbal"), ("Jotunheim", "Utgard"), ("Krakozhia", "Lavinka"), ("Latveria", "Doomstadt"),
]


def write_tiny_world(root: Path) -> dict[str, str]:
    """Corpus with one passage per country plus distractors; QA with gold passage ids."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = []
    for i, (country, capital) in enumerate(COUNTRIES):
        corpus.append({"id": f"c{i}", "title": country, "text": f"{country} is a country. Its capital is {capital}."})
        corpus.append({"id": f"d{i}", "title": f"{country} river", "text": f"A river flows through {country}."})
    qa = [
        {"id": f"q{i}", "question": f"What is the capital of {country}?", "answers": [capital],
         "gold_passage_ids": [f"c{i}"], "relation": "capital"}
        for i, (country, capital) in enumerate(COUNTRIES)
    ]
    files = {"corpus": root / "corpus.jsonl", "train": root / "train.jsonl", "val": root / "val.jsonl",
             "test": root / "test.jsonl"}
    files["corpus"].write_text("".join(json.dumps(r) + "\n" for r in corpus))
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in qa[:8]))
    files["val"].write_text("".join(json.dumps(r) + "\n" for r in qa[8:]))
    files["test"].write_text("".join(json.dumps(r) + "\n" for r in qa[8:]))
    return {k: str(v) for k, v in files.items()}


def tiny_world_overrides(root: Path) -> list[str]:
    """`experiment=tiny` on the tiny world under `root` (data written on first use), as CLI overrides."""
    data = root / "data"
    files = write_tiny_world(data) if not (data / "corpus.jsonl").exists() else {
        k: str(data / f"{k}.jsonl") for k in ("corpus", "train", "val", "test")
    }
    return [
        "experiment=tiny",
        "data=jsonl",
        f"data.dir={data}",
        f"data.corpus_file={files['corpus']}",
        f"data.train_file={files['train']}",
        f"data.val_file={files['val']}",
        f"data.test_file={files['test']}",
        "data.tokenizer.vocab_size=300",
        f"paths.cache_dir={root / 'cache'}",
        "index.progress=false",
    ]


def compose_tiny_train(root: Path, *overrides: str, run_dir: Path | None = None) -> DictConfig:
    """`rag-train experiment=tiny` on the tiny world, as composed by Hydra (output dir given explicitly)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_world_overrides(root), *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir or root / "run")
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture
def tiny_world(tmp_path: Path) -> dict[str, str]:
    """The tiny world's files under ``tmp_path/data`` (corpus, train, val, test), as tiny_overrides
    writes and uses them."""
    return write_tiny_world(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_overrides() -> Callable[[Path], list[str]]:
    """``tiny_overrides(root)``: the command-line overrides of `experiment=tiny` on the tiny world under
    root."""
    return tiny_world_overrides


@pytest.fixture(scope="session")
def write_world() -> Callable[[Path], dict[str, str]]:
    """``write_world(root)``: write the tiny world's files into ``root`` (for module-scoped fixtures)."""
    return write_tiny_world


@pytest.fixture(scope="session")
def tiny_train_config() -> Callable[..., DictConfig]:
    """``tiny_train_config(root, *overrides, run_dir=None)``: the composed train config (run dir root/run)."""
    return compose_tiny_train


@pytest.fixture
def eval_config() -> Callable[[Path, Path], DictConfig]:
    """``eval_config(ckpt, out)``: `rag-eval ckpt_path=<ckpt> accelerator=cpu` composed, writing into out."""

    def make(ckpt: Path, out: Path) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "accelerator=cpu"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        return cfg

    return make


@pytest.fixture
def rag_train() -> Callable[..., subprocess.CompletedProcess]:
    """``rag_train(root, *args)``: the `rag-train` console script in a subprocess (in-process DDP would re-run
    pytest in the child), outputs under root; fails the test unless it exits 0."""

    def run(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAG_ROOT": str(root), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
        for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
            env.pop(key, None)
        command = [str(Path(sys.executable).with_name("rag-train")), *args]
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"rag-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return proc

    return run


# ------------------------------------------------------------------------------------------ synthetic corpus
TEXTS = [
    ("Paris", "Paris is the capital of France. It has 2,102,650 inhabitants (2023)."),
    ("Zürich", "Zürich lies on Lake Zürich; its name was Turicum in Roman times."),
    ("", "A passage without a title, with  two spaces and a tab\there."),
    ("São Paulo", "São Paulo's population is about 12 million — the largest city in Brazil."),
    ("Mount Everest", "Everest (8,849 m) is Earth's highest mountain above sea level!"),
    ("C/2020 F3", "Comet NEOWISE, designated C/2020 F3, was visible to the naked eye in July 2020."),
    ("Oxygen", "Oxygen has atomic number 8 and symbol O. It is the third most abundant element."),
    ("Tokyo", "東京 (Tokyo) is the capital of Japan and its most populous city."),
]


def _synthetic_passages(n: int = 40) -> list:
    """``n`` passages cycling through varied titles/texts (unicode, numbers, punctuation, empty titles)."""
    from rag_lightning.data.readers import Passage

    return [
        Passage(id=f"p{i}", title=TEXTS[i % len(TEXTS)][0], text=f"{TEXTS[i % len(TEXTS)][1]} Fact {i}.")
        for i in range(n)
    ]


def _make_gen_tokenizer(directory: Path):
    """The project's byte-level BPE generator tokenizer, trained on the synthetic texts."""
    from rag_lightning.data.gen_tokenizer import train_generator_tokenizer

    texts = [f"{t} / {x}" for t, x in TEXTS] * 5 + ["Who is the capital? What is the number of Oxygen?"]
    return train_generator_tokenizer(texts, directory, vocab_size=1000, min_frequency=1)


def _ctx_tokenizer():
    """MiniLM's BERT tokenizer (the context encoder's), offline."""
    from transformers import BertTokenizerFast

    from rag_lightning.models.encoders import minilm_dir

    return BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)


@pytest.fixture(scope="session")
def synthetic_passages() -> Callable[..., list]:
    """``synthetic_passages(n=40)``: the varied synthetic passages of the store, index and retriever tests."""
    return _synthetic_passages


@pytest.fixture(scope="session")
def make_gen_tokenizer() -> Callable[[Path], object]:
    """``make_gen_tokenizer(directory)``: a generator tokenizer trained on the synthetic texts."""
    return _make_gen_tokenizer


@pytest.fixture(scope="session")
def ctx_tokenizer() -> Callable[[], object]:
    """``ctx_tokenizer()``: the context encoder's tokenizer."""
    return _ctx_tokenizer


# ------------------------------------------------------------------------------------------ console scripts
# [project.scripts] of pyproject.toml (tests/test_cli.py checks the two agree)
ENTRY_POINTS = {
    "rag-prepare": "rag_lightning.prepare",
    "rag-index": "rag_lightning.index",
    "rag-train": "rag_lightning.train",
    "rag-train-retriever": "rag_lightning.train_retriever",
    "rag-eval": "rag_lightning.eval",
    "rag-predict": "rag_lightning.predict",
    "rag-report": "rag_lightning.report.cli",
}


@pytest.fixture(scope="session")
def entry_points() -> dict[str, str]:
    """Console script name -> the module whose main() it runs."""
    return dict(ENTRY_POINTS)


QUIET_ENV = {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


@dataclass
class CliRun:
    """What a console script did: its exit status and what it printed."""

    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err

    def error_block(self) -> list[str]:
        """The stderr lines from the first `error:` line on (empty when there is none)."""
        lines = self.err.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        return lines[starts[0]:] if starts else []


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_script_in_process(script: str, *args: str) -> CliRun:
    """`script args...` through sys.argv and the entry point's main(), here (coverage sees it). Hydra's global
    state and the logging handlers it installs are reset around the call; exceptions other than SystemExit
    (RAG_DEBUG=1) propagate."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    main = importlib.import_module(ENTRY_POINTS[script]).main
    handlers, level = logging.root.handlers[:], logging.root.level
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    GlobalHydra.instance().clear()
    sys.argv = [script, *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = _exit_code(exit_.code)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
        for handler in logging.root.handlers:
            if handler not in handlers:
                handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return CliRun(code, out.getvalue(), err.getvalue())


def script_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a console script run by the tests: outputs under root, this checkout's code first
    on the path, no debug switches inherited."""
    env = {**os.environ, **QUIET_ENV, "RAG_ROOT": str(root), **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    inherited = ("RAG_DEBUG", "HYDRA_FULL_ERROR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in inherited:
        if key not in extra:
            env.pop(key, None)
    return env


def script_command(script: str) -> list[str]:
    """The installed console script beside this Python, else `python -m <its module>`."""
    installed = Path(sys.executable).with_name(script)
    return [str(installed)] if installed.is_file() else [sys.executable, "-m", ENTRY_POINTS[script]]


def run_script_subprocess(root: Path, script: str, *args: str, timeout: int = 300, **env: str) -> CliRun:
    """`script args...` as a user runs it, in a subprocess started in root."""
    proc = subprocess.run([*script_command(script), *args], cwd=root, env=script_env(root, **env),
                          capture_output=True, text=True, timeout=timeout)
    return CliRun(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliRun]:
    """``cli("rag-train", *overrides)``: a console script run in this process from tmp_path, with RAG_ROOT
    there (so nothing is written into the repository's outputs/)."""
    for key, value in {**QUIET_ENV, "RAG_ROOT": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAG_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.chdir(tmp_path)
    return run_script_in_process


@pytest.fixture
def cli_subprocess(tmp_path: Path) -> Callable[..., CliRun]:
    """``cli_subprocess("rag-train", *overrides, RAG_DEBUG="1")``: a console script in a subprocess started in
    tmp_path, RAG_ROOT there, extra environment as keywords."""

    def run(script: str, *args: str, **env: str) -> CliRun:
        return run_script_subprocess(tmp_path, script, *args, **env)

    return run


@dataclass
class TinyRun:
    """One `rag-train experiment=tiny` run on the tiny world: its root (data/, cache/), run dir and output."""

    root: Path
    run_dir: Path
    result: CliRun
    overrides: list[str]

    def best_checkpoint(self) -> Path:
        return next((self.run_dir / "checkpoints").glob("step*.ckpt"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRun]:
    """`rag-train experiment=tiny` on the tiny world, run once per session in this process through the entry
    point, for the tests that need a trained checkpoint (rag-eval, rag-predict). Treat it as read-only."""
    root = tmp_path_factory.mktemp("tiny_run")
    run_dir = root / "run"
    overrides = [*tiny_world_overrides(root), f"hydra.run.dir={run_dir}"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**QUIET_ENV, "RAG_ROOT": str(root)}.items():
            mp.setenv(key, value)
        mp.delenv("RAG_DEBUG", raising=False)
        mp.delenv("HYDRA_FULL_ERROR", raising=False)
        mp.chdir(root)
        result = run_script_in_process("rag-train", *overrides)
    assert result.code == 0, f"rag-train failed:\n{result.out[-3000:]}\n{result.err[-6000:]}"
    yield TinyRun(root, run_dir, result, overrides)
