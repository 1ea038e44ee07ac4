"""Drift of served prompts from the training data (raylab/monitor), on real text: the Acme
corpus's user prompts (training records, and held-out prompts from the same distribution)
against sentences of installed packages' descriptions (another corpus). Both directions:
the other corpus scores above serve.monitor.drift_threshold, the held-out prompts do not.
The sample is written by the endpoint's own writer (raylab/serve/sample.py), and
`raylab monitor`'s exit codes are checked in process (0, 1, 2)."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from drift_corpora import package_sentences, split_acme

from raylab import config
from raylab.cli import main
from raylab.monitor import drift, run_monitor
from raylab.serve.sample import PromptSample

THRESHOLD = config.ServeConfig().monitor.drift_threshold
N = 50  # served prompts per sample: the default serve.monitor.min_prompts


@pytest.fixture(scope="module")
def corpora():
    training, held = split_acme()
    assert len(training) >= 200 and len(held) >= N
    return training, random.Random(1).sample(held, N), package_sentences(2 * N)


def test_the_statistics_are_zero_on_identical_sets_and_one_on_disjoint_ones():
    texts = ["how many vacation days do I get", "when is payday this month", "reset my vpn token please"]
    assert drift.length_drift(texts, texts) == 0 and drift.token_drift(texts, texts) == 0
    assert drift.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert drift.embedding_drift([[1.0, 0.0]], [[-1.0, 0.0]]) == pytest.approx(1.0)
    assert drift.embedding_drift([[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0]]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        drift.token_drift(texts, ["", "   "])


def test_another_corpus_drifts_and_the_training_distribution_does_not(corpora):
    training, held, other = corpora
    same = drift.token_drift(training, held), drift.length_drift(training, held)
    moved = drift.token_drift(training, other[:N])
    assert max(same) <= THRESHOLD < moved, (same, moved)
    assert all(0 <= s <= 1 for s in (*same, moved, drift.length_drift(training, other[:N])))


def write_run(root, training: list[str]) -> str:
    """A config whose run directory holds data-stage records of `training` (chat and text
    records, a val split the monitor must skip), as the data stage writes them."""
    out = root / "run"
    rows = [{"record_id": f"r{i:04d}", "split": "train", "format": "chat" if i % 2 else "completion",
             "text": "" if i % 2 else t,
             "messages": json.dumps([{"role": "system", "content": "You are Acme's assistant."},
                                     {"role": "user", "content": t}, {"role": "assistant", "content": "Sure."}])
             if i % 2 else ""} for i, t in enumerate(training)]
    rows.append({"record_id": "v0", "split": "val", "format": "completion", "text": "zzz " * 400, "messages": ""})
    (out / "data" / "records").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "data" / "records" / "part-0.parquet")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "output_dir": str(out), "offline": True,
                                    "data": {"sources": [{"type": "jsonl", "path": str(root / "unused.jsonl")}]},
                                    "model": {"name_or_path": "tiny-llama"}}))
    return str(path)


def serve_sample(cfg_path: str, prompts: list[str], replica: str) -> None:
    cfg = config.load(cfg_path)
    sample = PromptSample({"output_dir": cfg.output_dir, "sample_prompts": 1000, "flush_every": 1000, "pii": None},
                          replica)
    for p in prompts:
        sample.add(p)
    sample.flush()


def test_monitor_exit_codes_and_report(corpora, tmp_path, capsys):
    training, held, other = corpora
    path = write_run(tmp_path, training)
    serve_sample(path, held[:10], "a")
    assert main(["monitor", path]) == 2  # 10 prompts: fewer than serve.monitor.min_prompts
    assert "serve.monitor.min_prompts: 10 served prompts" in capsys.readouterr().err
    serve_sample(path, held, "a")  # replaced: one file per replica, written whole
    assert main(["monitor", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == N and report["training_records"] == len(training)  # val skipped
    assert set(report["statistics"]) == {"length", "tokens"} and not report["drifted"]
    serve_sample(path, other[:N], "a")  # two replicas' samples, read together
    serve_sample(path, other[N:], "b")
    assert main(["monitor", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 2 * N and report["drifted"] and report["overall"] > THRESHOLD
    assert main(["monitor", path, "serve.monitor.drift_threshold=1.0"]) == 0
    assert "ok: at most serve.monitor.drift_threshold 1.0" in capsys.readouterr().out


def test_monitor_without_records_is_a_user_error(tmp_path, capsys):
    path = write_run(tmp_path, ["a prompt"])
    for f in (tmp_path / "run" / "data" / "records").iterdir():
        f.unlink()
    serve_sample(path, [f"prompt number {i}" for i in range(N)], "a")
    assert main(["monitor", path]) == 2
    assert "no data-stage records under" in capsys.readouterr().err


def test_the_embedding_statistic_uses_the_retrieval_embedder(corpora, tmp_path):
    pytest.importorskip("lancedb")
    from rag_index import write_index

    training, held, other = corpora
    path = write_run(tmp_path, training)
    write_index(tmp_path / "run" / "index", training[:20])  # the index: its manifest names the embedder
    # 60 training prompts (of 252) against 30 served ones: embedding is the slow statistic
    overrides = ["serve.rag.top_k=2", "serve.monitor.max_training_records=60", "serve.monitor.min_prompts=30"]
    serve_sample(path, held[:30], "a")
    same = run_monitor(config.load(path, overrides))
    serve_sample(path, other[:30], "a")
    moved = run_monitor(config.load(path, overrides))
    assert same["statistics"]["embedding"] <= THRESHOLD < moved["statistics"]["embedding"], (same, moved)
