"""The fine-tuning service's test helpers: chat files, the service's template config and its
standalone app on a fresh control-plane database with five callers in two organisations
(tests/unit/serve/test_finetune_api.py, tests/integration/test_finetune_progress.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest

from raylab import config
from raylab.core import controldb, events
from raylab.core.access import keys
from raylab.serve.standalone import standalone_app

BASE = "preset:tiny-llama"


def chat_jsonl(n: int, start: int = 0) -> bytes:
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"What colour is item number {i}?"},
        {"role": "assistant", "content": f"Item number {i} is painted colour {i * 7 % 13}."}]})
        for i in range(start, start + n)).encode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def template(tmp_path, sections: dict | None = None, **api):
    """The service's template config: every job's starting point, with its `api:` section
    (jobs go to a closed port unless `address` is given) and any other `sections`."""
    return config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "template"), "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}], "format": "chat"},
        "model": {"name_or_path": BASE, "method": "lora"},
        "train": {"max_steps": 4, "lr": 1e-3},
        "api": {"max_file_bytes": 4000, "files": str(tmp_path / "files"), "runs": str(tmp_path / "runs"),
                "address": f"http://127.0.0.1:{closed_port()}", **api},
        **(sections or {}),
    })


def make_app(tmp_path, monkeypatch, cfg=None):
    """(the standalone app for `cfg` (default: template), {user: headers}) on a fresh
    control-plane database under tmp_path."""
    monkeypatch.setattr(events, "_writer", lambda: None)  # this process's audit log, not a session Ray's
    db = f"sqlite:///{tmp_path / 'control.db'}"
    monkeypatch.setenv("RAYLAB_DATABASE_URL", db)
    monkeypatch.setenv("RAYLAB_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    monkeypatch.setenv("RAYLAB_AUDIT_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.delenv("RAYLAB_AUDIT", raising=False)
    app = standalone_app(cfg or template(tmp_path), db)  # `raylab api --standalone`'s app; the ingress mounts the same routers
    users = {}
    for who, org, role in (("ada", "acme", "ml_engineer"), ("vic", "acme", "viewer"), ("bob", "globex", "ml_engineer"),
                           ("dee", "globex", "data_steward"), ("sam", "acme", "data_steward")):
        key, _ = keys.create(db, org, role, who, by="root@host")
        users[who] = {"Authorization": f"Bearer {key}"}
    return app, users


@contextlib.contextmanager
def loopback(app):
    """The app on a loopback uvicorn server (what the `openai` client talks to): its /v1 URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
            assert thread.is_alive(), "uvicorn stopped before it started"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """(the standalone app, {user: headers}, tmp_path) on a fresh control-plane database."""
    app, users = make_app(tmp_path, monkeypatch)
    yield app, users, tmp_path
    controldb.dispose_all()




def yaml_of(data: bytes) -> dict:
    import yaml

    return yaml.safe_load(data)
