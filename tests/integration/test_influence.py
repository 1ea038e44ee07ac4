"""`raylab explain --influence` on a real run: the data stage and Ray Train on a corpus of
templated stock tickets with one distinctive planted fact, then TracIn-style influence over
the packed train shards with Ray Data, at the run's two saved checkpoints.

The claim: for a question about the planted fact, the record that holds it ranks first,
returned with its source, record id and text. Negative control (the ranking could otherwise
pass because the planted record's gradient is merely large): for a question about one of the
tickets, the planted record is not first, a ticket is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_here
from raylab import config
from raylab.data import run_data
from raylab.data.packing import in_val  # where the split puts a record id (the test plants it in train)
from raylab.explain import influence_summary, run_influence
from raylab.train import run_train

pytestmark = pytest.mark.integration

COLORS = ["red", "blue", "green", "yellow"]
ITEMS = ["widget", "lamp", "kettle"]
FACT = "Memo: the Zorblax vault code is 4719, kept by Quentin."
SEED = 0


def corpus(path: Path) -> str:
    """48 tickets and the fact, on a line the deterministic split keeps in train; its record id."""
    tickets = [f"Ticket {i}: the {COLORS[i % 4]} {ITEMS[i % 3]} is in stock. It ships on day {i % 5}." for i in range(48)]
    line = next(n for n in range(20, 40) if not in_val(f"{path}:{n}", SEED, 0.2))
    lines = tickets[: line - 1] + [FACT] + tickets[line - 1:]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return f"{path}:{line}"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, _session_ray):
    """(config, the planted record's id): a LoRA adapter trained 24 steps, checkpoints at 12 and 24."""
    root = tmp_path_factory.mktemp("influence")
    record_id = corpus(root / "facts.jsonl")
    cfg = config.load_dict({
        "version": 1, "output_dir": str(root / "run"), "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(root / "facts.jsonl")}], "max_seq_len": 128,
                 "val_fraction": 0.2, "seed": SEED, "dedup": {"near": False}},
        "model": {"name_or_path": "preset:tiny-llama", "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 24, "eval_every": 12, "log_every": 4, "warmup_ratio": 0.1},
        "registry": {"enabled": False},
        "explain": {"influence": {"top_k": 3, "actors": 1}},
    })
    run_data(cfg)
    run_train(cfg)
    return cfg, record_id


def test_the_planted_fact_ranks_first_for_a_question_about_it(planted):
    cfg, record_id = planted
    final = str(Path(cfg.output_dir) / "train" / "final")
    fact = run_influence(cfg, final, "Memo: the Zorblax vault code is", " 4719, kept by Quentin.", completion=True)
    assert fact["approximation"].startswith("APPROXIMATION") and fact["note"] is None
    assert [c["step"] for c in fact["checkpoints"]] == [12, 24] and all(c["weight"] > 0 for c in fact["checkpoints"])
    assert fact["documents_scored"] >= 35  # every train document, unpacked from the packed rows
    first = fact["records"][0]
    assert [(r["record_id"], r["text"]) for r in first["records"]] == [(record_id, FACT)], influence_summary(fact)
    assert first["records"][0]["source"] and first["score"] > fact["records"][1]["score"]

    # negative control: a question about a ticket does not put the fact first
    ticket = run_influence(cfg, final, "Ticket 7: the blue lamp is in", " stock. It ships on day 2.", completion=True)
    top = ticket["records"][0]["records"]
    assert top and top[0]["record_id"] != record_id and top[0]["text"].startswith("Ticket"), influence_summary(ticket)


def test_final_only_says_so_and_the_cli_prints_the_approximation(planted):
    cfg, record_id = planted
    final = str(Path(cfg.output_dir) / "train" / "final")
    path = Path(cfg.output_dir) / "config.resolved.yaml"
    out = cli_here("explain", str(path), "--model", final, "--prompt", "Memo: the Zorblax vault code is",
                   "--target", " 4719, kept by Quentin.", "--completion", "--influence", "--checkpoints", "final", "--top", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("APPROXIMATION") and "only the version's own (final) weights" in out.stdout
    assert f"record {record_id}" in out.stdout
    bad = cli_here("explain", str(path), "--model", final, "--prompt", "x", "--influence", "--checkpoints", "checkpoint_nope")
    assert bad.returncode == 2 and "no saved checkpoint 'checkpoint_nope'" in bad.stderr
