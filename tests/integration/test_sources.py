"""Sources that fail: an HTTP API that stays busy, rate-limits, times out, hangs up, answers
something that is not JSON or not a list, or is not there; a PostgreSQL stopped mid-query.

Every case is a SourceError naming the source, the position reached (the page about to be
read and the records read before it; the rows fetched) and the cause, with any URL redacted;
the data stage turns it into exit 2. Most cases run the source's read task in this process
against one local server (a path per behaviour; page 1 always answers, page 2 misbehaves);
one `raylab data` run and one in-process run on the session Ray show the stage's side.

"Nothing half-written": a source is read in full (`_check_sources` materialises it) before
the stage writes anything under data/, so a failed stage leaves no file there at all -- no
Parquet part of any split, no manifest.json -- and the run directory holds only what is
written before sources are read: the resolved config and the events log (and its lock).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from http_helpers import Handler, serving

from conftest import free_port, run_cli
from pg_helpers import postgres_server
from raylab import config
from raylab.data import run_data
from raylab.data.sources import SourceError, describe_inputs, http_datasource
from raylab.errors import UserError

pytestmark = pytest.mark.integration

TOKEN = "tok-4c1d-not-for-logs"  # what ${env:RAYLAB_TEST_SOURCES_TOKEN} holds
LITERAL = "key-9f2e-not-for-logs"  # a second secret in the URL, through ${env:RAYLAB_TEST_SOURCES_KEY}
# (a literal one is refused when the config loads: tests/unit/config/test_literal_secrets.py)
os.environ["RAYLAB_TEST_SOURCES_KEY"] = LITERAL


class Misbehaving(Handler):
    """Page 1 of every path answers two records under `items`; page 2 misbehaves by path."""

    calls: dict[tuple[str, int], list[float]] = {}  # (path, page) -> arrival times


    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        page = int(q.get("page", 1))
        Misbehaving.calls.setdefault((url.path, page), []).append(time.monotonic())
        if "token" in q and q["token"] != TOKEN:  # the env reference must arrive expanded
            return self.send_body(401, b'{"error": "bad token"}')
        if page == 1:
            return self.send_body(200, json.dumps({"items": [{"text": "one"}, {"text": "two"}]}).encode())
        if url.path == "/pages":  # a well-behaved API: three pages of two records, then none
            return self.send_body(200, json.dumps({"items": [] if page > 3 else [{"text": f"p{page}"}] * 2}).encode())
        if url.path == "/busy":
            return self.send_body(503, b'{"error": "busy"}')
        if url.path.startswith("/limited"):
            return self.send_body(429, b'{"error": "slow down"}', headers={"Retry-After": "1"})
        if url.path == "/slow":
            time.sleep(1.5)  # beyond the client's timeout_s
            try:
                return self.send_body(200, b'{"items": []}')
            except OSError:
                return None  # the client gave up first, as intended
        if url.path == "/hangup":
            self.close_connection = True  # no status line at all
            return None
        if url.path == "/notjson":
            return self.send_body(200, b"<html>maintenance</html>", kind="text/html")
        if url.path == "/notlist":
            return self.send_body(200, b'{"items": {"text": "one record, not a list"}}')
        return self.send_body(404, b'{"error": "no such endpoint"}')


@pytest.fixture(scope="module")
def api():
    with serving(Misbehaving) as url:
        yield url


def http_cfg(url: str, output_dir: str = "unused", **settings) -> config.RaylabConfig:
    source = {"type": "http", "name": "api", "url": url, "records_path": "items", "page_param": "page",
              "retries": 1, "backoff_s": 0.01, "timeout_s": 0.3, "max_retry_wait_s": 2.0, **settings}
    return config.load_dict({"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": output_dir,
                             "data": {"sources": [source]}})


def read_pages(url: str, **settings) -> int:
    """Run an HTTP source's read task here, as a Ray Data read task would; the rows read."""
    (task,) = http_datasource(0, http_cfg(url, **settings).data.sources[0]).get_read_tasks(1)
    return sum(block.num_rows for block in task())


def written(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def half_written(run_dir: Path) -> list[str]:
    """What a failed data stage must not leave: any file under data/ (parts, manifest)."""
    return [p for p in written(run_dir) if p.startswith("data/")]


AT_PAGE2 = "data source 'api' (http): at page2, after 2 records: "
CASES = {  # path: (settings, the message after AT_PAGE2, requests for page 2)
    "/busy": ({"retries": 2}, r"GET \S+/busy\?page=2 failed after 3 attempt\(s\): HTTP 503 Service Unavailable$", 3),
    "/limited": ({}, r"GET \S+/limited\?page=2 failed after 2 attempt\(s\): HTTP 429 Too Many Requests$", 2),
    "/slow": ({}, r"GET \S+/slow\?page=2 failed after 2 attempt\(s\): no response within timeout_s=0.3$", 2),
    "/hangup": ({}, r"failed after 2 attempt\(s\): the server closed the connection without a response$", 2),
    "/notjson": ({}, r"failed after 1 attempt\(s\): the response \(text/html, 24 bytes\) is not JSON: Expecting value", 1),
    "/notlist": ({}, r"records_path 'items' is a JSON object, not a list, in the response to GET \S+/notlist\?page=2$", 1),
    "/gone": ({}, r"failed after 1 attempt\(s\): HTTP 404 Not Found$", 1),  # a 4xx is not retried
}


@pytest.mark.parametrize("path", list(CASES))
def test_http_failure_names_source_position_and_cause(api, path):
    settings, cause, requests = CASES[path]
    with pytest.raises(SourceError) as failed:
        read_pages(f"{api}{path}", **settings)
    message = str(failed.value)
    assert message.startswith(AT_PAGE2), message
    assert re.search(cause, message[len(AT_PAGE2):]), message
    assert len(Misbehaving.calls[(path, 2)]) == requests
    assert len(Misbehaving.calls[(path, 1)]) == 1  # page 1 was read once and not again


def test_retry_after_is_honoured(api):
    """The 429s ask for 1 s; the backoff alone would wait 0.01 s. The server's own clock
    shows the gap (a lower bound, which a slow machine only lengthens)."""
    with pytest.raises(SourceError, match="HTTP 429"):
        read_pages(f"{api}/limited-honoured")
    first, second = Misbehaving.calls[("/limited-honoured", 2)]
    assert second - first >= 0.95


def test_connection_refused(api):
    with pytest.raises(SourceError) as failed:
        read_pages(f"http://127.0.0.1:{free_port()}/items")  # nothing listens there
    assert re.fullmatch(r"data source 'api' \(http\): at page1, after 0 records: GET http://127\.0\.0\.1:\d+/items\?page=1 "
                        r"failed after 2 attempt\(s\): \[Errno 111\] Connection refused", str(failed.value)), failed.value


def test_url_secrets_are_redacted_in_messages(api, monkeypatch):
    monkeypatch.setenv("RAYLAB_TEST_SOURCES_TOKEN", TOKEN)
    url = f"{api}/busy?team=visible&api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}&token=${{env:RAYLAB_TEST_SOURCES_TOKEN}}"
    with pytest.raises(SourceError) as failed:
        read_pages(url, retries=0)
    message = str(failed.value)
    # the query string is printed as written, ${env:...} references and all (negative control:
    # a plain value shows); the values the references hold are not
    assert ("/busy?team=visible&api_key=${env:RAYLAB_TEST_SOURCES_KEY}&token=${env:RAYLAB_TEST_SOURCES_TOKEN}"
            "&page=2 failed") in message
    assert LITERAL not in message and TOKEN not in message
    # the token did reach the server expanded: page 1 answered (a wrong token is a 401)
    assert message.startswith(AT_PAGE2)


def test_secrets_a_library_quotes_are_scrubbed(api, monkeypatch):
    """urllib refuses a URL with a space and quotes it, expanded, in its error; the values
    of the URL's secrets and of its ${env:...} references never reach the message."""
    monkeypatch.setenv("RAYLAB_TEST_SOURCES_TOKEN", TOKEN)
    url = f"{api}/busy?q=a b&api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}&team=${{env:RAYLAB_TEST_SOURCES_TOKEN}}"
    with pytest.raises(SourceError) as failed:
        read_pages(url, retries=0)
    message = str(failed.value)
    assert "URL can't contain control characters" in message and "q=a b" in message  # the cause, quoted
    assert LITERAL not in message and TOKEN not in message


def test_manifest_location_is_redacted(api):
    """describe_inputs is what the manifest records for a source."""
    (entry,) = describe_inputs(http_cfg(f"{api}/busy?team=visible&api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}").data)
    # the reference is kept as written (never its value)
    assert entry["location"] == f"{api}/busy?team=visible&api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}"
    assert LITERAL not in entry["location"]


def test_half_written_detects_data_files(tmp_path):
    """Negative control for `half_written`: it does see a part and a manifest."""
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "0.parquet").write_bytes(b"PAR1")
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "events.jsonl").write_text("")
    assert half_written(tmp_path) == ["data/manifest.json", "data/train/0.parquet"]


def test_cli_data_exits_2_with_nothing_half_written(api, tmp_path):
    """`raylab data` on a source that stays busy: exit 2 and one line naming source, page
    and cause; no secret in anything it printed or wrote; nothing under data/."""
    run_dir = tmp_path / "run"
    raw = {"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(run_dir),
           "data": {"sources": [{"type": "http", "name": "api", "records_path": "items", "page_param": "page",
                                 "retries": 1, "backoff_s": 0.01,
                                 "url": f"{api}/busy?api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}&token=${{env:RAYLAB_TEST_SOURCES_TOKEN}}"}]}}
    (tmp_path / "busy.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli("data", str(tmp_path / "busy.yaml"), env={"RAYLAB_TEST_SOURCES_TOKEN": TOKEN})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    expected = (f"raylab data: error: {AT_PAGE2}GET {api}/busy?api_key=${{env:RAYLAB_TEST_SOURCES_KEY}}"
                f"&token=${{env:RAYLAB_TEST_SOURCES_TOKEN}}"
                f"&page=2 failed after 2 attempt(s): HTTP 503 Service Unavailable")
    assert expected in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert TOKEN not in proc.stdout + proc.stderr and LITERAL not in proc.stdout + proc.stderr
    assert half_written(run_dir) == []
    assert {"config.resolved.yaml", "events.jsonl"} <= set(written(run_dir)) <= {
        "config.resolved.yaml", "events.jsonl", "events.jsonl.lock"}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    failure = [e for e in events if e["kind"] == "stage.failure"]
    assert len(failure) == 1 and failure[0]["fields"]["message"] == expected.removeprefix("raylab data: error: ")
    assert TOKEN not in (run_dir / "events.jsonl").read_text() + (run_dir / "config.resolved.yaml").read_text()


# ---------------------------------------------------------------- PostgreSQL


def _wait_for_query(url: str, marker: str, deadline_s: float = 180) -> None:
    """Poll pg_stat_activity until a backend is running the query that holds `marker`."""
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            with conn.cursor() as cur:
                cur.execute("select count(*) from pg_stat_activity where state = 'active' and pid <> pg_backend_pid() "
                            "and query like %s and query not like '%%LIMIT 0%%'", (f"%{marker}%",))
                if cur.fetchone()[0]:
                    return
            time.sleep(0.2)
    finally:
        conn.close()
    raise AssertionError(f"no backend ran the query with {marker!r} within {deadline_s}s")


def test_postgres_stopped_mid_query(tmp_path, _session_ray, monkeypatch):
    """The stage reads a query that sleeps; the server is stopped (immediate mode: a crash)
    while it runs. Then the database is down for the next run's reachability check."""
    import psycopg2

    from raylab.core import cluster

    cluster.connect(None)
    with postgres_server() as pg:
        conn = psycopg2.connect(pg.url)
        with conn, conn.cursor() as cur:
            cur.execute("create table tickets (ticket_id int primary key, body text)")
            cur.executemany("insert into tickets values (%s, %s)", [(1, "Printer jams."), (2, "VPN drops.")])
        conn.close()
        monkeypatch.setenv("RAYLAB_TEST_PG_PASSWORD", "hunter2-not-for-logs")  # trust auth ignores it
        url = pg.url.replace("raylab@", "raylab:${env:RAYLAB_TEST_PG_PASSWORD}@")
        cfg = config.load_dict({
            "version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "run"),
            "data": {"sources": [{"type": "sql", "name": "tickets", "url": url, "fields": {"text": "body"},
                                  "query": "select ticket_id, body from tickets, pg_sleep(120) as raylab_sleep"}]},
        })
        outcome: dict = {}

        def stage():
            try:
                outcome["manifest"] = run_data(cfg)
            except BaseException as e:  # noqa: BLE001 - the test inspects whatever came out
                outcome["error"] = e

        thread = threading.Thread(target=stage, daemon=True)
        thread.start()
        _wait_for_query(pg.url, "raylab_sleep")
        pg.stop()
        thread.join(timeout=180)
        assert not thread.is_alive(), "the stage did not end after the database stopped"
        error = outcome.get("error")
        assert isinstance(error, UserError), outcome
        assert re.fullmatch(r"data source 'tickets' \(sql\): the query failed, after 0 rows: \S.*", str(error)), str(error)
        assert "hunter2" not in str(error)
        assert half_written(tmp_path / "run") == []
        with pytest.raises(UserError) as down:  # the next run: the database is down
            describe_inputs(cfg.data)
        # the URL as written: the ${env:...} reference, never the password it holds
        assert re.match(r"data.sources.0 \(tickets\): cannot query postgresql://raylab:\$\{env:RAYLAB_TEST_PG_PASSWORD\}@"
                        r"127\.0\.0\.1:\d+/postgres: ",
                        str(down.value)), str(down.value)
        assert "hunter2" not in str(down.value) and "Connection refused" in str(down.value)


def test_a_glob_path_reads_the_files_it_matches(tmp_path, _session_ray):
    """`path` may be a glob (the schema says so): Ray's file datasources do not expand
    patterns, so raylab lists the matches; ids stay relative to the pattern's directory. A
    file beside them that the pattern does not match is the negative control: not read."""
    from raylab.core import cluster
    from raylab.data.sources import read_source

    cluster.connect(None)
    (tmp_path / "docs-0.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    (tmp_path / "docs-1.jsonl").write_text('{"text": "gamma"}\n')
    (tmp_path / "other.jsonl").write_text('{"text": "not matched"}\n')
    cfg = config.load_dict({"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "run"),
                            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "docs-*.jsonl"), "name": "docs"}]}})
    rows = read_source(0, cfg.data.sources[0], cfg.data).take_all()
    assert sorted(r["record_id"] for r in rows) == ["docs-0.jsonl:1", "docs-0.jsonl:2", "docs-1.jsonl:1"]
    assert not any("not matched" in r["raw"] for r in rows)

    nothing = config.load_dict({"version": 1, "model": {"name_or_path": "preset:tiny-llama"}, "output_dir": str(tmp_path / "run"),
                                "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "none-*.jsonl")}]}})
    with pytest.raises(UserError, match=r"data\.sources\.0\.path .*matches no jsonl file"):
        read_source(0, nothing.data.sources[0], nothing.data)


def test_an_http_source_is_as_many_blocks_as_pages(api, _session_ray):
    """An HTTP source is one read task; Ray Data splits such a task's output to its default
    parallelism unless told otherwise, which made every later operator of the data stage run
    one task per record. The negative control reads the same datasource without the override."""
    import ray

    from raylab.core import cluster
    from raylab.data.sources import read_source

    cluster.connect(None)
    cfg = http_cfg(f"{api}/pages")
    ds = read_source(0, cfg.data.sources[0], cfg.data).materialize()
    assert ds.count() == 6 and ds.num_blocks() <= 3, ds.num_blocks()
    split = ray.data.read_datasource(http_datasource(0, cfg.data.sources[0])).materialize()
    assert split.count() == 6 and split.num_blocks() > 3, split.num_blocks()
