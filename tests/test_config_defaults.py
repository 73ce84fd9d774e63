"""One source of defaults: the dataclasses in rag_lightning/config.py.

The files of each schema-backed group extend the group's `_schema` (the dataclass, stored in Hydra's
ConfigStore), so every key exists with the dataclass default; a file sets only what differs from it (or
what is a path), never restates a default that could then drift. The root config's plain sections
(`loader`, `context`) agree with their dataclasses key by key.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from omegaconf import MISSING, OmegaConf

from rag_lightning.conf_path import CONFIG_DIR
from rag_lightning.config import SCHEMAS, ContextConfig, LoaderConfig, section

CONF = Path(CONFIG_DIR)
GROUP_FILES = [(group, path) for group in SCHEMAS for path in sorted((CONF / group).glob("*.yaml"))]
# the key that names the option itself may equal the default: minilm.yaml says kind: minilm
CHOICE_KEYS = {"kind", "mode", "type"}


def _defaults_chain(group: str, path: Path) -> list[str]:
    node = OmegaConf.load(path)
    entries = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    chain = []
    for entry in entries:
        chain.append(entry)
        if entry != "_schema" and (CONF / group / f"{entry}.yaml").is_file():
            chain += _defaults_chain(group, CONF / group / f"{entry}.yaml")
    return chain


def _leaves(node: Any, schema: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value in the file, dataclass default) for every leaf the file sets under a dataclass field."""
    out = []
    for key, value in node.items():
        if key == "defaults" or not is_dataclass(schema):
            continue
        default = {f.name: f for f in fields(schema)}[key]
        current = getattr(schema(), key) if isinstance(schema, type) else getattr(schema, key)
        if is_dataclass(current) and isinstance(value, dict):
            out += _leaves(value, current, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value, current if default else None))
    return out


@pytest.mark.parametrize(("group", "path"), GROUP_FILES, ids=lambda x: str(x) if isinstance(x, str) else x.name)
def test_group_files_extend_the_schema(group: str, path: Path) -> None:
    assert "_schema" in _defaults_chain(group, path), f"{path} must extend {group}/_schema in its defaults"


@pytest.mark.parametrize(("group", "path"), GROUP_FILES, ids=lambda x: str(x) if isinstance(x, str) else x.name)
def test_group_files_set_only_what_differs(group: str, path: Path) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    # unknown keys fail here (the schema is the list of keys)
    OmegaConf.merge(OmegaConf.structured(SCHEMAS[group]), {k: v for k, v in raw.items()})
    restated = [
        f"{key}: {value!r}"
        for key, value, default in _leaves(raw, SCHEMAS[group])
        if key.split(".")[-1] not in CHOICE_KEYS and value == getattr(default, "value", default)
        and default is not MISSING
    ]
    assert not restated, f"{path} restates dataclass defaults (drop them): {restated}"


@pytest.mark.parametrize(("key", "schema"), [("loader", LoaderConfig), ("context", ContextConfig)])
def test_root_sections_agree_with_their_dataclasses(key: str, schema: type) -> None:
    node = OmegaConf.load(CONF / "train.yaml")[key]
    typed = section(schema, node, key)
    assert typed == schema(), f"conf/train.yaml `{key}` differs from {schema.__name__}'s defaults"
    assert set(node) == {f.name for f in fields(schema)}


def test_a_default_changed_in_the_dataclass_reaches_the_composed_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The composed config takes its defaults from the dataclass, not from a copy in YAML."""
    from hydra import compose, initialize_config_dir

    from rag_lightning.config import IndexConfig, register_configs

    monkeypatch.setattr(IndexConfig, "__dataclass_fields__", dict(IndexConfig.__dataclass_fields__))
    field = IndexConfig.__dataclass_fields__["ef_search"]
    monkeypatch.setattr(field, "default", 321)
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("index", overrides=["index=hnsw"])
        assert cfg.index.ef_search == 321
    finally:
        monkeypatch.undo()
        register_configs()
