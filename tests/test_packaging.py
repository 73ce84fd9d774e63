"""The wheel ships conf/, so a non-editable install composes the same configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_hydra_configs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("rag_lightning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("rag_lightning/conf/") for n in names if n.startswith("rag_lightning/conf/")}
    in_repo = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert in_repo and in_repo <= shipped
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import rag_lightning.conf_path as c, sys; "
        "from hydra import compose, initialize_config_dir; "
        "initialize_config_dir(config_dir=c.CONFIG_DIR, version_base='1.3').__enter__(); "
        "print(c.CONFIG_DIR); print(compose('train').experiment_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)}, check=True,
        capture_output=True, text=True,
    ).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == "world_rag_token"
