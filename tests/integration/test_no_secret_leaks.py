"""A secret planted in an environment variable that the config references (an HTTP source's
query token and bearer header) is used by the run and appears nowhere the run writes or
prints: not in any file under the run directory or $RAYLAB_HOME (resolved config, data
outputs and manifest, train outputs, the MLflow store's database and artifacts, events, the
log file), not in the Ray session's logs, not on stdout/stderr. One `raylab run --until train`
(data + 2 training steps + registration) on the session Ray."""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from http_helpers import Handler, serving

from conftest import COLORS, base_config, run_cli

pytestmark = pytest.mark.integration

TOKEN = "tok" + secrets.token_hex(12)  # random per session: no other test or file holds it


class Api(Handler):
    calls = {"ok": 0, "refused": 0}

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if q.get("token") != TOKEN or self.headers.get("Authorization") != f"Bearer {TOKEN}":
            Api.calls["refused"] += 1
            body, code = {"error": "unauthorized"}, 401
        else:
            Api.calls["ok"] += 1
            page = int(q.get("page", 1))
            body, code = {"items": [] if page > 3 else [
                {"text": f"Ticket {page}-{i}: the {COLORS[i % len(COLORS)]} widget ships today."} for i in range(40)
            ]}, 200
        self.send_json(code, body)


@pytest.fixture(scope="module")
def api():
    with serving(Api) as url:
        yield url


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


def test_a_planted_secret_appears_nowhere_a_run_writes_or_prints(api, tmp_path, raylab_home, _session_ray):
    import ray

    out = tmp_path / "run"
    raw = base_config(out, tmp_path / "unused.jsonl", max_steps=2, eval_every=2, log_every=1)
    raw["data"]["sources"] = [{"type": "http", "url": f"{api}/docs?token=${{env:RAYLAB_PLANTED_TOKEN}}",
                               "records_path": "items", "page_param": "page",
                               "headers": {"Authorization": "Bearer ${env:RAYLAB_PLANTED_TOKEN}"}}]
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(config_path), "--until", "train", "--address", ray.get_runtime_context().gcs_address,
                   env={"RAYLAB_PLANTED_TOKEN": TOKEN}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Api.calls["ok"] >= 3 and Api.calls["refused"] == 0  # the secret was used, and only correctly

    # Negative control: the scan finds a value that is there (the token's variable name is).
    assert files_holding(out, b"RAYLAB_PLANTED_TOKEN"), "the scan should see the reference in config.resolved.yaml"
    assert (out / "train" / "final").is_dir() and list((raylab_home / "mlflow").rglob("*.db"))

    needle = TOKEN.encode()
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaks = files_holding(out, needle) + files_holding(raylab_home, needle) + files_holding(session_logs, needle)
    assert leaks == [], f"the planted secret is in {leaks}"
    assert TOKEN not in proc.stdout + proc.stderr
