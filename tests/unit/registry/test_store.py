"""Where the registry is and what happens when it cannot be reached."""

from __future__ import annotations

import pytest

from raylab import registry
from raylab.errors import UserError
from registry_helpers import cfg_for, open_test_store


@pytest.fixture
def store(tmp_path, monkeypatch):
    return open_test_store(tmp_path, monkeypatch)


def test_store_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.locate() == (f"sqlite:///{tmp_path}/home/mlflow/mlflow.db", f"{tmp_path}/home/mlflow/artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/team/m.db")
    assert registry.locate() == (f"sqlite:///{tmp_path}/team/m.db", f"{tmp_path}/team/artifacts")
    assert registry.locate("http://mlflow.internal:5000") == ("http://mlflow.internal:5000", None)


def test_unreachable_tracking_server_is_a_user_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(UserError, match=r"registry.tracking_uri http://127.0.0.1:\d+: MLflow server not reachable"):
        registry.open_store(cfg_for(tmp_path, tracking_uri=f"http://127.0.0.1:{port}"))
    with pytest.raises(UserError, match="not a tracking URI"):
        registry.open_store(tracking_uri="ftp://x")


def test_tracking_uri_secrets_are_not_shown(tmp_path):
    """A tracking URI's password and token are redacted in the error; a library message that
    quotes the URI (urllib's, for a space in it) is scrubbed too. The host is kept (the
    control: the URI is shown at all)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as closed:
        registry.open_store(tracking_uri=f"http://127.0.0.1:{port}/?access_token=tok-not-for-logs")
    assert f"http://127.0.0.1:{port}/?access_token=***: MLflow server not reachable" in str(closed.value)
    assert "tok-not-for-logs" not in str(closed.value)
    with pytest.raises(UserError) as quoted:
        registry.open_store(tracking_uri=f"http://127.0.0.1:{port}/x y?token=tok-not-for-logs")
    assert "?token=***" in str(quoted.value) and "tok-not-for-logs" not in str(quoted.value)
    with pytest.raises(UserError) as odd:
        registry.open_store(tracking_uri="ftp://reader:pw-not-for-logs@host/x")
    assert "ftp://reader:***@host/x: not a tracking URI" in str(odd.value)
