"""Every shipped config validates, and its plan fits an embedded Ray on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, cli_here
from raylab import config
from raylab.core import plan


def shipped_configs(root: Path) -> list[Path]:
    """Every YAML file under root, in subfolders too."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


# configs/families/ name hub checkpoints and a GPU: on a machine with neither, validate rightly
# refuses them; tests/integration/test_family_configs.py validates and runs each with a tiny
# local model of its family instead.
FAMILIES = REPO / "configs" / "families"
CONFIGS = [p for p in shipped_configs(REPO / "configs") if FAMILIES not in p.parents]


def test_there_are_shipped_configs():
    # An empty list would make the parametrized test below pass vacuously (pytest skips it).
    assert CONFIGS, "no YAML found under configs/"
    assert REPO / "configs" / "quickstart.yaml" in CONFIGS


def test_shipped_configs_are_found_in_subfolders(tmp_path):
    (tmp_path / "examples" / "deep").mkdir(parents=True)
    for name in ("top.yaml", "examples/a.yaml", "examples/deep/b.yml", "examples/notes.md"):
        (tmp_path / name).write_text("version: 1\n")
    assert [p.relative_to(tmp_path).as_posix() for p in shipped_configs(tmp_path)] == [
        "examples/a.yaml", "examples/deep/b.yml", "top.yaml"]
    assert shipped_configs(tmp_path / "examples" / "deep" / "missing") == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_validates(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = config.load(path)
    assert cfg.version == 1
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#") and any("raylab" in line for line in lines[:8]), "header gives the command"
    for source in cfg.data.sources:
        if getattr(source, "path", None):
            assert Path(source.path).exists(), f"{path.relative_to(REPO)}: {source.path} is not shipped"
    proc = cli_here("validate", str(path.relative_to(REPO)), "ray.address=null")  # in process: tests/unit/test_cli.py runs the command
    assert proc.returncode == 0, proc.stderr


def test_quickstart_fits_a_two_core_machine():
    cfg = config.load(REPO / "configs" / "quickstart.yaml")
    the_plan = plan.make_plan(cfg, [plan.Node(4, 0)], cores=2)
    assert the_plan.problems() == []
