"""Static API keys (raylab/serve/auth.py) and the ingress's check: keys from a variable and a
file (comments, blank lines, an empty file), the Bearer comparison (constant time, every key
compared), the ingress answering 401 in OpenAI's shape, and `raylab serve` refusing unusable
keys with exit 2 before it deploys anything. No Ray: the ingress runs in FastAPI's TestClient."""

from __future__ import annotations

import hmac
import textwrap

import pytest
from fastapi.testclient import TestClient

from raylab import cli
from raylab.errors import UserError
from raylab.serve.app import ROUTERS, IngressImpl, create_app
from raylab.serve.auth import api_keys, authorized

LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_request_bytes": 2000, "max_batch_size": 4,
          "batch_wait_timeout_s": 0.0, "max_adapters_per_replica": 2}
CATALOG = {"routes": {"m": "m/1", "m/1": "m/1"}, "listed": ["m", "m/1"], "default": "m/1"}
KEYS_FILE = "\n".join([
    "# team keys, one per line",
    "sk-alpha",
    "",
    "   # an indented comment is a comment too",
    "  sk-beta   ",  # whitespace around a key is not part of it
    "sk-with#hash\r",  # a file written on Windows
    "",
])


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(KEYS_FILE)
    return path


def test_keys_from_a_variable_are_comma_separated_and_trimmed(monkeypatch):
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", " sk-1, sk-2,,sk-3 ,")
    assert api_keys({"api_keys_env": "RAYLAB_UNIT_KEYS"}) == {"sk-1", "sk-2", "sk-3"}
    assert api_keys({}) == set() and api_keys({"api_keys_env": None, "api_keys_file": None}) == set()


@pytest.mark.parametrize("value", [None, "", " , ,"])
def test_an_unset_or_keyless_variable_is_a_user_error_naming_it(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("RAYLAB_UNIT_KEYS", raising=False)
    else:
        monkeypatch.setenv("RAYLAB_UNIT_KEYS", value)
    with pytest.raises(UserError, match=r"serve.api_keys_env: \$RAYLAB_UNIT_KEYS is not set \(or holds no key\)"):
        api_keys({"api_keys_env": "RAYLAB_UNIT_KEYS"})


def test_a_keys_file_skips_comments_and_blank_lines(keys_file):
    # '#' starts a comment only at the start of a line: inside a key it is part of the key.
    assert api_keys({"api_keys_file": str(keys_file)}) == {"sk-alpha", "sk-beta", "sk-with#hash"}


def test_keys_from_a_variable_and_a_file_are_both_accepted(keys_file, monkeypatch):
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", "sk-env")
    both = api_keys({"api_keys_env": "RAYLAB_UNIT_KEYS", "api_keys_file": str(keys_file)})
    assert both == {"sk-env", "sk-alpha", "sk-beta", "sk-with#hash"}


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n   # and another\n"])
def test_an_empty_or_all_comment_keys_file_is_a_user_error_naming_it(tmp_path, text):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"serve.api_keys_file: {path} has no API key"):
        api_keys({"api_keys_file": str(path)})


def test_a_missing_or_unreadable_keys_file_is_a_user_error_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=rf"serve.api_keys_file: {missing} not found"):
        api_keys({"api_keys_file": str(missing)})
    binary = tmp_path / "keys.bin"
    binary.write_bytes(b"\xff\xfe\x00sk")
    with pytest.raises(UserError, match=rf"serve.api_keys_file: cannot read {binary}"):
        api_keys({"api_keys_file": str(binary)})


@pytest.mark.parametrize("header, ok", [
    ("Bearer sk-alpha", True),
    ("Bearer sk-beta", True),
    ("bearer   sk-beta  ", True),  # the scheme is case-insensitive (RFC 9110)
    ("Bearer sk-alph", False),  # a prefix of a key
    ("Bearer sk-alpha2", False),  # a key and more
    ("Bearer sk-alpha,sk-beta", False),
    ("Basic sk-alpha", False),
    ("sk-alpha", False),
    ("Bearer ", False),
    ("", False),
    ("Bearer # team keys, one per line", False),  # a comment line is no key
    ("Bearer sk-\u00e9\u00e8", False),  # non-ASCII: no match, and no exception either
])
def test_bearer_check(header, ok):
    assert authorized(header, {"sk-alpha", "sk-beta"}) is ok


def test_every_key_is_compared_in_constant_time_whatever_matches(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = {"sk-alpha", "sk-beta", "a-much-longer-key-than-the-others"}
    for header, ok in (("Bearer sk-alpha", True), ("Bearer x", False), ("Bearer " + "y" * 500, False)):
        calls.clear()
        assert authorized(header, keys) is ok
        # One comparison per key, even after a match, of equal-length digests: neither which
        # key matched nor the lengths of the key and the token change the work done.
        assert calls == [(32, 32)] * len(keys)
    assert not authorized("Bearer sk-alpha", set())  # no keys: nothing is authorized


class Ingress(IngressImpl):
    def _catalog(self, default: str) -> dict:
        return CATALOG


def ingress_client(args: dict) -> TestClient:
    impl = Ingress(generator=None, args={"limits": LIMITS, **args})
    impl.reconfigure(CATALOG)
    return TestClient(create_app(ROUTERS, impl))


def test_the_ingress_accepts_each_key_of_a_file_and_nothing_else(keys_file):
    client = ingress_client({"api_keys_file": str(keys_file)})
    for key in ("sk-alpha", "sk-beta", "sk-with#hash"):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
    # Header bytes outside ASCII (here UTF-8, which Starlette decodes as latin-1) are a 401 too.
    for header in ("Bearer sk-gamma", "Bearer # team keys, one per line", "Bearer sk-\u00e9".encode(), "sk-alpha"):
        denied = client.get("/v1/models", headers={"Authorization": header})
        assert denied.status_code == 401, header
        assert denied.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    # Without keys configured the endpoint is open (a loopback one; the config refuses that elsewhere).
    assert ingress_client({}).get("/v1/models").status_code == 200


def test_the_ingress_takes_keys_from_a_variable(monkeypatch):
    monkeypatch.setenv("RAYLAB_UNIT_KEYS", "sk-1,sk-2")
    client = ingress_client({"api_keys_env": "RAYLAB_UNIT_KEYS"})
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-2"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-1,sk-2"}).status_code == 401


def write_config(tmp_path, serve: str):
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        data:
          sources: [{type: jsonl, path: x.jsonl}]
        model: {name_or_path: preset:tiny-llama}
        """) + serve)
    return path


def test_raylab_serve_refuses_unusable_keys_with_exit_2_before_deploying(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "keys.txt"
    empty.write_text("# rotate weekly\n\n")
    config = write_config(tmp_path, f"serve: {{host: 0.0.0.0, api_keys_file: {empty}}}\n")
    assert cli.main(["serve", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"raylab serve: error: serve.api_keys_file: {empty} has no API key" in err and "Traceback" not in err

    monkeypatch.delenv("RAYLAB_UNIT_UNSET_KEYS", raising=False)
    config = write_config(tmp_path, "serve: {host: 0.0.0.0, api_keys_env: RAYLAB_UNIT_UNSET_KEYS}\n")
    assert cli.main(["serve", str(config)]) == 2
    err = capsys.readouterr().err
    assert "serve.api_keys_env: $RAYLAB_UNIT_UNSET_KEYS is not set" in err and "Traceback" not in err
