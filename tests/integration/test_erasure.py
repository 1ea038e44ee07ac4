"""Erasure end to end on the session Ray: a data run indexes its records; `erase` puts one on
the suppression list and marks the version trained on that run; the next data run (same
config and files: the cache must not answer) drops the record from records and shards and
counts it `erased`; the marked version cannot be promoted without --force.

    pytest -m "integration or not integration" tests/integration/test_erasure.py

The control-plane database, audit checkpoints and registry are this test's own: a suppression
in the session's database would drop the same record id from every later test's data runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raylab import config, models, registry
from raylab.core import audit, controldb, events, runs
from raylab.data import run_data
from raylab.errors import UserError
from raylab.lineage import run_erase, run_lineage
from registry_helpers import META, fake_final

pytestmark = pytest.mark.integration

CANARY = "quartzlemming"  # not a name: PII redaction would hide a name from the check


@pytest.fixture
def governed(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_DATABASE_URL", f"sqlite:///{tmp_path / 'control.db'}")
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    yield tmp_path
    controldb.dispose_all()


def decoded_shards(run: runs.Run, tok) -> str:
    """Every packed training and validation sequence, as text."""
    rows = [row for split in ("train", "val") for f in sorted(Path(run.split(split)).glob("*.parquet"))
            for row in pq.read_table(f, columns=["input_ids"])["input_ids"].to_pylist()]
    return "\n".join(tok.decode(r) for r in rows)


def test_an_erased_record_leaves_the_next_data_run_and_blocks_promotion(governed, _session_ray):
    corpus = governed / "tickets.jsonl"
    lines = [f"Ticket {i}: the widget order number {i} ships on day {i}." for i in range(1, 13)]
    lines[2] = f"Ticket 3: the {CANARY} customer wants her widget."
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    raw = {"version": 1, "output_dir": str(governed / "run"), "offline": True, "registry": {"model_name": "widgets"},
           "model": {"name_or_path": "preset:tiny-llama"},
           "data": {"sources": [{"type": "jsonl", "path": str(corpus), "name": "tickets"}],
                    "max_seq_len": 128, "val_fraction": 0.25,
                    "dedup": {"exact": False, "near": False}}}  # dedup is not the subject: its shuffles cost time
    cfg = config.load_dict(raw)
    run, tok = runs.Run(cfg.output_dir), models.load_tokenizer(cfg.model)

    first = run_data(cfg)
    records = pq.read_table(run.split("records")).to_pylist()
    hits = [r["record_id"] for r in records if CANARY in r["text"]]
    assert len(hits) == 1, first["counts"]
    target = hits[0]
    # the negative control: without the suppression the record is in the records and the shards
    assert first["counts"]["erased"] == 0 and CANARY in decoded_shards(run, tok)
    first_hash = runs.manifest_hash(runs.DataManifest.model_validate(first))

    store = registry.open_store()
    run_id = registry.log_run(store, registry.experiment_id(store, "widgets"), name="r1", key="erasure-k1",
                              params={}, history=[], artifacts={}, tags={})
    mv = registry.register(store, cfg, run_id, str(fake_final(governed, "final")),
                           META | {"data_manifest_hash": first_hash})  # what the train stage records
    registry.set_tags(store, "widgets", int(mv.version), {"raylab.gates.status": "passed"})

    before = run_lineage(record_id=target, store=store)
    assert [(d["run"], d["manifest_hash"]) for d in before["data_runs"]] == [(run.root, first_hash)]
    assert [(v["name"], v["version"]) for v in before["versions"]] == [("widgets", int(mv.version))]

    erased = run_erase(target, "request 77 from the data subject", source="tickets", store=store)
    assert erased["marked"] == [f"widgets/{mv.version}"]

    second = run_data(cfg)  # same config and files: only the suppression list changed
    assert second["cache"] == {"hit": False}
    c = second["counts"]
    assert c["erased"] == 1 and second["by_source"]["tickets"]["erased"] == 1
    assert c["read"] == 12 and c["accepted"] == first["counts"]["accepted"] - 1
    assert c["read"] == c["accepted"] + c["rejected"] + sum(c["duplicates"].values()) + c["erased"]
    kept = pq.read_table(run.split("records")).to_pylist()
    assert target not in {r["record_id"] for r in kept} and all(CANARY not in r["text"] for r in kept)
    assert CANARY not in decoded_shards(run, tok)
    assert not any(CANARY in str(r) for r in pq.read_table(run.split("quarantine")).to_pylist())

    after = run_lineage(record_id=target, store=store)
    assert [d["manifest_hash"] for d in after["data_runs"]] == [first_hash]  # the new run does not hold it
    assert after["versions"][0]["erasure_pending"] == [str(erased["entry"]["id"])]
    with pytest.raises(UserError, match="erasure_pending"):
        registry.promote(store, "widgets", int(mv.version))
    assert "production" not in registry.registered_model(store, "widgets").aliases

    kinds = [e["kind"] for e in audit.entries(audit.Settings.from_env())]
    assert "data.erase" in kinds and "registry.erasure_pending" in kinds
    assert events.read(run.events)  # the data runs' own events still land in the run
