"""Dependencies run one way: floor -> data -> models -> retrieval -> pipeline -> entry points.

Every import of `rag_lightning.*` in the package (at module level or inside a function) is read from the source
with `ast`; a module may import its own layer or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rag_lightning"
# the order of the house (README, "Code layout"); a module not named here fails the test until it is placed
LAYERS = [
    ("floor", {"__init__", "config", "errors", "files", "padding", "metrics", "resolvers", "conf_path"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("retrieval", {"retrieval"}),
    ("pipeline", {"pipeline", "callbacks", "ddp", "tracking", "export", "resume", "dpr_stage"}),
    ("entry points", {"prepare", "index", "train", "eval", "predict", "report", "train_retriever"}),
]


def layer_of(module: str) -> int:
    """Layer index of a dotted module name inside the package (`rag_lightning.models.module` -> models)."""
    parts = module.split(".")
    assert parts[0] == "rag_lightning", module
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/layout.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every `rag_lightning` import of the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("rag_lightning")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rag_lightning"):
            if node.module == "rag_lightning":  # `from rag_lightning import metrics`
                found += [(f"rag_lightning.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    here = layer_of(module_name(path))
    against = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} ({LAYERS[layer_of(name)][0]}) from the "
        f"{LAYERS[here][0]} layer"
        for name, line in imports_of(path)
        if layer_of(name) > here
    ]
    assert not against, "\n".join(against)


def test_the_checker_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from rag_lightning.pipeline import train\nfrom rag_lightning import metrics\n")
    assert sorted(imports_of(source)) == [("rag_lightning.metrics", 3), ("rag_lightning.pipeline", 2)]
    assert layer_of("rag_lightning.pipeline") > layer_of("rag_lightning.models.module") > layer_of("rag_lightning.config")


def test_the_lower_layers_take_no_composed_config() -> None:
    """Below the pipeline nothing reads a DictConfig or HydraConfig: typed sections or plain arguments."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
        for sub in ("data", "models", "retrieval")
        for path in sorted((PACKAGE / sub).rglob("*.py"))
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(word in line for word in ("DictConfig", "HydraConfig", "cfg: Any"))
    ]
    assert not offenders, "\n".join(offenders)
