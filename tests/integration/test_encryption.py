"""Encryption at rest end to end (issue 24 item 3): `raylab run` with governance.encryption on a
corpus holding a canary string, in its own process (so its embedded Ray's workers get the
setting, as a user's run does). The canary is in no file under the run directory, $RAYLAB_HOME
(registry, cache, logs) or Ray's session directory; every Parquet and safetensors file fails to
open without the key; the registered version still loads and generates; a wrong key is a
UserError naming the file and the key; `raylab keys rotate --retire` leaves everything readable
without the old key. The accepted record ids in the control-plane database are sealed and still found by
lineage; events and eval reports are sealed. Negative control: the same corpus through the data
stage and eval with encryption off leaves the canary findable by the same scan in the shards, the
quarantine and the eval report, and the record ids plain. (Events carry no record content, so no
scan can find the canary there either way; the test checks instead that every event line is sealed.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli

pytestmark = pytest.mark.integration

CANARY = "ZQX-canary-4471"
SEALED_MARK = "sealed-source-31"  # in a source file raylab sealed (as the fine-tuning service keeps uploads)


def corpus(path: Path) -> Path:
    with path.open("w") as f:
        for i in range(40):
            # in every prompt, so the held-out split (and with it the eval report's samples) holds it
            f.write(json.dumps({"prompt": f"Ticket {i}: is the red widget in stock? Account note {CANARY}.",
                                "response": "The red widget is in stock. The widget ships today."}) + "\n")
        f.write(json.dumps({"txt": f"a record without its text field {CANARY}"}) + "\n")  # quarantined
    return path


def job_config(root: Path, encrypted: bool) -> dict:
    cfg = {"version": 1, "output_dir": str(root / "out"), "offline": True,
           "data": {"sources": [{"type": "jsonl", "path": str(corpus(root / "docs.jsonl")), "format": "instruction"}],
                    "max_seq_len": 256,  # the preset's tokenizer is byte-level: a templated record is ~150
                    "val_fraction": 0.2, "dedup": {"near": False}},
           "model": {"name_or_path": "preset:tiny-llama", "method": "lora", "lora": {"r": 8, "alpha": 16}},
           "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 4, "eval_every": 4, "log_every": 2},
           "eval": {"max_samples": 2, "max_new_tokens": 4, "show_samples": 2}}
    if encrypted:
        cfg["governance"] = {"encryption": {"enabled": True, "key_file": str(root / "keys" / "ring.json")}}
        cfg["data"]["sources"].append({"type": "jsonl", "path": str(sealed_source(root, cfg)), "format": "instruction"})
    return cfg


def sealed_source(root: Path, cfg: dict) -> Path:
    """10 records in a file sealed with the run's key: the data stage's reader must open it."""
    from raylab import config
    from raylab.core import crypto, storage

    path = root / "uploads" / "sealed.jsonl"
    text = "".join(json.dumps({"prompt": f"Order {i}: where is parcel {SEALED_MARK}-{i}?", "response": "It ships today."})
                   + "\n" for i in range(10))
    before = os.environ.get(crypto.ENV)
    os.environ[crypto.ENV] = crypto.settings_of(config.load_dict(cfg)).to_env()
    try:
        storage.write_bytes(str(path), text.encode())
    finally:
        if before is None:
            del os.environ[crypto.ENV]
        else:
            os.environ[crypto.ENV] = before
    assert crypto.is_sealed(path.read_bytes())
    return path


def findings(*roots: Path) -> dict[str, str]:
    """{file: how} for every file under `roots` holding the canary: in its bytes, or in its
    rows when it opens as Parquet (zstd pages hide plain text from a byte scan)."""
    found = {}
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if CANARY.encode() in data:
                found[str(path)] = "bytes"
            elif data[-4:] == b"PAR1":
                if CANARY in json.dumps(pq.read_table(path).to_pylist(), default=str):
                    found[str(path)] = "parquet rows"
    return found


@pytest.fixture(scope="module")
def governed(tmp_path_factory):
    root = tmp_path_factory.mktemp("governed")
    (root / "cfg.yaml").write_text(yaml.safe_dump(job_config(root, encrypted=True)))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    (root / "ray").symlink_to(ray_tmp)
    env = {"RAYLAB_HOME": str(root / "home"), "RAY_TMPDIR": str(ray_tmp)}
    proc = run_cli("run", str(root / "cfg.yaml"), "--no-serve", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluated = run_cli("eval", str(root / "cfg.yaml"), env=env, timeout=600)  # eval/: reports quoting prompts
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    yield root, env, proc.stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_nothing_plain_at_rest_yet_the_pipeline_runs(governed, monkeypatch):
    root, env, out = governed
    assert "gates: out/1 PASSED" in out and "audit: chain verified" in out
    assert findings(root / "out", root / "home", Path(env["RAY_TMPDIR"])) == {}
    sealed = [p for p in (root / "out").rglob("*") if p.suffix in (".parquet", ".safetensors")]
    assert {p.parent.name for p in sealed if p.suffix == ".parquet"} >= {"train", "val", "records", "quarantine"}
    assert any(p.suffix == ".safetensors" for p in sealed)
    for p in sealed:
        with pytest.raises((pa.ArrowInvalid, OSError, Exception)):
            if p.suffix == ".parquet":
                pq.read_table(p)
            else:
                from safetensors import safe_open

                safe_open(str(p), "pt")

    from raylab import models
    from raylab.config import load
    from raylab.core import crypto, storage

    monkeypatch.setenv("RAYLAB_HOME", env["RAYLAB_HOME"])
    monkeypatch.setenv(crypto.ENV, crypto.settings_of(load(root / "cfg.yaml")).to_env())
    records = storage.read_table(str(root / "out" / "data" / "records")).to_pylist()
    assert sum(CANARY in json.dumps(r, default=str) for r in records) == 40  # the data is there, sealed
    assert sum(SEALED_MARK in json.dumps(r, default=str) for r in records) == 10  # the sealed source, opened
    reports = [p for p in (root / "out" / "eval").rglob("*") if p.is_file()]
    assert reports and all(crypto.is_sealed(p.read_bytes()) for p in reports)
    assert CANARY in storage.read_text(str(root / "out" / "eval" / "report.json"))  # its samples quote the corpus
    event_logs = [p for p in (root / "out").rglob("events.jsonl")] + [p for p in (root / "home").rglob("events.jsonl")]
    lines = [ln for p in event_logs for ln in p.read_text().splitlines()]
    assert event_logs and lines and all(ln.startswith("RLE1:") for ln in lines)  # every event sealed

    # the control-plane database keeps the accepted record ids sealed, yet lineage finds them
    import sqlite3

    from raylab.core import lineage

    with sqlite3.connect(root / "home" / "raylab.db") as db:
        stored = [r[0] for r in db.execute("select record_id from record_index")]
    assert len(stored) == 50 and all(s.startswith(lineage.SEALED) for s in stored)
    assert [h.run for h in lineage.runs_with(record_id="docs.jsonl:3")] == [str(root / "out")]
    inf = models.load("out/1")  # the registered version, from the registry's sealed copy
    ids = inf.tokenizer("Ticket 3:", return_tensors="pt").input_ids
    assert inf.model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_wrong_key_is_exit_2_naming_file_and_key(governed):
    root, env, _ = governed
    ring = json.loads((root / "keys" / "ring.json").read_text())
    proc = run_cli("data", str(root / "cfg.yaml"), f"governance.encryption.key_file={root / 'other.json'}",
                   env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"encrypted with key {ring['active']}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "other.json").exists()  # refused before writing: no key, no event sealed with it


def test_rotation_rewraps_everything(governed, monkeypatch):
    root, env, _ = governed
    old = json.loads((root / "keys" / "ring.json").read_text())["active"]
    proc = run_cli("keys", "rotate", "--config", str(root / "cfg.yaml"), "--retire", env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ring = json.loads((root / "keys" / "ring.json").read_text())
    assert ring["active"] != old and list(ring["keys"]) == [ring["active"]]  # the old key is gone
    assert f"retired {old}" in proc.stdout and "record-id key" in proc.stdout
    proc = run_cli("lineage", "docs.jsonl:3", "--config", str(root / "cfg.yaml"), env=env, timeout=300)
    assert proc.returncode == 0 and str(root / "out") in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]

    from raylab import models
    from raylab.config import load
    from raylab.core import crypto, storage

    crypto._deks.clear()
    monkeypatch.setenv("RAYLAB_HOME", env["RAYLAB_HOME"])
    monkeypatch.setenv(crypto.ENV, crypto.settings_of(load(root / "cfg.yaml")).to_env())
    assert len(storage.read_table(str(root / "out" / "data" / "train"))) > 0
    assert models.load("out/1").model is not None  # readable without the retired key


def test_negative_control_the_scan_finds_the_canary_without_encryption(tmp_path, reference):
    import sqlite3

    from raylab import config
    from raylab.data import run_data
    from raylab.evaluate import run_eval

    cfg = config.load_dict(job_config(tmp_path, encrypted=False))
    run_data(cfg)
    # the eval report with the session's trained adapter (same preset base): its samples quote the prompts
    adapter_cfg, _ = reference
    shutil.copytree(Path(adapter_cfg.output_dir) / "train" / "final", tmp_path / "out" / "train" / "final")
    run_eval(cfg)
    found = findings(tmp_path / "out")
    kinds = {Path(f).parent.name for f in found}
    # records hold the text (train/val hold token ids); the quarantine holds the raw bad row
    assert {"records", "quarantine", "eval"} <= kinds, found
    assert os.path.exists(tmp_path / "out" / "data" / "manifest.json")
    with sqlite3.connect(os.path.join(os.environ["RAYLAB_HOME"], "raylab.db")) as db:  # ids plain without encryption
        assert db.execute("select count(*) from record_index where record_id = 'docs.jsonl:3'").fetchone()[0] >= 1
