"""Every shipped config validates, and its plan fits an embedded Ray on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli
from raylab import config
from raylab.core import plan

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config.load(path)
    assert cfg.version == 1
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and any("raylab" in line for line in lines[:8]), "header gives the command"
    for source in cfg.data.sources:
        if getattr(source, "path", None):
            assert Path(source.path).exists(), f"{path.name}: {source.path} is not shipped"
    proc = run_cli("validate", str(path.relative_to(REPO)), "ray.address=null")
    assert proc.returncode == 0, proc.stderr


def test_quickstart_fits_a_two_core_machine():
    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    the_plan = plan.make_plan(cfg, [plan.Node(4, 0)], cores=2)
    assert the_plan.problems() == []
