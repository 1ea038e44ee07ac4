"""The run-directory layout lives in raylab/core/runs.py alone, and the typed stage outputs
refuse a file that lacks what their readers rely on."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from manifests import fake_manifest
from raylab.core import runs, storage
from raylab.errors import UserError

PACKAGE = Path(runs.__file__).resolve().parents[1]
RUNS_PY = Path(runs.__file__).resolve()
STORAGE_PY = PACKAGE / "core" / "storage.py"


def layout_names() -> set[str]:
    """Every file name the layout defines (string constants of runs.py that name a file)."""
    tree = ast.parse(RUNS_PY.read_text())
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return {n for n in names if "." in n and "/" not in n and " " not in n and n.rsplit(".", 1)[-1].isalpha()
            and len(n.rsplit(".", 1)[-1]) <= 5 and not n.startswith(".")}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def offences(source: str, names: set[str]) -> list[str]:
    """Run-layout file names used as values, and run paths joined by hand (storage.join)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in names:
                found.append(f"line {node.lineno}: literal {node.value!r}")
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            found += [f"line {node.lineno}: f-string names {n!r}" for n in names if f"/{n}" in text]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "storage":
            found.append(f"line {node.lineno}: storage.join builds a path by hand")
    return found


def test_the_layout_knows_its_files():
    names = layout_names()
    assert {"config.resolved.yaml", "manifest.json", "metrics.jsonl", "raylab_train.json", "results.json",
            "best.yaml", "report.md", "endpoint.json", "mlflow.db"} <= names


def test_the_checker_catches_a_hand_built_run_path():  # negative control: the scan has teeth
    names = layout_names()
    bad = 'from raylab.core import storage\np = storage.join(out, "data", "manifest.json")\nq = f"{out}/train/metrics.jsonl"\n'
    assert len(offences(bad, names)) == 3
    assert offences('"""Writes manifest.json."""\nx = run.manifest\n', names) == []


def test_no_run_directory_path_is_built_outside_core_runs():
    names = layout_names()
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in (RUNS_PY, STORAGE_PY):
            continue
        found = offences(path.read_text(), names)
        if found:
            problems[str(path.relative_to(PACKAGE))] = found
    assert problems == {}, "run-directory paths belong in raylab/core/runs.py: " + json.dumps(problems, indent=1)


def test_layout_follows_the_design(tmp_path):
    run = runs.Run(str(tmp_path / "q1"))
    assert run.name == "q1"
    assert run.manifest == f"{tmp_path}/q1/data/manifest.json"
    assert run.split("quarantine") == f"{tmp_path}/q1/data/quarantine"
    assert run.train_meta == f"{tmp_path}/q1/train/final/raylab_train.json"
    assert run.pretrain.train_final == f"{tmp_path}/q1/pretrain/train/final"
    assert run.trial("abc").train_metrics == f"{tmp_path}/q1/tune/trials/abc/train/metrics.jsonl"
    assert run.tune_file("best") == f"{tmp_path}/q1/tune/best.yaml"
    assert run.eval_file("report_md") == f"{tmp_path}/q1/eval/report.md"
    assert runs.Run("s3://bucket/runs/q1/").manifest == "s3://bucket/runs/q1/data/manifest.json"
    with pytest.raises(ValueError, match="unknown data split"):
        run.split("test")


def test_typed_output_round_trip_and_a_clear_error_for_a_broken_file(tmp_path):
    run = runs.Run(str(tmp_path / "r"))
    runs.write_json(run.manifest, runs.DataManifest.model_validate(fake_manifest(seq_len=16)))
    back = runs.read_manifest(run)
    assert back.tokens.train.sequences == 1 and back.counts.rejected == 1 and back.outputs["val"] == "v"
    broken = fake_manifest(seq_len=16)
    del broken["tokens"]["val"]
    storage.write_text(run.manifest, json.dumps(broken))
    with pytest.raises(UserError, match=r"not a valid DataManifest \(tokens\.val\).*re-run the stage"):
        runs.read_manifest(run)
    with pytest.raises(UserError, match="run `raylab data c.yaml` first"):
        runs.read_manifest(runs.Run(str(tmp_path / "none")), "c.yaml")


def test_nan_metrics_stay_nan(tmp_path):
    where = str(tmp_path / "m.json")
    meta = runs.Output.model_validate({"val_loss": float("nan")})
    runs.write_json(where, meta)
    assert "NaN" in Path(where).read_text()
