"""The `serve:` section's safe default: an endpoint reachable from other machines needs API
keys, or an explicit `serve.allow_unauthenticated: true`; a loopback one needs neither. The
error comes through the loader, so it reads as `raylab validate` prints it."""

from __future__ import annotations

import pytest

from raylab import config
from raylab.config.serve import is_loopback
from raylab.errors import ConfigError

BASE = {"version": 1, "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
        "model": {"name_or_path": "preset:tiny-llama"}}


def load(**serve) -> config.RaylabConfig:
    return config.load_dict({**BASE, "serve": serve})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "localhost", "LocalHost", "::1", "[::1]"])
def test_a_loopback_host_needs_no_keys(host):
    assert is_loopback(host)
    assert load(host=host).serve.host == host


def test_the_default_host_is_loopback_and_open():
    cfg = config.load_dict(BASE)  # the negative control: the rule does not refuse every config
    assert cfg.serve.host == "127.0.0.1" and not cfg.serve.allow_unauthenticated


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "192.168.0.7", "fe80::1", "example.com",
                                  "localhost.example.com", "127.0.0.1.nip.io"])
def test_a_reachable_host_without_keys_is_refused_naming_what_to_set(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError) as e:
        load(host=host)
    text = str(e.value)
    assert f"serve.host: serving on {host!r} (reachable from other machines) needs API keys" in text
    for key in ("serve.api_keys_env", "serve.api_keys_file", "serve.allow_unauthenticated: true"):
        assert key in text


@pytest.mark.parametrize("serve", [{"api_keys_env": "RAYLAB_API_KEYS"}, {"api_keys_file": "keys.txt"},
                                   {"allow_unauthenticated": True}])
def test_keys_or_an_explicit_opt_out_allow_a_reachable_host(serve, monkeypatch):
    monkeypatch.delenv("RAYLAB_API_KEYS", raising=False)  # validating never needs the keys themselves
    cfg = load(host="0.0.0.0", **serve)
    assert cfg.serve.host == "0.0.0.0"


def test_the_opt_out_is_a_boolean_and_overrides_reach_it():
    with pytest.raises(ConfigError, match="serve.allow_unauthenticated"):
        load(host="0.0.0.0", allow_unauthenticated="maybe")
    with pytest.raises(ConfigError, match="needs API keys"):
        load(host="0.0.0.0", allow_unauthenticated=False)
    cfg = config.load_dict({**BASE, "serve": {"host": "0.0.0.0"}}, ["serve.allow_unauthenticated=true"])
    assert cfg.serve.allow_unauthenticated


@pytest.mark.parametrize("auth", [{"api_keys_env": "K"}, {"api_keys_file": "keys.txt"}])
def test_the_service_in_an_endpoint_with_keys_needs_its_callers_keys_there(auth):
    """api.enabled with an endpoint that takes static keys only: the service's callers (keys
    from `raylab keys create`) could not reach the models they fine-tune, so it is refused,
    naming the key to set; with serve.api_keys_db, or an open loopback endpoint, it loads."""
    with pytest.raises(ConfigError, match=r"serve\.api_keys_db: api\.enabled .*set serve\.api_keys_db: true"):
        config.load_dict({**BASE, "serve": auth, "api": {"enabled": True}})
    assert config.load_dict({**BASE, "serve": auth | {"api_keys_db": True}, "api": {"enabled": True}}).api.enabled
    assert config.load_dict({**BASE, "api": {"enabled": True}}).serve.api_keys_db is False  # open loopback: one URL
    assert config.load_dict({**BASE, "serve": auth}).serve.api_keys_db is False  # the control: no service, no rule
