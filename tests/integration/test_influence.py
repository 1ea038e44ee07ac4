"""`raylab explain --influence` end to end on the session's trained run (conftest `reference`:
the data stage and Ray Train on the shared ticket corpus, checkpoints at steps 12 and 24):
Ray Data scores every document of the packed train shards in an actor pool, the top ones are
joined back to data/records/ by their token ids, and the output states that it is an
approximation (one Ray Data run: the actor pool's start dominates its time). The ranking itself (a planted fact ranks first for its question, and not for
another) is tested on an adapter trained in-process: tests/unit/explain/test_influence.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import cli_here
from raylab.core import runs
from raylab.explain import influence_summary, run_influence

pytestmark = pytest.mark.integration


def test_influence_over_the_train_shards_returns_records_with_the_checkpoints_it_used(reference):
    cfg, meta = reference
    cfg = cfg.model_copy(update={"explain": cfg.explain.model_copy(update={"influence": cfg.explain.influence.model_copy(
        update={"actors": 1, "top_k": 4})})})
    final = str(Path(cfg.output_dir) / "train" / "final")
    result = run_influence(cfg, final, "Ticket 7: the blue widget is in", " stock.", completion=True)
    assert result["approximation"].startswith("APPROXIMATION") and result["note"] is None
    assert influence_summary(result).startswith("APPROXIMATION")
    steps = [c["step"] for c in result["checkpoints"]]
    assert steps == sorted(steps) and steps[-1] == meta["steps"] and all(c["weight"] > 0 for c in result["checkpoints"])
    manifest = runs.read_manifest(runs.Run(cfg.output_dir))
    assert result["documents_scored"] == manifest.tokens.train.documents  # every train document, unpacked
    records = pq.read_table(Path(cfg.output_dir) / "data" / "records").to_pylist()
    train = {(r["source"], r["record_id"]): r["text"] for r in records if r["split"] == "train"}
    assert len(result["records"]) == 4 and [r["rank"] for r in result["records"]] == [1, 2, 3, 4]
    scores = [r["score"] for r in result["records"]]
    assert scores == sorted(scores, reverse=True)
    for r in result["records"]:  # each joined to exactly the train record it is, with its redacted text
        assert len(r["records"]) == 1 and train[(r["records"][0]["source"], r["records"][0]["record_id"])] == \
            r["records"][0]["text"]


def test_the_cli_refuses_an_unknown_checkpoint_before_starting_anything(reference):
    cfg, _ = reference
    final = str(Path(cfg.output_dir) / "train" / "final")
    path = str(Path(cfg.output_dir) / "config.resolved.yaml")
    bad = cli_here("explain", path, "--model", final, "--prompt", "x", "--influence", "--checkpoints", "checkpoint_nope")
    assert bad.returncode == 2 and "no saved checkpoint 'checkpoint_nope'" in bad.stderr
    assert "(step 24)" in bad.stderr  # the saved ones are listed (the latest is always kept)
    mixed = cli_here("explain", path, "--model", final, "--prompt", "x", "--influence", "--method", "feature_ablation")
    assert mixed.returncode == 2 and "--method: token attributions only" in mixed.stderr
