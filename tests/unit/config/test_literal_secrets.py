"""A config holding a literal password, token or key is refused (exit 2, the key named, the
value never shown); the same secret through `${env:NAME}` is accepted and stays a reference."""

from __future__ import annotations

import textwrap

import pytest

from conftest import cli_here
from raylab import config
from raylab.errors import ConfigError

MINIMAL = {
    "version": 1,
    "data": {"sources": [{"type": "jsonl", "path": "data/train.jsonl"}]},
    "model": {"name_or_path": "preset:tiny-llama"},
}
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def with_source(**source) -> dict:
    return {**MINIMAL, "data": {"sources": [source]}}


@pytest.mark.parametrize(
    "raw, key, value",
    [
        (with_source(type="sql", url="postgresql://u:secret-pw-1@db/x", query="select 1"), "data.sources.0.url",
         "secret-pw-1"),
        (with_source(type="http", url="https://api.acme.test/items?api_key=k-12345678", records_path="items"),
         "data.sources.0.url", "k-12345678"),
        (with_source(type="http", url="https://api.acme.test/items", headers={"Authorization": "Bearer tok-87654321"}),
         "data.sources.0.headers.Authorization", "tok-87654321"),
        (with_source(type="http", url="https://api.acme.test/items", headers={"X-Api-Key": "abcdef123456"}),
         "data.sources.0.headers.X-Api-Key", "abcdef123456"),
        ({**MINIMAL, "registry": {"tracking_uri": "https://admin:mlflow-pw-9@mlflow.acme.test"}}, "registry.tracking_uri",
         "mlflow-pw-9"),
        (with_source(type="jsonl", path="data/train.jsonl", name=AWS_KEY_ID), "data.sources.0.name", AWS_KEY_ID),
    ],
)
def test_a_literal_secret_is_refused_naming_the_key(raw, key, value):
    with pytest.raises(ConfigError) as err:
        config.load_dict(raw)
    message = str(err.value)
    assert f"{key}: " in message and "${env:NAME}" in message, message
    assert value not in message, message


def test_the_same_secrets_as_references_are_accepted(monkeypatch):
    monkeypatch.setenv("PGPASS", "secret-pw-1")
    cfg = config.load_dict(with_source(type="sql", url="postgresql://u:${env:PGPASS}@db/x", query="select 1"))
    assert cfg.data.sources[0].url == "postgresql://u:${env:PGPASS}@db/x"
    config.load_dict(with_source(type="http", url="https://api.acme.test/items?api_key=${env:API_KEY}",
                                 headers={"Authorization": "Bearer ${env:API_TOKEN}"}))
    # Look-alikes that are not credentials: the auth mode, key limits, a plain URL, a model id.
    config.load_dict({**MINIMAL, "ray": {"auth": "token"}, "serve": {"api_keys_env": "RAYLAB_API_KEYS"},
                      "registry": {"tracking_uri": "https://mlflow.acme.test:5000"},
                      "model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}})


def test_a_literal_in_an_override_is_refused_too():
    with pytest.raises(ConfigError, match=r"registry\.tracking_uri: the URL holds a literal password") as err:
        config.load_dict(MINIMAL, ["registry.tracking_uri=postgresql://mlflow:pw-in-override@db/mlflow"])
    assert "pw-in-override" not in str(err.value)


def test_other_problems_do_not_echo_the_secret():
    raw = with_source(type="sql", url="postgresql://u:secret-pw-2@db/x", query="select 1", fields={"idd": "x"})
    with pytest.raises(ConfigError) as err:
        config.load_dict(raw)
    assert "2 problems" in str(err.value) and "secret-pw-2" not in str(err.value)


def test_validate_exits_2_without_the_value(tmp_path):
    path = tmp_path / "literal.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        data:
          sources: [{type: sql, url: "postgresql://u:secret@db/x", query: "select text from docs"}]
        model: {name_or_path: "preset:tiny-llama"}
        """))
    proc = cli_here("validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.sources.0.url: the URL holds a literal password or token" in proc.stderr, proc.stderr
    assert "postgresql://u:${env:NAME}@db/x" in proc.stderr, proc.stderr
    assert ":secret@" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("regions, ok", [(["de", "GB"], True), (["XX"], False)])
def test_pii_regions(regions, ok):
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "pii": {"regions": regions}}}
    if ok:
        assert config.load_dict(raw).data.pii.regions == ["DE", "GB"]
    else:
        with pytest.raises(ConfigError, match=r"data\.pii\.regions: unknown regions \['XX'\]"):
            config.load_dict(raw)


def test_the_presidio_engine_without_presidio_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "presidio_analyzer" else real(name, *a))
    raw = {**MINIMAL, "data": {**MINIMAL["data"], "pii": {"engine": "presidio"}}}
    with pytest.raises(ConfigError, match=r"data\.pii\.engine: presidio needs .*pip install 'raylab\[presidio\]'"):
        config.load_dict(raw)
    monkeypatch.undo()
    assert config.load_dict(raw).data.pii.engine == "presidio"


def test_a_key_naming_a_kubernetes_secret_is_not_a_credential():
    """`platform.api_keys_secret` names the Kubernetes Secret `raylab render` mounts; the same
    value under a credential key elsewhere is still refused (the control)."""
    from raylab.core.secrets import literal_secrets

    assert literal_secrets({"platform": {"api_keys_secret": "raylab-api-keys"}})[0] == []
    assert literal_secrets({"platform": {"client_secret": "raylab-api-keys"}})[0] != []
