"""Chat completion requests to an OpenAI-compatible endpoint: the policy, the cache, the retries
and the Ray Data actor pool that sends them.

    answers = Requests(cfg, run).complete([{"messages": [...]}, ...])   # {key: Answer}

- **Default endpoint.** Without `synth.endpoint`, raylab's own served production version:
  http://<serve.host>:<serve.port>/v1 (a wildcard bind address is reached on 127.0.0.1),
  model <registry.model_name>@production (the ingress's route to that alias), and the first
  key of serve.api_keys_env when that is set (`resolve_endpoint`).
- **Policy.** A base_url whose host is not loopback (localhost, 127.0.0.0/8, ::1) is refused
  unless `governance.allow_remote: true`: generation sends the company's documents to the
  endpoint, so leaving the machine is a decision someone makes in the config.
- **Cache.** Every successful answer is stored under synth/cache/<sha256 of the request>.json
  by the actor that got it, so a run that is interrupted (or stopped by the budget) resumes
  without sending a request twice. Failures are not cached: a re-run tries them again.
- **Retries.** 429, 5xx and connection errors are retried `max_retries` times, waiting the
  answer's Retry-After (seconds or an HTTP date, capped at max_backoff_s) or else
  backoff_s * 2^attempt. A timeout is not retried (a slow provider would be paid twice):
  the request is counted failed with reason `timeout`.
- **Pool.** Requests go out from a Ray Data actor pool (`map_batches` with the Requester
  class, `synth.concurrency` actors); a set that fits in one `synth.batch_size` batch is sent
  by this process, since starting the pool would take longer than the requests.
- **Budget.** `synth.max_requests` counts requests sent (not cached answers, not retries);
  requests past it are not sent and are counted `budget` in the datasheet.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass

from raylab import registry
from raylab.config import EndpointConfig, RaylabConfig
from raylab.core import runs, storage
from raylab.core.secrets import expand_env
from raylab.errors import UserError

log = logging.getLogger(__name__)

RETRYABLE = frozenset({429, 500, 502, 503, 504})


@dataclass
class Answer:
    """One request's outcome: ok with the completion's text, or failed with a reason code."""

    ok: bool
    content: str = ""
    reason: str = ""  # timeout | http_<code> | malformed_response | connection | budget
    cached: bool = False


def is_loopback_url(base_url: str) -> bool:
    host = urllib.parse.urlsplit(base_url).hostname or ""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_WILDCARD = frozenset({"", "0.0.0.0", "::", "[::]"})


def resolve_endpoint(cfg: RaylabConfig) -> tuple[EndpointConfig, bool]:
    """(the endpoint, whether it is raylab's own from the serve section). Serve's keys file
    is not read for it: a synth run names its key in synth.endpoint.api_key instead."""
    if cfg.synth.endpoint is not None:
        return cfg.synth.endpoint, False
    s = cfg.serve
    if s.api_keys_file is not None and s.api_keys_env is None:
        raise UserError("synth.endpoint: raylab's own endpoint takes its keys from serve.api_keys_file, which synth "
                        "does not read; set synth.endpoint {base_url, model, api_key: ${env:NAME}} (or "
                        "serve.api_keys_env)")
    host = "127.0.0.1" if s.host in _WILDCARD else s.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    api_key = f"${{env:{s.api_keys_env}}}" if s.api_keys_env else None
    return EndpointConfig(base_url=f"http://{host}:{s.port}/v1", model=f"{registry.model_name(cfg)}@{registry.PRODUCTION}",
                          api_key=api_key), True


def check_policy(cfg: RaylabConfig) -> None:
    """Exit 2 for a remote endpoint the governance section has not allowed."""
    ep, own = resolve_endpoint(cfg)
    where = "serve.host" if own else "synth.endpoint.base_url"
    url = expand_env(ep.base_url, where)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"{where}: expected http(s)://HOST[:PORT]/..., got {ep.base_url!r}")
    if not is_loopback_url(url) and not cfg.governance.allow_remote:
        host = urllib.parse.urlsplit(url).hostname
        raise UserError(f"{where}: {host} is not this machine, and governance.allow_remote is not "
                        "set; set governance.allow_remote: true to send generation prompts (and the documents in "
                        "them) there")


def request_key(model: str, body: dict) -> str:
    """The cache key: sha256 of the request as sent (model, messages, sampling), canonical JSON."""
    canonical = json.dumps({"model": model, **body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(cap, max(0.0, when.timestamp() - time.time()))


def send(client, url: str, headers: dict, payload: dict, ep) -> Answer:
    """POST one chat completion with the retry rules above; never raises for the provider's faults."""
    import httpx

    for attempt in range(ep.max_retries + 1):
        try:
            r = client.post(url, headers=headers, json=payload, timeout=ep.timeout_s)
        except httpx.TimeoutException:
            return Answer(False, reason="timeout")
        except httpx.TransportError:
            if attempt == ep.max_retries:
                return Answer(False, reason="connection")
            time.sleep(min(ep.max_backoff_s, ep.backoff_s * 2 ** attempt))
            continue
        if r.status_code in RETRYABLE and attempt < ep.max_retries:
            wait = retry_after(r.headers.get("retry-after"), ep.max_backoff_s)
            time.sleep(wait if wait is not None else min(ep.max_backoff_s, ep.backoff_s * 2 ** attempt))
            continue
        if r.status_code != 200:
            return Answer(False, reason=f"http_{r.status_code}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return Answer(False, reason="malformed_response")
        if not isinstance(content, str):
            return Answer(False, reason="malformed_response")
        return Answer(True, content=content)
    return Answer(False, reason="connection")  # unreachable: the last attempt returns above


def read_cached(cache_dir: str, key: str) -> str | None:
    """The cached answer for `key`, or None (a half-written entry from a killed run counts as none)."""
    location = runs.synth_cache_entry(cache_dir, key)
    if not storage.exists(location):
        return None
    try:
        return json.loads(storage.read_text(location))["content"]
    except (ValueError, KeyError, TypeError):
        return None


class Requester:
    """The Ray Data actor: one HTTP client, sends its batch's requests one after another and
    caches each success as soon as it has it."""

    def __init__(self, endpoint: dict, api_key: str | None, url: str, cache_dir: str):
        try:
            import httpx
        except ImportError:
            raise UserError("raylab synth needs the `synth` extra (httpx, rouge-score): pip install 'raylab[synth]'") from None

        from raylab.config import EndpointConfig

        self.ep = EndpointConfig(**endpoint)
        self.url = url
        self.cache_dir = cache_dir
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client()

    def __call__(self, batch: dict) -> dict:
        ok, content, reason = [], [], []
        for key, body in zip(batch["key"], batch["body"], strict=True):
            payload = {"model": self.ep.model, **json.loads(body)}
            answer = send(self.client, self.url, self.headers, payload, self.ep)
            if answer.ok:
                storage.write_text(runs.synth_cache_entry(self.cache_dir, key),
                                   json.dumps({"key": key, "content": answer.content}, ensure_ascii=False))
            ok.append(answer.ok)
            content.append(answer.content)
            reason.append(answer.reason)
        return {"key": list(batch["key"]), "ok": ok, "content": content, "reason": reason}


class Requests:
    """The run's requests: cache look-ups, the budget, and the actor pool for the rest."""

    def __init__(self, cfg: RaylabConfig, run: runs.Run):
        check_policy(cfg)
        self.cfg = cfg
        self.ep, self.own = resolve_endpoint(cfg)
        self.cache_dir = run.synth_cache
        self.budget = cfg.synth.max_requests
        self.sent = 0
        self.cached = 0

    def api_key(self) -> str | None:
        if not self.ep.api_key:
            return None
        if self.own:  # serve.api_keys_env holds the endpoint's keys, comma-separated: any one of them works
            key = expand_env(self.ep.api_key, "serve.api_keys_env").split(",")[0].strip()
            if not key:
                raise UserError(f"serve.api_keys_env: {self.ep.api_key} holds no key for synth to send")
            return key
        return expand_env(self.ep.api_key, "synth.endpoint.api_key")

    def body(self, messages: list[dict]) -> dict:
        return {"messages": messages, "temperature": self.ep.temperature, "max_tokens": self.ep.max_tokens}

    def complete(self, requests: list[list[dict]]) -> list[Answer]:
        """An Answer for every message list, in order; equal requests are sent once."""
        bodies = [self.body(m) for m in requests]
        keys = [request_key(self.ep.model, b) for b in bodies]
        answers: dict[str, Answer] = {}
        todo: dict[str, dict] = {}
        for key, body in zip(keys, bodies, strict=True):
            if key in answers or key in todo:
                continue
            content = read_cached(self.cache_dir, key)
            if content is not None:
                answers[key] = Answer(True, content=content, cached=True)
                self.cached += 1
            elif self.sent + len(todo) < self.budget:
                todo[key] = body
            else:
                answers[key] = Answer(False, reason="budget")
        if todo:
            self.sent += len(todo)
            answers.update(self._send(todo))
        return [answers[k] for k in keys]

    def _send(self, todo: dict[str, dict]) -> dict[str, Answer]:
        import ray

        s = self.cfg.synth
        api_key = self.api_key()
        url = expand_env(self.ep.base_url, "synth.endpoint.base_url").rstrip("/") + "/chat/completions"
        rows = [{"key": k, "body": json.dumps(b, ensure_ascii=False)} for k, b in todo.items()]
        kwargs = {"endpoint": self.ep.model_dump(), "api_key": api_key, "url": url, "cache_dir": self.cache_dir}
        if len(rows) <= s.batch_size:
            # one actor batch: this process sends it (starting an actor pool takes longer than a
            # few requests; self_instruct's later rounds are often this small)
            requester = Requester(**kwargs)
            try:
                out = requester({"key": [r["key"] for r in rows], "body": [r["body"] for r in rows]})
            finally:
                requester.client.close()
            return {k: Answer(ok, content=c, reason=r)
                    for k, ok, c, r in zip(out["key"], out["ok"], out["content"], out["reason"], strict=True)}
        log.info(f"synth: {len(rows)} request(s) to {self.ep.model} ({s.concurrency} actor(s)); "
                 f"{self.sent}/{self.budget} of the budget used")
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), s.concurrency * 4)))
        # I/O-bound actors: a quarter CPU each, so `concurrency` of them fit beside the rest. All
        # are started at once (initial_size): from one, Ray Data's autoscaler adds actors only as
        # its queue grows, and the requests of that ramp go out below the configured
        # concurrency. min_size 1: the pool still runs where fewer fit (started asynchronously).
        size = min(s.concurrency, -(-len(rows) // s.batch_size))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size)
        out = ds.map_batches(Requester, batch_size=s.batch_size, compute=pool, num_cpus=0.25, batch_format="numpy",
                             fn_constructor_kwargs=kwargs).take_all()
        return {r["key"]: Answer(bool(r["ok"]), content=str(r["content"]), reason=str(r["reason"])) for r in out}
