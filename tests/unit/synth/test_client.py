"""The endpoint client against a scripted OpenAI-compatible server on loopback (a stand-in for
an outside provider's faults, not for a model), and the endpoint policy."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
import pytest
import yaml
from http_helpers import Handler, serving

from raylab import config
from raylab.cli import main
from raylab.core import runs
from raylab.errors import UserError
from raylab.synth import client

OK = {"choices": [{"message": {"role": "assistant", "content": '{"input": "", "output": "Blue."}'}}]}


class Scripted(Handler):
    """Answers each request with the next step of `script`; records what it was sent."""

    script: list = []
    seen: list = []
    auth: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body)
            self.auth.append(self.headers.get("Authorization"))
            step = self.script.pop(0) if self.script else "ok"
        if step == "429":
            self.send_body(429, b'{"error": "slow down"}', headers={"Retry-After": "1"})
        elif step == "500":
            self.send_json(500, {"error": "boom"})
        elif step == "malformed":
            self.send_body(200, b'{"choices": [{"message": ')
        elif step == "hang":
            threading.Event().wait(1.5)  # past the client's timeout
            with contextlib.suppress(OSError):  # the client has hung up
                self.send_json(200, OK)
        else:
            self.send_json(200, OK)


def _endpoint(url, **kw):
    return config.EndpointConfig(base_url=url, model="m", backoff_s=0.01, **kw)


def _send(script: list, timeout_s: float = 30, **kw):
    # a generous timeout but for the timeout case: a loaded machine must not turn an answer into one
    kw["timeout_s"] = timeout_s
    Scripted.script, Scripted.seen = list(script), []
    with serving(Scripted) as url, httpx.Client() as c:
        answer = client.send(c, f"{url}/v1/chat/completions", {}, {"model": "m", "messages": []},
                             _endpoint(url, **kw))
    return answer, len(Scripted.seen)


def test_429_with_retry_after_is_retried_then_succeeds():
    answer, sent = _send(["429", "ok"])
    assert answer.ok and answer.content == '{"input": "", "output": "Blue."}' and sent == 2


def test_a_timeout_and_a_malformed_body_are_failures_with_their_reason():
    assert _send(["hang"], timeout_s=0.3) == (client.Answer(False, reason="timeout"), 1)
    assert _send(["malformed"]) == (client.Answer(False, reason="malformed_response"), 1)


def test_5xx_is_retried_until_max_retries_then_failed():
    answer, sent = _send(["500", "500", "500"], max_retries=2)
    assert (answer.ok, answer.reason, sent) == (False, "http_500", 3)
    answer, sent = _send(["500", "ok"], max_retries=2)  # control: a transient 5xx recovers
    assert answer.ok and sent == 2


def test_retry_after_as_seconds_or_date_is_capped():
    assert client.retry_after("3", cap=60) == 3.0
    assert client.retry_after("600", cap=60) == 60
    assert client.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", cap=60) == 0.0  # in the past
    assert client.retry_after("soon", cap=60) is None and client.retry_after(None, cap=60) is None


def test_the_cache_key_is_the_request():
    a = client.request_key("m", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7})
    assert a == client.request_key("m", {"temperature": 0.7, "messages": [{"role": "user", "content": "hi"}]})
    assert a != client.request_key("m", {"messages": [{"role": "user", "content": "hi!"}], "temperature": 0.7})
    assert a != client.request_key("other", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7})


def _config(tmp_path, base_url: str, allow_remote: bool | None = None) -> dict:
    raw = {"version": 1, "output_dir": str(tmp_path / "run"), "data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
           "model": {"name_or_path": "preset:tiny-llama"},
           "synth": {"endpoint": {"base_url": base_url, "model": "m"}, "self_instruct": {"seeds": ["Name a colour."]}}}
    if allow_remote is not None:
        raw["governance"] = {"allow_remote": allow_remote}
    return raw


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:8000/v1"])
def test_loopback_endpoints_pass_the_policy(tmp_path, url):
    client.check_policy(config.load_dict(_config(tmp_path, url)))


def test_a_remote_endpoint_needs_allow_remote(tmp_path, capsys):
    remote = "https://api.example.com/v1"
    with pytest.raises(UserError, match="governance.allow_remote"):
        client.check_policy(config.load_dict(_config(tmp_path, remote)))
    client.check_policy(config.load_dict(_config(tmp_path, remote, allow_remote=True)))  # control: allowed
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, remote)))
    assert main(["synth", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "governance.allow_remote" in err[0] and "Traceback" not in err[0]


def test_a_literal_api_key_is_refused_in_favour_of_an_env_reference(tmp_path):
    raw = _config(tmp_path, "http://127.0.0.1:8000/v1")
    raw["synth"]["endpoint"]["api_key"] = "plain-text-key-123"
    with pytest.raises(config.ConfigError, match="synth.endpoint.api_key"):
        config.load_dict(raw)
    raw["synth"]["endpoint"]["api_key"] = "${env:SYNTH_KEY}"  # control: the reference is fine
    assert config.load_dict(raw).synth.endpoint.api_key == "${env:SYNTH_KEY}"


def test_without_synth_endpoint_raylabs_served_production_version_is_asked(tmp_path, monkeypatch):
    """serve.port and serve.api_keys_env as `raylab serve` reads them, the model routed to the
    production alias; the scripted server stands where `raylab serve` would listen."""
    monkeypatch.setenv("SYNTH_TEST_SERVE_KEYS", "first-key, second-key")
    Scripted.script, Scripted.seen, Scripted.auth = [], [], []
    with serving(Scripted) as url:
        port = int(url.rsplit(":", 1)[1])
        raw = _config(tmp_path, "unused")
        del raw["synth"]["endpoint"]
        raw["serve"] = {"port": port, "api_keys_env": "SYNTH_TEST_SERVE_KEYS"}
        raw["registry"] = {"model_name": "acme-assistant"}
        cfg = config.load_dict(raw)
        ep, own = client.resolve_endpoint(cfg)
        assert own and (ep.base_url, ep.model) == (f"http://127.0.0.1:{port}/v1", "acme-assistant@production")
        answers = client.Requests(cfg, runs.Run(cfg.output_dir)).complete([[{"role": "user", "content": "hi"}]])
    assert answers[0].ok and answers[0].content == OK["choices"][0]["message"]["content"]
    assert [b["model"] for b in Scripted.seen] == ["acme-assistant@production"]
    assert Scripted.auth == ["Bearer first-key"]  # one key of the endpoint's comma-separated list


def test_the_default_endpoint_follows_the_serve_section_and_an_explicit_one_wins(tmp_path):
    raw = _config(tmp_path, "http://127.0.0.1:9/v1")
    ep, own = client.resolve_endpoint(config.load_dict(raw))
    assert (ep.base_url, ep.model, own) == ("http://127.0.0.1:9/v1", "m", False)  # control: as given
    del raw["synth"]["endpoint"]
    raw["serve"] = {"host": "0.0.0.0", "port": 8123, "allow_unauthenticated": True}
    ep, own = client.resolve_endpoint(config.load_dict(raw))
    assert own and ep.base_url == "http://127.0.0.1:8123/v1" and ep.api_key is None  # a wildcard bind: loopback
    assert ep.model == f"{raw['output_dir'].rsplit('/', 1)[1]}@production"  # registry.model_name: the run name
    raw["serve"] = {"api_keys_file": str(tmp_path / "keys.txt")}
    with pytest.raises(UserError, match="synth.endpoint"):  # synth does not read serve's keys file
        client.resolve_endpoint(config.load_dict(raw))
