"""The data stage on a real local Ray: every source type, quarantine, manifest, cache."""

from __future__ import annotations

import json
import re
import sqlite3
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_helpers import Handler, serving

from conftest import REPO, run_cli
from pg_helpers import postgres_server
from raylab import config
from raylab.data import run_data
from raylab.data.sources import describe_inputs
from raylab.errors import UserError

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- a local HTTP API


class Api(Handler):
    calls: dict[str, int] = {}

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        Api.calls[url.path] = Api.calls.get(url.path, 0) + 1
        if url.path == "/chats":  # page numbers, records under data.items, 3 pages
            page = int(q.get("page", 1))
            items = [] if page > 3 else [
                {"messages": [{"role": "user", "content": f"Question {page}.{i}?"},
                              {"role": "assistant", "content": f"Answer {page}.{i}."}]}
                for i in range(2)
            ]
            return self.send_json(200, {"data": {"items": items}})
        if url.path == "/docs":  # cursors, bearer auth
            if self.headers.get("Authorization") != "Bearer s3cret":
                return self.send_json(401, {"error": "unauthorized"})
            cursor = q.get("cursor")
            if cursor is None:
                return self.send_json(200, {"results": [{"text": "Doc one."}, {"text": "Doc two."}], "next": "c2"})
            return self.send_json(200, {"results": [{"text": "Doc three."}], "next": None})
        if url.path == "/flaky":  # 503 on the first call, then fine
            if Api.calls[url.path] == 1:
                return self.send_json(503, {"error": "busy"})
            return self.send_json(200, [{"text": "Survived a retry."}])
        return self.send_json(404, {"error": "no such endpoint"})


@pytest.fixture(scope="module")
def api():
    with serving(Api) as url:
        yield url


# ---------------------------------------------------------------- a corpus of every kind


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [
        b'{"q": "When is payday?", "a": "On the 25th."}',
        b'{"q": "Office hours?", "a": "8:30 to 17:30."}',
        b'{"q": "broken json", "a": ',
        b"",
        b'{"q": "caf\xe9?", "a": "latin-1 bytes"}',
        b'{"q": "No answer", "a": ""}',
        b'{"q": "Vacation days?", "a": "27 per year."}',
    ]
    (d / "qa.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "help"},
                      {"role": "assistant", "content": "sure"}]},
        {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "wrong"}]},
    ]
    (d / "chats.json").write_text(json.dumps(chats))
    (d / "notes.csv").write_text('id,text\n1,"First note,\nwith a newline"\n2,Second note\n3,a,b\n4,\n5,Fifth\n')
    pq.write_table(pa.table({"text": ["P one", "P two", "P three"], "n": [1, 2, 3]}), d / "docs.parquet")
    (d / "handbook").mkdir()
    (d / "handbook" / "a.md").write_text("# Welcome\nAcme builds anvils.")
    (d / "handbook" / "b.txt").write_text("Security: report incidents.")
    (d / "handbook" / "c.txt").write_bytes(b"bad \xff\xfe bytes")
    (d / "handbook" / "logo.png").write_bytes(b"\x89PNG not text")
    db = sqlite3.connect(d / "kb.db")
    db.execute("create table faq (faq_id integer primary key, question text, answer text)")
    db.executemany("insert into faq values (?, ?, ?)", [
        (10, "Reset password?", "Use the portal."), (11, "Help desk?", "Room 204."),
        (12, "Parental leave?", "16 weeks."), (13, "Null answer", None),
    ])
    db.commit()
    db.close()
    return d


def job(corpus, api, tmp_path, **extra):
    raw = {
        "version": 1,
        "output_dir": str(tmp_path / "run"),
        "data": {
            "format": "completion",
            "sources": [
                {"type": "jsonl", "path": str(corpus / "qa.jsonl"), "name": "qa", "format": "instruction",
                 "fields": {"prompt": "q", "response": "a"}},
                {"type": "json", "path": str(corpus / "chats.json"), "name": "chats", "format": "chat"},
                {"type": "csv", "path": str(corpus / "notes.csv"), "name": "notes"},
                {"type": "parquet", "path": str(corpus / "docs.parquet"), "name": "docs"},
                {"type": "text", "path": str(corpus / "handbook"), "name": "handbook"},
                {"type": "sql", "url": f"sqlite:///{corpus / 'kb.db'}", "name": "kb", "format": "instruction",
                 "query": "select faq_id, question, answer from faq",
                 "fields": {"prompt": "question", "response": "answer", "id": "faq_id"}},
                {"type": "http", "url": f"{api}/chats", "name": "chats_api", "format": "chat",
                 "records_path": "data.items", "page_param": "page"},
                {"type": "http", "url": f"{api}/docs", "name": "docs_api", "records_path": "results",
                 "cursor_param": "cursor", "next_cursor_path": "next",
                 "headers": {"Authorization": "Bearer ${env:RAYLAB_TEST_API_TOKEN}"}},
                {"type": "http", "url": f"{api}/flaky", "name": "flaky", "backoff_s": 0.05},
            ],
        },
        "model": {"name_or_path": "preset:tiny-llama"},
    }
    raw["data"]["dedup"] = {"exact": False, "near": False}  # the API fixtures are near-identical on purpose
    raw["data"].update(extra)
    return config.load_dict(raw)


@pytest.fixture(scope="module")
def full_run(corpus, api, tmp_path_factory, _session_ray):
    import os

    from raylab.core import cluster

    cluster.connect(None)
    os.environ["RAYLAB_TEST_API_TOKEN"] = "s3cret"
    cfg = job(corpus, api, tmp_path_factory.mktemp("full"))
    return cfg, run_data(cfg)


def read_dir(path):
    return pq.read_table(path).to_pylist()


def test_counts_per_source_and_reason(full_run):
    cfg, manifest = full_run
    by = manifest["by_source"]
    assert by["qa"] == {"read": 6, "accepted": 3, "rejected": 3, "duplicates": 0, "erased": 0}
    assert by["chats"] == {"read": 3, "accepted": 2, "rejected": 1, "duplicates": 0, "erased": 0}
    assert by["notes"] == {"read": 5, "accepted": 3, "rejected": 2, "duplicates": 0, "erased": 0}
    assert by["docs"] == {"read": 3, "accepted": 3, "rejected": 0, "duplicates": 0, "erased": 0}
    assert by["handbook"] == {"read": 3, "accepted": 2, "rejected": 1, "duplicates": 0, "erased": 0}
    assert by["kb"] == {"read": 4, "accepted": 3, "rejected": 1, "duplicates": 0, "erased": 0}
    assert by["chats_api"] == {"read": 6, "accepted": 6, "rejected": 0, "duplicates": 0, "erased": 0}
    assert by["docs_api"] == {"read": 3, "accepted": 3, "rejected": 0, "duplicates": 0, "erased": 0}
    assert by["flaky"] == {"read": 1, "accepted": 1, "rejected": 0, "duplicates": 0, "erased": 0}
    c = manifest["counts"]
    assert c["read"] == c["accepted"] + c["rejected"] + sum(c["duplicates"].values()) == 34 and c["erased"] == 0
    assert c["accepted"] == 26 and c["duplicates"] == {"exact": 0, "near": 0}
    assert c["rejected_by_reason"] == {
        "invalid_json": 1, "invalid_utf8": 2, "empty_text": 2, "bad_turn_order": 1,
        "invalid_csv": 1, "missing_field": 1,
    }


def test_quarantine_keeps_source_id_reason_and_raw(full_run):
    cfg, manifest = full_run
    rows = {(r["source"], r["reason"]): r for r in read_dir(manifest["outputs"]["quarantine"])}
    assert rows[("qa", "invalid_json")]["record_id"] == "qa.jsonl:3"  # relative to the source path
    assert rows[("qa", "invalid_json")]["raw"] == '{"q": "broken json", "a": '
    assert rows[("qa", "invalid_utf8")]["record_id"] == "qa.jsonl:5"  # the blank line 4 is no record
    assert "\\xe9" in rows[("qa", "invalid_utf8")]["raw"]
    assert rows[("handbook", "invalid_utf8")]["record_id"] == "c.txt"
    assert rows[("notes", "invalid_csv")]["message"] == "3 fields, the header has 2"
    assert rows[("kb", "missing_field")]["record_id"] == "sql:13"
    assert rows[("chats", "bad_turn_order")]["record_id"] == "chats.json#2"


def test_accepted_records_are_normalised(full_run):
    cfg, manifest = full_run
    rows = read_dir(manifest["outputs"]["records"])
    assert len(rows) == manifest["counts"]["accepted"]
    assert {r["split"] for r in rows} <= {"train", "val"}
    by_id = {r["record_id"]: r for r in rows}
    qa = json.loads(by_id["qa.jsonl:1"]["messages"])
    assert qa == [{"role": "user", "content": "When is payday?"}, {"role": "assistant", "content": "On the 25th."}]
    assert by_id["notes.csv:3"]["text"] == "First note,\nwith a newline"  # quoted newline kept
    assert {r["record_id"] for r in rows if r["source"] == "chats_api"} == {f"page{p}#{i}" for p in (1, 2, 3) for i in (0, 1)}
    assert {r["record_id"] for r in rows if r["source"] == "docs_api"} == {"cursor0#0", "cursor0#1", "cursor1#0"}
    handbook = [r for r in rows if r["source"] == "handbook"]
    assert {r["format"] for r in handbook} == {"completion"} and len(handbook) == 2  # logo.png skipped
    assert Api.calls["/flaky"] == 2  # one retry after the 503


def test_manifest_describes_inputs_without_secrets(full_run):
    cfg, manifest = full_run
    text = open(f"{cfg.output_dir}/data/manifest.json").read()
    assert "s3cret" not in text
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert len(inputs["qa"]["files"][0]["sha256"]) == 64
    assert inputs["kb"]["query"].startswith("select faq_id")
    assert sum(i["records_read"] for i in manifest["inputs"]) == manifest["counts"]["read"]
    assert manifest["cache_key"] is None  # SQL and HTTP inputs always rebuild
    resolved = open(f"{cfg.output_dir}/config.resolved.yaml").read()
    assert "${env:RAYLAB_TEST_API_TOKEN}" in resolved and "s3cret" not in resolved


def test_unreadable_sources_name_the_source(corpus, tmp_path):
    base = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r")}
    cases = [
        ({"type": "jsonl", "path": str(tmp_path / "absent.jsonl")}, "data.sources.0 (source0): no jsonl files"),
        ({"type": "sql", "url": f"sqlite:///{tmp_path / 'absent.db'}", "query": "select 1"}, "no SQLite database"),
        ({"type": "sql", "url": f"sqlite:///{corpus / 'kb.db'}", "query": "select * from nope"}, "no such table: nope"),
    ]
    for source, message in cases:
        cfg = config.load_dict({**base, "data": {"sources": [source]}})
        with pytest.raises(UserError, match=re.escape(message)):
            describe_inputs(cfg.data)


def test_rejected_fraction_threshold_fails_after_writing_everything(corpus, api, tmp_path, _session_ray):
    cfg = job(corpus, api, tmp_path, validation={"max_rejected_fraction": 0.1})
    cfg.data.sources = cfg.data.sources[:1]
    with pytest.raises(UserError, match=r"3 of 6 records rejected \(50.0%\), above data.validation.max_rejected_fraction=0.1"):
        run_data(cfg)
    assert len(read_dir(f"{cfg.output_dir}/data/quarantine")) == 3  # nothing lost
    assert json.load(open(f"{cfg.output_dir}/data/manifest.json"))["counts"]["rejected"] == 3


def test_cache_hit_and_miss(corpus, tmp_path, _session_ray, caplog):
    import logging
    import shutil

    caplog.set_level(logging.INFO, logger="raylab")

    src = tmp_path / "in.jsonl"
    shutil.copy(corpus / "qa.jsonl", src)
    raw = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r"),
           "data": {"format": "instruction", "fields": {"prompt": "q", "response": "a"},
                    "sources": [{"type": "jsonl", "path": str(src)}],
                    "dedup": {"near": False}}}  # the subject is the cache; near-dedup shuffles cost a minute
    first = run_data(config.load_dict(raw))
    assert first["cache"] == {"hit": False} and first["cache_key"]
    again = run_data(config.load_dict(raw))
    assert again["cache"] == {"hit": True} and any("cache hit" in m for m in caplog.messages)
    changed = run_data(config.load_dict(raw, ["data.validation.min_chars=3"]))
    assert changed["cache"] == {"hit": False}
    src.write_bytes(src.read_bytes() + b'{"q": "New?", "a": "Yes."}\n')
    grown = run_data(config.load_dict(raw, ["data.validation.min_chars=3"]))
    assert grown["cache"] == {"hit": False} and grown["counts"]["read"] == first["counts"]["read"] + 1


def test_cli_data_missing_source_is_exit_2(tmp_path):
    proc = run_cli("data", "configs/quickstart.yaml", f"data.sources.0.path={tmp_path}/none.csv",
                   f"output_dir={tmp_path}/r", cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.sources.0 (faq): no csv files" in proc.stderr


# ---------------------------------------------------------------- transforms and tokens


def _docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_exact_and_near_duplicates_across_files_and_blocks(tmp_path, _session_ray):
    import random

    rng = random.Random(7)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(500)]
    unique = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(40)]
    (tmp_path / "in").mkdir()
    _docs(tmp_path / "in" / "a.jsonl", unique)
    _docs(tmp_path / "in" / "b.jsonl", [unique[i].upper() for i in range(0, 10)])  # exact after normalisation
    _docs(tmp_path / "in" / "c.jsonl", [unique[i] + " (rev. b)" for i in range(20, 26)])  # near
    cfg = config.load_dict({
        "version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "in")}], "val_fraction": 0.0,
                 "dedup": {"threshold": 0.7}},
    })
    manifest = run_data(cfg)
    c = manifest["counts"]
    assert c["duplicates"] == {"exact": 10, "near": 6}
    assert c["read"] == 56 and c["accepted"] == 40 and c["read"] == c["accepted"] + c["rejected"] + 16
    kept = {r["record_id"] for r in read_dir(manifest["outputs"]["records"])}
    assert all(k.startswith("a.jsonl:") for k in kept)  # the smallest record id of each group stays

    # The stage grouped these 56 records in the driver (below dedup.shuffle_above); Ray Data's
    # hash shuffles, the path for large data, find the same duplicates across blocks.
    import ray

    from raylab.data import dedup

    docs = [{"record_id": f"{f}:{i}", "text": t, "messages": ""} for f, texts in
            (("a", unique), ("b", [u.upper() for u in unique[:10]]), ("c", [u + " (rev. b)" for u in unique[20:26]]))
            for i, t in enumerate(texts)]
    ds = ray.data.from_items(docs, override_num_blocks=4)
    local = dedup.find_duplicates(ds, cfg.data.dedup, 1.0)
    shuffled = dedup.find_duplicates(ds, cfg.data.dedup.model_copy(update={"shuffle_above": 0}), 1.0)
    assert shuffled == local and sorted(local.values()).count("duplicate_near") == 6 and len(local) == 16


def test_pii_is_redacted_before_anything_is_written(tmp_path, _session_ray):
    secrets = {
        "EMAIL": "jane.doe@example.org", "PHONE": "+1 415 555 0134", "CREDIT_CARD": "4111 1111 1111 1111",
        "IBAN": "DE89 3704 0044 0532 0130 00", "IP_ADDRESS": "192.168.10.20", "US_SSN": "123-45-6789",
        "SECRET": "sk-live1234567890abcdefXYZ",
    }
    texts = [f"Record {k}: contact {v} today." for k, v in secrets.items()]
    texts.append("Release 2.60.0 shipped on 2026-11-24 with 1234567 rows and ticket 4111-1111-1111-1112 closed.")
    _docs(tmp_path / "pii.jsonl", texts)
    cfg = config.load_dict({
        "version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "pii.jsonl")}], "val_fraction": 0.0,
                 "dedup": {"near": False}},
    })
    manifest = run_data(cfg)
    assert manifest["pii_redactions"] == {k: 1 for k in secrets}
    records = {r["record_id"].rsplit(":", 1)[-1]: r["text"] for r in read_dir(manifest["outputs"]["records"])}
    for i, kind in enumerate(secrets, start=1):
        assert records[str(i)] == f"Record {kind}: contact <{kind}> today."
    assert records["8"] == texts[-1]  # versions, dates, plain numbers, failed-Luhn numbers untouched
    from raylab.config import ModelConfig
    from raylab.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path="preset:tiny-llama"))
    decoded = " ".join(tok.decode([t for t in r["input_ids"] if t != tok.pad_token_id]) for r in read_dir(manifest["outputs"]["train"]))
    for value in secrets.values():
        assert value not in decoded
    assert "<EMAIL>" in decoded


def test_token_limit_reject_and_truncate(tmp_path, _session_ray):
    _docs(tmp_path / "t.jsonl", ["short one", "x" * 300])
    base = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "t.jsonl")}], "max_seq_len": 128,
                     "val_fraction": 0.0}}
    rejected = run_data(config.load_dict({**base, "output_dir": str(tmp_path / "a")}))
    assert rejected["counts"]["rejected_by_reason"] == {"too_many_tokens": 1}
    q = read_dir(rejected["outputs"]["quarantine"])
    assert q[0]["reason"] == "too_many_tokens" and "301 tokens, more than validation.max_tokens=128" in q[0]["message"]
    truncated = run_data(config.load_dict({**base, "output_dir": str(tmp_path / "b")},
                                          ["data.validation.over_max_tokens=truncate"]))
    assert truncated["counts"]["accepted"] == 2
    assert max(r["num_tokens"] for r in read_dir(truncated["outputs"]["records"])) == 128


def test_packed_and_padded_outputs(tmp_path, _session_ray):
    _docs(tmp_path / "p.jsonl", [f"Doc number {i} " + "word " * (i % 7) for i in range(30)])
    base = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"},
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "p.jsonl")}], "max_seq_len": 64,
                     "val_fraction": 0.2, "dedup": {"near": False}}}
    packed = run_data(config.load_dict({**base, "output_dir": str(tmp_path / "pk")}))
    padded = run_data(config.load_dict({**base, "output_dir": str(tmp_path / "pd")}, ["data.packing=pad"]))
    for m in (packed, padded):
        t = m["tokens"]
        assert t["train"]["documents"] + t["val"]["documents"] == 30
        assert sum(t["train"]["length_histogram"]["counts"]) == t["train"]["documents"]
        assert m["tokenizer"]["fingerprint"] and len(m["tokenizer"]["vocab_hash"]) == 16
    assert packed["tokens"]["train"]["packing_efficiency"] > padded["tokens"]["train"]["packing_efficiency"]
    assert padded["tokens"]["train"]["sequences"] == padded["tokens"]["train"]["documents"]
    rows = read_dir(packed["outputs"]["train"])
    assert sum(r["num_tokens"] for r in rows) == packed["tokens"]["train"]["tokens"]
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == len(r["segment_ids"]) == 64
        segs = r["segment_ids"]
        for i in range(64):
            if segs[i] and (i == 0 or segs[i - 1] != segs[i]):
                assert r["position_ids"][i] == 0 and r["labels"][i] == -100  # a document starts fresh
    val_ids = {x["record_id"] for x in read_dir(packed["outputs"]["records"]) if x["split"] == "val"}
    assert len(val_ids) == packed["tokens"]["val"]["documents"] > 0


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on loopback with a small `tickets` table."""
    import psycopg2

    with postgres_server() as pg:
        conn = psycopg2.connect(pg.url)
        with conn, conn.cursor() as cur:
            cur.execute("create table tickets (ticket_id int primary key, body text)")
            cur.executemany("insert into tickets values (%s, %s)",
                            [(1, "Printer on floor 2 jams."), (2, "VPN drops every hour."), (3, None)])
        conn.close()
        yield pg.url


def test_postgres_source_through_an_env_url(postgres, tmp_path, monkeypatch, _session_ray):
    monkeypatch.setenv("RAYLAB_TEST_PG_URL", postgres)
    cfg = config.load_dict({
        "version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r"),
        "data": {"sources": [{"type": "sql", "name": "tickets", "url": "${env:RAYLAB_TEST_PG_URL}",
                              "query": "select ticket_id, body from tickets", "fields": {"text": "body", "id": "ticket_id"}}],
                 "val_fraction": 0.0},
    })
    manifest = run_data(cfg)
    assert manifest["by_source"]["tickets"] == {"read": 3, "accepted": 2, "rejected": 1, "duplicates": 0, "erased": 0}
    assert read_dir(manifest["outputs"]["quarantine"])[0]["record_id"] == "sql:3"
    assert manifest["inputs"][0]["location"] == "${env:RAYLAB_TEST_PG_URL}"
    # a database that is down, or stops mid-query: tests/integration/test_sources.py


def test_train_shards_stream_into_two_workers(tmp_path, _session_ray):
    """What the train stage does with the shards: read_parquet -> streaming_split, one
    iterator per worker, consumed concurrently; together they see every row once."""
    import ray

    _docs(tmp_path / "s.jsonl", [f"Shard document {i} about anvils and rockets." for i in range(200)])
    cfg = config.load_dict({
        "version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "r"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "s.jsonl")}], "max_seq_len": 64,
                 "val_fraction": 0.0, "dedup": {"near": False}},
    })
    manifest = run_data(cfg)
    shards = ray.data.read_parquet(manifest["outputs"]["train"]).streaming_split(2, equal=False)

    @ray.remote(num_cpus=0.25)
    def consume(it):
        rows = tokens = 0
        for batch in it.iter_batches(batch_size=8, batch_format="numpy"):
            rows += len(batch["num_tokens"])
            tokens += int(batch["num_tokens"].sum())
            assert batch["input_ids"].shape[1:] == (64,) or len(batch["input_ids"][0]) == 64
        return rows, tokens

    results = ray.get([consume.remote(s) for s in shards])
    assert sum(r for r, _ in results) == manifest["tokens"]["train"]["sequences"]
    assert sum(t for _, t in results) == manifest["tokens"]["train"]["tokens"]
