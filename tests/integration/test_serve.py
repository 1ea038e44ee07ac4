"""The serve stage on a real Ray Serve (the session's Ray) with real LoRA adapters: the
official `openai` client (completions, chat, streaming), served greedy text equal to offline
peft generation, two adapters on one base, every class of bad request answered with its
4xx, API keys, autoscaling up under load and back down, and `raylab deploy` switching
versions in place while requests stream, none failing; a version registered after the
deploy served by `NAME/N` without a redeploy; raylab's per-version series on Ray's
Prometheus endpoint growing with traffic, and the served-prompt sample on disk, redacted. Explanations (`/v1/explain`, the Explainer
deployment) of the served answer, with completions answered while one is computing. Faults: a Generator replica and the Ingress
replica SIGKILLed while 8 clients stream (>= 99 % of the requests succeed with at most one
client retry; only streams cut mid-way fail, with OpenAI's error event), and a client that
disconnects mid-stream frees its row in the batch. Load (tests/serve_load.py) records every
request's outcome; a client thread that dies or hangs fails the test.

The adapters are trained here with peft in a few seconds (a fixed answer per adapter, so
greedy text is far from ties) on a tiny Llama whose embeddings are scaled up: at the
default init a tied-embedding tiny model cannot produce confident logits, so LoRA alone
could not learn anything checkable.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from rag_index import package_description, write_index

from conftest import cli_here, free_port, run_cli
from raylab import config, registry
from raylab.serve import deploy
from serve_load import Load, answers_across, stream, wait_for
from serve_metrics import prometheus, series
from serve_models import QUESTIONS, build_base, train_adapter

pytestmark = pytest.mark.integration

NAME = "widgets-serve"
KEY = "sk-test-123"
ANSWERS = {1: "It ships today.", 2: "Ask the help desk."}
# the canary test's thresholds: ANSWERS[2] (18 tokens) breaks the token threshold, ANSWERS[1] (15) holds it
CANARY = {"max_tokens_per_response": 16, "min_requests": 6, "check_interval_s": 0.5, "window_s": 3, "patience": 40}


DOCS = 5  # documents in the endpoint's retrieval index


def short_descriptions(n: int) -> list[str]:
    """n installed packages' descriptions (real text nobody on the project wrote): from each,
    its first two consecutive sentences of plain prose, 40-120 characters each, in a fixed order."""
    import importlib.metadata
    import re

    out, prose = [], re.compile(r"[A-Z][A-Za-z0-9 ,;:'()/-]+\.")
    for d in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        sentences = re.split(r"(?<=\.)\s+", package_description(d))
        for a, b in zip(sentences, sentences[1:], strict=False):
            if all(prose.fullmatch(x) and 40 <= len(x) <= 120 for x in (a, b)) and f"{a} {b}" not in out:
                out.append(f"{a} {b}")
                break
    assert len(out) >= n
    return out[:n]


def serve_config(root: Path, base: Path, port: int, api: dict | None = None, **serve) -> config.RaylabConfig:
    """The endpoint's config; with retrieval (`serve.rag`) over the index in root/run/index
    (and the fine-tuning service's `api` section when given)."""
    return config.load_dict({
        "version": 1, "output_dir": str(root / "run"), "offline": True, **({"api": api} if api else {}),
        "data": {"sources": [{"type": "jsonl", "path": str(root / "unused.jsonl")}]},
        "model": {"name_or_path": str(base)}, "registry": {"model_name": NAME},
        "serve": {"port": port, "cpus_per_replica": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
                  "max_prompt_tokens": 960, "max_tokens": 1000, "max_request_bytes": 20000, "max_ongoing_requests": 8,
                  "api_keys_file": str(root / "keys.txt"),
                  "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                  "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 11},
                  # retrieval only when a request asks: the other tests' answers need their prompts as sent
                  "rag": {"top_k": 2, "by_default": False, "cpus_per_replica": 0.25},
                  "monitor": {"flush_every": 1}, **serve},  # the prompt sample on disk after each kept prompt
    })


@pytest.fixture(scope="module")
def served(tmp_path_factory, _session_ray):
    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    build_base(base)
    adapters = {v: root / f"adapter{v}" for v in ANSWERS}
    for v, path in adapters.items():
        assert train_adapter(base, path, ANSWERS[v]) < 0.1
    (root / "keys.txt").write_text(f"# API keys, one per line\n{KEY}\n")
    docs = short_descriptions(DOCS)
    cfg = serve_config(root, base, free_port(), explain={"enabled": True, "cpus_per_replica": 0.25},  # /v1/explain
                       canary=CANARY, api_keys_db=True,  # raylab keys too (an ft: name is its org's)
                       # the fine-tuning service in the ingress: its ft: names are routed (no job runs here)
                       api={"enabled": True, "files": str(root / "api-files"), "runs": str(root / "api-runs")})
    # the index written directly (a chunk per document): `raylab index` is test_rag's subject,
    # and its Ray Data pipeline would cost this module's fixture half a minute
    write_index(root / "run" / "index", docs)
    store = registry.open_store(cfg)
    exp = registry.experiment_id(store, NAME)
    meta = {"identity": "serve-test", "base_model": str(base), "method": "lora", "metrics": {}}
    for v, path in adapters.items():
        run = registry.log_run(store, exp, name=f"adapter{v}", key=f"serve-test-{v}", params={}, history=[],
                               artifacts={}, tags={})
        mv = registry.register(store, cfg, run, str(path), meta)
        assert int(mv.version) == v
        registry.set_tags(store, NAME, v, {"raylab.gates.status": "passed"})
    registry.promote(store, NAME, 1)
    stop = threading.Event()
    thread = threading.Thread(target=deploy.run_serve, args=(cfg,), kwargs={"stop": stop},
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.serve.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if get(url, "/healthz")[0] == 200 and deploy._endpoint_file().exists():  # written once it is RUNNING
                break
        except OSError:
            pass
        time.sleep(0.5)
    assert thread.is_alive(), "raylab serve ended before the endpoint came up"
    yield {"url": url, "cfg": cfg, "adapters": adapters, "root": root, "docs": docs, "dashboard": json.loads(deploy._endpoint_file().read_text())["dashboard"]}
    stop.set()
    thread.join(120)
    from ray import serve

    serve.shutdown()


def request(url: str, path: str, body: dict | bytes | None = None, key: str | None = KEY, method: str | None = None,
            headers: dict | None = None) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(url + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def plain(url: str, path: str, body: dict) -> tuple[int, str | None, str]:
    """A non-streaming request as (status, error, text) for Load."""
    status, answer = request(url, path, body)
    if status != 200:
        return status, answer["error"]["code"] or answer["error"]["type"], json.dumps(answer)
    choice = answer["choices"][0]
    return status, None, choice["text"] if "text" in choice else choice["message"]["content"]


def get(url: str, path: str, key: str | None = KEY):
    return request(url, path, key=key)


def chat(url: str, model: str, question: str, **extra) -> tuple[int, dict]:
    return request(url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": question}],
                                                 "temperature": 0, **extra})


def client(served):
    import openai

    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_completions_chat_and_streaming(served):
    c = client(served)
    listed = [m.id for m in c.models.list().data]
    assert listed[:2] == [NAME, f"{NAME}@production"] and {f"{NAME}/1", f"{NAME}/2"} <= set(listed)

    reply = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0)
    assert reply.choices[0].message.content == ANSWERS[1] and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(ANSWERS[1]) and reply.usage.prompt_tokens > len(QUESTIONS[0])

    stream = c.chat.completions.create(model=f"{NAME}@production", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ANSWERS[1] and len([ch for ch in chunks if ch.choices]) > 5  # token by token, not one blob
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWERS[1])

    done = c.completions.create(model=NAME, prompt="The widget", max_tokens=7, temperature=0.8, top_p=0.9, seed=11, n=2)
    assert [ch.index for ch in done.choices] == [0, 1] and all(ch.finish_reason in ("length", "stop") for ch in done.choices)
    again = c.completions.create(model=NAME, prompt="The widget", max_tokens=7, temperature=0.8, top_p=0.9, seed=11, n=2)
    assert [ch.text for ch in again.choices] == [ch.text for ch in done.choices]  # seeded sampling repeats
    stopped = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0,
                                        stop=["ships"])
    assert stopped.choices[0].message.content == "It " and stopped.choices[0].finish_reason == "stop"
    capped = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[2]}], temperature=0,
                                       max_tokens=4)
    assert capped.choices[0].message.content == ANSWERS[1][:4] and capped.choices[0].finish_reason == "length"

    # The raw event stream: OpenAI's framing, ending with [DONE].
    req = urllib.request.Request(served["url"] + "/v1/completions", data=json.dumps(
        {"model": NAME, "prompt": "abc", "max_tokens": 5, "stream": True, "temperature": 0, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert sum(1 for e in events[:-1] if json.loads(e[6:])["choices"][0]["text"]) >= 1


def test_prometheus_exposes_per_version_series_that_grow_with_traffic(served):
    """raylab's series on Ray's metrics endpoint, per version, moved by this test's requests
    (Ray exports every 10 s: polled); the prompts in the sample on disk, the planted address
    redacted."""
    url, email = served["url"], "jane.doe@example.com"

    def counts(page: str) -> dict:
        ok = {v: series(page, "ray_raylab_serve_requests_total", model=NAME, version=str(v), status="200") for v in (1, 2)}
        return {**ok, "404": series(page, "ray_raylab_serve_errors_total", model="no-such-model", status="404"),
                "latency": series(page, "ray_raylab_serve_latency_seconds_count", model=NAME, version="1"),
                "out": series(page, "ray_raylab_serve_completion_tokens_total", model=NAME, version="1")}

    before = counts(prometheus())
    assert before[2] == 0  # the module's earlier tests ask version 1 only (NAME, NAME@production)
    for v, n in ((1, 3), (2, 1)):
        for i in range(n):
            assert chat(url, f"{NAME}/{v}", f"Monitoring question {i}: my address is {email}", max_tokens=4)[0] == 200
    assert chat(url, "no-such-model", "hello")[0] == 404
    deadline, now = time.monotonic() + 60, before
    while time.monotonic() < deadline:
        now = counts(prometheus())
        if now[1] >= before[1] + 3 and now[2] >= before[2] + 1 and now["404"] >= before["404"] + 1:
            break
        time.sleep(2)
    # Version 1's baseline may still lack the earlier tests' requests (exported every 10 s),
    # so it grows by at least this test's 3; version 2 and the unknown model see only this
    # test's requests here, so exactly 1 each: the series are per version, not pooled.
    assert now[1] - before[1] >= 3 and now[2] - before[2] == 1 and now["404"] - before["404"] == 1, (before, now)
    assert now["latency"] - before["latency"] >= 3 and now["out"] > before["out"]
    assert "ray_raylab_serve_adapter_loads_total" in prometheus()  # the Generator's own series, beside the Ingress's
    def sampled() -> str:  # written off the Ingress's loop after each kept prompt (flush_every: 1)
        return "".join(f.read_text() for f in (served["root"] / "run" / "serve" / "prompts").glob("*.jsonl"))

    wait_for(lambda: "Monitoring question 2: my address is <EMAIL>" in sampled(), 30, "the prompt sample on disk")
    assert email not in sampled()


def test_chat_with_retrieval_returns_the_supporting_text_as_sources(served):
    """serve.rag on the real Serve app: the Embedder deployment retrieves the document that
    holds the question; the chunk goes into the prompt and comes back as a source, on the
    response and on a stream's first event; retrieval off is the control. /v1/embeddings
    through Serve equals the model in this process."""
    import re

    import numpy as np

    from raylab.rag import embedder

    docs, url, k = served["docs"], served["url"], 3
    question = re.split(r"(?<=\.)\s+", docs[k])[1]  # the document's second sentence
    assert not any(question in d for i, d in enumerate(docs) if i != k)  # only one document supports it
    status, on = chat(url, NAME, question, max_tokens=8, raylab={"retrieval": True, "top_k": 1})
    assert status == 200, on
    [source] = on["raylab"]["sources"]
    assert set(source) == {"chunk_id", "source", "origin", "record_id", "start", "end", "score", "text"}
    assert question in source["text"] and source["origin"] == f"packages.jsonl:{k + 1}", source
    status, off = chat(url, NAME, question, max_tokens=8)  # serve.rag.by_default: false
    assert status == 200 and "raylab" not in off, off  # the control: no retrieval, no sources
    # the chunk is in the prompt (a byte-level tokenizer: a token per byte) and absent without retrieval
    assert on["usage"]["prompt_tokens"] - off["usage"]["prompt_tokens"] >= len(source["text"].encode())

    c = client(served)  # streamed, serve.rag.top_k (2) chunks: the sources ride on the first event
    events = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=8, stream=True,
                                            extra_body={"raylab": {"retrieval": True}}))
    sources = events[0].model_extra["raylab"]["sources"]
    assert len(sources) == 2 and sources[0]["chunk_id"] == source["chunk_id"]
    assert events[0].choices[0].delta.role == "assistant" and not events[0].choices[0].delta.content
    assert all("raylab" not in (e.model_extra or {}) for e in events[1:]) and len(events) > 2

    listed = [m.id for m in c.models.list().data]
    assert listed[-1] == embedder.DEFAULT_MODEL and NAME in listed
    reply = c.embeddings.create(model=embedder.DEFAULT_MODEL, input=[question, docs[0]])
    expected = embedder.encode(embedder.resolve(None)[1], [question, docs[0]])
    assert np.abs(np.array([d.embedding for d in reply.data]) - expected).max() < 1e-5


def test_raylab_runs_retrieval_augmented_answer_comes_from_this_endpoint(served):
    """`raylab run`'s summary entry (pipeline.rag_smoke) on the real endpoint: the headline
    held-out question asked with retrieval, although serve.rag.by_default is false here, and
    the document that holds it first among the sources."""
    from raylab import pipeline

    docs, k = served["docs"], 2
    question = re.split(r"(?<=\.)\s+", docs[k])[1]
    held = served["root"] / "rag-held-out.jsonl"
    held.write_text(json.dumps({"messages": [{"role": "user", "content": question}], "reference": question}) + "\n")
    cfg = config.load_dict(served["cfg"].model_dump(mode="json") | {"eval": {"held_out": str(held), "max_new_tokens": 8}})
    entry = pipeline.rag_smoke(cfg, {"url": served["url"], "name": NAME})
    assert entry["question"] == question and isinstance(entry["answer"], str)
    assert len(entry["sources"]) == 2  # serve.rag.top_k
    assert entry["sources"][0]["origin"] == f"packages.jsonl:{k + 1}" and question in entry["sources"][0]["text"]
    assert entry["sources"][0]["score"] >= entry["sources"][1]["score"]


def test_served_greedy_equals_offline_peft_for_two_adapters_on_one_base(served):
    from raylab.models import greedy, prompt_ids
    from raylab.models import load_inference as load

    prompts = QUESTIONS + ["Where is my order?", "hello"]
    offline = {}
    for version, adapter in served["adapters"].items():
        model, tok = load(str(adapter))
        offline[version] = greedy(model, tok, [prompt_ids(tok, {"prompt": p}) for p in prompts], 24)
        assert offline[version][:4] == [ANSWERS[version]] * 4
    # Both versions at once, twice over: Serve batches each version's concurrent requests
    # into one decode on the shared base; every answer must equal its offline generation.
    asks = [(v, i) for v in offline for i in range(len(prompts))] * 2
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda a: chat(served["url"], f"{NAME}/{a[0]}", prompts[a[1]], max_tokens=24), asks))
    assert all(status == 200 for status, _ in got), got
    # (offline `greedy` strips surrounding whitespace from its answers)
    assert [b["choices"][0]["message"]["content"].strip() for _, b in got] == [offline[v][i] for v, i in asks]
    details = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployments"]
    assert details["Generator"]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.5


BAD = [  # (what, body or raw bytes, status, param the error names)
    ("malformed JSON", b'{"model": "x", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("missing messages", {"model": NAME}, 400, "messages"),
    ("wrong type", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ("negative max_tokens", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ("empty messages", {"model": NAME, "messages": []}, 400, "messages"),
    ("unknown role", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("unknown argument", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "best_of": 2}, 400, "best_of"),
    ("too many stops", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop"),
    ("over-long prompt", {"model": NAME, "messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages"),
    ("request too large", {"model": NAME, "messages": [{"role": "user", "content": "x" * 30000}]}, 400, None),
    ("unknown model", {"model": "nope/7", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_4xx(served, what, body, status, param):
    got, answer = request(served["url"], "/v1/chat/completions", body)
    assert got == status, (what, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_auth_unknown_paths_and_the_server_survives(served):
    url = served["url"]
    for key in (None, "sk-wrong"):
        status, body = request(url, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]},
                               key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert get(url, "/v1/models", key=key)[0] == 401
    status, body = get(url, "/v1/nothing-here")
    assert status == 404 and body["error"]["message"]
    assert request(url, "/v1/completions", method="GET")[0] == 405
    assert get(url, "/healthz", key=None) == (200, {"status": "ok", "model": f"{NAME}/1", "canary": None})
    status, body = chat(url, NAME, QUESTIONS[3])  # after all the bad requests, the replicas still answer
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS[1]


def test_explanations_answer_and_completions_stay_responsive_while_one_runs(served):
    """`/v1/explain` runs in the Explainer deployment: the served answer's tokens explained,
    its HTML view, its 4xx; and completions finish while an explanation is still computing."""
    url, question = served["url"], [{"role": "user", "content": QUESTIONS[0]}]
    status, first = request(url, "/v1/explain", {"model": NAME, "messages": question, "method": "feature_ablation"})
    assert status == 200, first
    assert first["version"] == f"{NAME}/1" and first["output_text"] == ANSWERS[1]  # the served answer, explained
    assert len(first["attributions"]) == len(ANSWERS[1]) and first["target_source"] == "greedy answer"
    status, page = request(url, first["html"], method="GET")
    assert status == 200 and "feature_ablation" in page and page.count('class="t"') > len(first["input_tokens"])
    assert request(url, "/v1/explain", {"model": "nope/7", "prompt": "hi"})[0] == 404
    status, long = request(url, "/v1/explain", {"model": NAME, "prompt": "hi", "target": "x" * 33})  # explain.max_target_tokens
    assert status == 400 and long["error"]["param"] == "target", long

    # Integrated gradients over the 15-token answer (n_steps forward and backward passes per
    # token) is sent first and still computing while ordinary completions are answered.
    heavy = json.dumps({"model": NAME, "messages": question, "method": "integrated_gradients", "n_steps": 256})
    conn = http.client.HTTPConnection("127.0.0.1", served["cfg"].serve.port, timeout=300)
    conn.request("POST", "/v1/explain", heavy, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    for q in QUESTIONS[1:3]:
        status, body = chat(url, NAME, q)
        assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS[1]
        ready, _, _ = select.select([conn.sock], [], [], 0)
        assert not ready, "the explanation was answered before the completion: nothing was in flight"
    answer = conn.getresponse()
    explained = json.loads(answer.read())
    conn.close()
    assert answer.status == 200 and len(explained["convergence_deltas"]) == len(ANSWERS[1]), explained


def _replicas(served, deployment: str) -> list[str]:
    details = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployments"][deployment]
    return sorted(r["replica_id"] for r in details["replicas"] if r["state"] == "RUNNING")



def test_autoscaling_goes_up_under_load_and_back_down(served):
    assert len(_replicas(served, "Generator")) == 1
    body = {"model": NAME, "prompt": "load", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    with Load(6, lambda i, mark: plain(served["url"], "/v1/completions", body)) as load:
        wait_for(lambda: len(_replicas(served, "Generator")) >= 2, 120, "a second Generator replica under load")
    load.check()
    assert not load.failures(), load.failures()[:3]
    wait_for(lambda: len(_replicas(served, "Generator")) == 1, 120, "the Generator to scale back to 1 replica")


# ---------------------------------------------------------------- faults: a replica killed under load, a client gone


def _replica_pid(served, deployment: str, replica_id: str) -> int:
    """The process of a RUNNING replica, by Ray's state API (the actor Serve reports for it)."""
    from ray.util.state import list_actors

    details = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployments"][deployment]
    replica = next(r for r in details["replicas"] if r["replica_id"] == replica_id)
    actors = list_actors(filters=[("actor_id", "=", replica["actor_id"]), ("state", "=", "ALIVE")])
    assert len(actors) == 1 and actors[0].class_name.endswith(f"raylab:{deployment}"), actors
    return actors[0].pid


STREAMED = {"model": NAME, "prompt": "A widget", "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
# Two choices per request: the 8 requests a replica takes (max_ongoing_requests, as the
# quickstart's) are 16 rows, four times max_batch_size, so a busy replica always holds
# requests queued in its engine without a token.
KILLED = dict(STREAMED, n=2, max_tokens=200)


def _generator_stats() -> dict:
    """Generator.stats() of whichever replica Serve routes the call to."""
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="raylab").stats.remote().result(timeout_s=30)


def _ingress_log(served) -> str:
    """The running Ingress replicas' Serve logs (this one-node cluster's log directory)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return "".join((logs / f"replica_raylab_Ingress_{r}.log").read_text() for r in _replicas(served, "Ingress"))


def _kill_under_load(served, deployment: str, ready) -> tuple[Load, float]:
    """SIGKILL `deployment`'s replica (the Generator's one at rest) while 8 clients stream,
    each retrying a failed request once, once `ready(load, victim)` holds; runs until 8
    requests started after Serve's replacement came up succeeded. Returns the load and
    when the kill happened."""
    wait_for(lambda: len(_replicas(served, "Generator")) == 1, 120, "one Generator replica at rest")
    [victim] = _replicas(served, deployment)
    pid = _replica_pid(served, deployment, victim)
    # A request with no token yet waits at the ingress for Serve's replacement replica, which
    # took over 60 s to come up under CI's two-worker load once: the clients' timeout is above
    # the 120 s allowed for the replacement, so a TimeoutError still means a request was lost.
    with Load(8, lambda i, mark: stream(served["url"], "/v1/completions", KILLED, KEY, 180, mark), retries=1) as load:
        wait_for(lambda: ready(load, victim), 60, "streams under way")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: victim not in (now := _replicas(served, deployment)) and now, 120, f"a new {deployment} replica")
        replaced = time.monotonic()
        wait_for(lambda: sum(1 for o in load.outcomes if o.started > replaced and o.ok) >= 8, 120,
              "requests served after the replacement")
    load.check()  # no client thread died or hung
    across = [a for a in load.requests().values() if a[0].started < killed < a[-1].ended]
    assert len(across) >= 4, "the kill should cut into requests in flight"
    tried = load.requests().values()
    print(f"\n{deployment} replica killed: {len(tried)} requests, {len(across)} in flight across the kill, "
          f"{sum(1 for a in tried if not a[0].ok)} first attempts failed, {sum(1 for a in tried if a[-1].ok)} succeeded "
          f"within one client retry ({load.success_rate():.1%})")  # the figures the closing notes quote (pytest -s)
    return load, killed


def test_a_generator_replica_killed_under_streaming_load(served):
    # (no Generator.stats() call here: it would queue behind the load for a free slot)
    def ready(load, victim) -> bool:  # streams under way; the rest queue on the victim without a token
        return load.streaming() >= 2

    logged = len(_ingress_log(served))
    load, _ = _kill_under_load(served, "Generator", ready)
    failed = load.failures()
    # Requests without a token yet were re-submitted by the ingress (not failed); streams cut
    # mid-way ended with the OpenAI error event and were repeated by the client's one retry.
    assert {o.error for o in failed} <= {"replica_lost"}, failed[:3]
    assert failed, "no stream was cut mid-way: the kill missed the requests it should have hit"
    assert all(o.text for o in failed)  # only streams that had tokens are cut
    assert '"resubmit": ' in _ingress_log(served)[logged:], "no request without a token was re-submitted"
    assert load.success_rate() >= 0.99, (load.success_rate(), failed[:5])


def test_the_ingress_replica_killed_under_streaming_load(served):
    load, killed = _kill_under_load(served, "Ingress", lambda load, victim: load.streaming() >= 2)
    failed = load.failures()
    # the requests in flight at the kill were cut (the proxy cannot finish them); their retries
    # and the requests after them waited for Serve's new Ingress replica
    assert any(o.started < killed for o in failed), failed[:3]
    assert load.success_rate() >= 0.99, (load.success_rate(), failed[:5])
    assert get(served["url"], "/healthz", key=None)[0] == 200


def _at_rest(served, deployment: str) -> bool:
    """One replica in any state (none starting or stopping) and no scaling under way."""
    details = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployments"][deployment]
    return details["status"] == "HEALTHY" and len(details["replicas"]) == 1


def test_a_client_that_disconnects_mid_stream_frees_its_rows(served):
    """Both streams' rows enter the engine; one client leaves; its row is aborted while the
    other still decodes. `stats()` reaches whichever replica Serve routes to, so the test keeps
    one replica throughout: it starts at rest (an earlier test's scale-up or -down finished)
    and never polls while both streams run, which would put 3 requests against a target of 2
    and start a second replica (as happened in CI)."""
    wait_for(lambda: _at_rest(served, "Generator"), 120, "one Generator replica at rest")
    stats = _generator_stats
    wait_for(lambda: stats()["running"] == 0, 60, "an idle engine")
    before = stats()
    long = dict(STREAMED, max_tokens=1000)  # seconds of decoding (the tiny model's context is 1024)
    kept: list = []
    first_text = threading.Event()
    staying = threading.Thread(target=lambda: kept.append(
        stream(served["url"], "/v1/completions", long, KEY, 120, mark=first_text.set)), daemon=True)
    staying.start()
    leaving = http.client.HTTPConnection("127.0.0.1", served["cfg"].serve.port, timeout=60)
    leaving.request("POST", "/v1/completions", json.dumps(long), {"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {KEY}"})
    reply = leaving.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    assert first_text.wait(60), "the staying stream produced no text"  # both rows are decoding
    leaving.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    leaving.close()

    def one_left() -> bool:
        now = stats()
        assert now["replica"] == before["replica"], "a second Generator replica started; this test needs one"
        return now["running"] == 1

    wait_for(one_left, 60, "the departed client's row to leave the batch")
    assert not kept, "the staying stream ended before the other left: the check above proved nothing"
    after = stats()
    # both entered the engine; the departed one was aborted (not finished) while the other ran
    assert after["submitted"] == before["submitted"] + 2, (before, after)
    assert after["aborted"] == before["aborted"] + 1 and after["finished"] == before["finished"], (before, after)
    staying.join(120)
    status, error, text = kept[0]
    assert (status, error) == (200, None) and text  # the staying client's stream ran to its end ([DONE])
    assert stats()["aborted"] == before["aborted"] + 1


def test_emit_config_is_a_valid_serve_deploy_config(served, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(served["cfg"].model_dump(mode="json")))
    done = cli_here("serve", str(cfg_file), "--emit-config", str(out))  # in this process: no Ray, no server
    assert done.returncode == 0, done.stderr
    emitted = yaml.safe_load(out.read_text())
    ServeDeploySchema.parse_obj(emitted)  # what `serve deploy` and a RayService check
    app = emitted["applications"][0]
    assert app["import_path"] == "raylab.serve:build"
    assert app["deployments"][1]["user_config"]["default"] == f"{NAME}/1"
    assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == 2
    # No production version: exit 2 naming the fix.
    fresh = cli_here("serve", str(cfg_file), "registry.model_name=never-promoted", "--emit-config", str(out))
    assert fresh.returncode == 2 and "no registered model 'never-promoted'" in fresh.stderr and "Traceback" not in fresh.stderr


def test_deploy_switches_versions_in_place_while_requests_stream(served):
    # at rest first: a replica an earlier test's load added would be scaled down meanwhile
    wait_for(lambda: len(_replicas(served, "Generator")) == 1, 120, "one Generator replica at rest")
    before = {d: _replicas(served, d) for d in ("Generator", "Ingress")}

    def ask(i, mark):
        return plain(served["url"], "/v1/chat/completions", {"model": NAME, "temperature": 0,
                                                              "messages": [{"role": "user", "content": QUESTIONS[i % 4]}]})

    def upgrade():
        done = run_cli("deploy", f"{NAME}/2", "--address", served["dashboard"], timeout=300)
        assert done.returncode == 0, done.stderr

    answers = answers_across(upgrade, ask)
    assert answers[0] == ANSWERS[1] and answers[-1] == ANSWERS[2] and set(answers) == {ANSWERS[1], ANSWERS[2]}
    for d, ids in before.items():  # reconfigured, not replaced (the autoscaler may have added one under this load)
        assert set(ids) <= set(_replicas(served, d)), (d, ids)
    assert get(served["url"], "/healthz", key=None)[1]["model"] == f"{NAME}/2"
    back = run_cli("deploy", f"{NAME}@production", "--address", served["dashboard"], timeout=300)
    assert back.returncode == 0 and f"{NAME}/1" in back.stdout
    # each deploy is one event, in the run that registered the deployed version
    from raylab.core import events, runs

    recorded = events.read(runs.Run(served["cfg"].output_dir).events)
    deployed = [f"{e['model']}/{e['version']}" for e in recorded if e["kind"] == "serve.deploy"]
    assert deployed[-2:] == [f"{NAME}/2", f"{NAME}/1"], deployed


def test_a_version_registered_after_the_deploy_is_served_without_a_redeploy(served):
    before = _replicas(served, "Ingress")
    deployed = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployed_app_config"]
    routing = next(d for d in deployed["deployments"] if d["name"] == "Ingress")["user_config"]
    table = routing["routes"]
    cfg, store = served["cfg"], registry.open_store(served["cfg"])
    version = max(int(mv.version) for mv in store.client.search_model_versions(f"name = '{NAME}'")) + 1
    assert f"{NAME}/{version}" not in table  # the deployed routing table does not know it
    status, body = chat(served["url"], f"{NAME}/{version}", QUESTIONS[0])
    assert status == 404 and body["error"]["code"] == "model_not_found"  # not registered yet
    run = registry.log_run(store, registry.experiment_id(store, NAME), name="late", key="serve-test-late", params={},
                           history=[], artifacts={}, tags={})
    meta = {"identity": "serve-test", "base_model": str(served["root"] / "base"), "method": "lora", "metrics": {}}
    assert int(registry.register(store, cfg, run, str(served["adapters"][2]), meta).version) == version
    status, body = chat(served["url"], f"{NAME}/{version}", QUESTIONS[0])
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS[2], body
    assert f"{NAME}/{version}" in [m["id"] for m in get(served["url"], "/v1/models")[1]["data"]]
    for model in (f"{NAME}/{version + 7}", f"other-{NAME}/1"):  # never registered / not this endpoint's model
        status, body = chat(served["url"], model, QUESTIONS[0])
        assert status == 404 and body["error"]["code"] == "model_not_found", (model, body)
    assert _replicas(served, "Ingress") == before  # no redeploy, no restart
    assert get(served["url"], "/healthz", key=None)[1]["model"] == routing["default"]  # the default stays as deployed


def test_a_fine_tuned_models_name_answers_for_its_organisation_only(served):
    """With api.enabled the live endpoint serves a fine-tuning job's `ft:` name (what a job
    returns as fine_tuned_model; a whole job is test_submit's) as the registry version the
    service's table maps it to: the job's organisation gets that version's answer through
    the official client; another organisation's key and a static key get model_not_found, as
    for a name never made (the control)."""
    import openai

    from raylab.core import controldb
    from raylab.core.access import keys
    from raylab.serve import ftstore

    db = controldb.url()
    name = f"ft:{NAME}:acme:live:ftjob-live"
    ftstore.add_model(db, {"name": name, "org": "acme", "job_id": "ftjob-live", "registry_name": NAME,
                           "registry_version": 2})
    acme, _ = keys.create(db, "acme", "viewer", "ada-live", by="root@host")
    globex, _ = keys.create(db, "globex", "viewer", "bob-live", by="root@host")
    ask = openai.OpenAI(base_url=served["url"] + "/v1", api_key=acme, max_retries=0)
    answer = ask.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0)
    assert answer.choices[0].message.content == ANSWERS[2] and answer.model == name
    for key, model in ((globex, name), (KEY, name), (acme, name.replace("ftjob-live", "ftjob-none"))):
        status, body = request(served["url"], "/v1/chat/completions",
                               {"model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}]}, key=key)
        assert status == 404 and body["error"]["code"] == "model_not_found", (key[:8], model, body)


def _stats_by_replica(served) -> dict[str, dict]:
    """stats() of every running Generator replica (the handle routes at random: asked until each
    has answered), by replica id."""
    from ray import serve

    handle, want, seen = serve.get_deployment_handle("Generator", deploy.APP), set(_replicas(served, "Generator")), {}
    for _ in range(60):
        one = handle.stats.remote().result(timeout_s=60)
        seen[one["replica"]] = one
        if want <= set(seen):
            return {r: seen[r] for r in want}
    raise AssertionError(f"stats() never reached replicas {sorted(want - set(seen))}")


def test_an_admin_loads_and_unloads_a_version_on_every_replica_through_the_endpoint(served):
    """`POST /v1/registry/load` on the live endpoint's own service (an admin key): the
    Generator's deployed `pinned` list gains the version, every replica holds it without a
    restart, and it answers; a viewer is a 403 and the list is unchanged. Unload empties it
    again on every replica, and a second unload is a 409 naming why. The control: before the
    load no replica holds a pinned version."""
    from raylab.core import controldb
    from raylab.core.access import keys

    db = controldb.url()
    admin, _ = keys.create(db, "acme", "admin", "root-live", by="root@host")
    viewer, _ = keys.create(db, "acme", "viewer", "vic-live", by="root@host")
    target = f"{NAME}/2"
    wait_for(lambda: _at_rest(served, "Generator"), 120, "one Generator replica at rest")
    replicas = set(_replicas(served, "Generator"))
    assert all(s["pinned"] == [] for s in _stats_by_replica(served).values())  # the control

    def deployed_generator() -> dict:
        app = deploy.rest(served["dashboard"], "GET")["applications"]["raylab"]["deployed_app_config"]
        return next(d for d in app["deployments"] if d["name"] == "Generator")["user_config"]

    status, body = request(served["url"], "/v1/registry/load", {"ref": target}, key=viewer)
    assert status == 403 and "may not serve.load" in body["error"]["message"], body
    assert deployed_generator().get("pinned", []) == []  # refused before anything changed
    status, body = request(served["url"], "/v1/registry/load", {"ref": f"other-{NAME}/1"}, key=admin)
    assert status == 404, body  # not registered: as for any unknown version
    status, body = request(served["url"], "/v1/registry/load", {"ref": target}, key=admin)
    assert status == 200 and body["model"] == target and body["loaded"] and body["changed"], body

    conf = deployed_generator()
    assert conf["pinned"] == [target] and conf["preload"] == [f"{NAME}/1"], conf  # routing unchanged
    stats = _stats_by_replica(served)
    assert set(stats) == replicas and all(s["pinned"] == [target] for s in stats.values()), stats  # no restart
    status, answer = chat(served["url"], target, QUESTIONS[0])
    assert status == 200 and answer["choices"][0]["message"]["content"] == ANSWERS[2], answer
    assert request(served["url"], "/v1/registry/load", {"ref": target}, key=admin)[1]["changed"] is False

    status, body = request(served["url"], "/v1/registry/unload", {"ref": target}, key=admin)
    assert status == 200 and body["loaded"] is False, body
    assert deployed_generator()["pinned"] == [] and all(s["pinned"] == [] for s in _stats_by_replica(served).values())
    status, body = request(served["url"], "/v1/registry/unload", {"ref": target}, key=admin)
    assert status == 409 and "not loaded" in body["error"]["message"], body
    status, answer = chat(served["url"], target, QUESTIONS[0])  # still servable: loaded again on demand
    assert status == 200 and answer["choices"][0]["message"]["content"] == ANSWERS[2], answer


PASSAGES = ["Acme ships widget orders within two business days.",
            "The Springfield warehouse is open Monday to Friday.",
            "Returned widgets are refunded to the original card."]
# short: the tiny byte-level model learns a 52-character answer to 325-character prompts in 400 steps
QA = {"pairs": [{"question": "When?", "answer": "Today."}]}


def test_synth_against_this_endpoint_resumes_without_asking_twice(served, tmp_path, monkeypatch):
    """`raylab synth` (grounded_qa) against this endpoint serving a version whose adapter was
    trained here to answer synth's own prompts in its format (issue 30): a run stopped by its
    request budget keeps what it made, a re-run sends only the rest, a third sends nothing,
    counted at the server (the version's request series on Prometheus: exactly one request
    per passage). The answers parse, so the output holds examples, with their chunk ids."""
    from raylab import synth
    from raylab.synth import generators

    handbook = tmp_path / "handbook.md"
    handbook.write_text("\n\n".join(PASSAGES))
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)
    cfg, store = served["cfg"], registry.open_store(served["cfg"])
    version = max(int(mv.version) for mv in store.client.search_model_versions(f"name = '{NAME}'")) + 1

    def synth_cfg(budget: int) -> config.RaylabConfig:
        return config.load_dict({
            "version": 1, "output_dir": str(tmp_path / "run"), "offline": True,
            "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}]},
            "model": {"name_or_path": str(served["root"] / "base")},
            "synth": {"endpoint": {"base_url": served["url"] + "/v1", "model": f"{NAME}/{version}",
                                   "api_key": "${env:SYNTH_TEST_KEY}", "temperature": 0, "max_tokens": 200},
                      "grounded_qa": {"files": [str(handbook)], "min_chunk_chars": 10, "pairs_per_chunk": 1},
                      "max_requests": budget, "concurrency": 1, "batch_size": 2}})

    g = synth_cfg(1).synth.grounded_qa
    prompts = [generators.qa_prompt(g, c["text"])[0]["content"] for c in generators.read_chunks(g)]
    assert len(prompts) == len(PASSAGES)
    adapter = tmp_path / "adapter-synth"
    assert train_adapter(served["root"] / "base", adapter, json.dumps(QA), steps=400, questions=prompts) < 0.1
    run = registry.log_run(store, registry.experiment_id(store, NAME), name="synth-format", key="serve-test-synth",
                           params={}, history=[], artifacts={}, tags={})
    meta = {"identity": "serve-test", "base_model": str(served["root"] / "base"), "method": "lora", "metrics": {}}
    assert int(registry.register(store, cfg, run, str(adapter), meta).version) == version

    def served_requests() -> float:
        return series(prometheus(), "ray_raylab_serve_requests_total", model=NAME, version=str(version), status="200")

    first = synth.run_synth(synth_cfg(2))
    assert first["requests"]["sent"] == 2 and first["generators"]["grounded_qa"]["failed"]["counts"] == {"budget": 1}
    second = synth.run_synth(synth_cfg(100))
    assert second["requests"]["cached"] == 2 and second["requests"]["sent"] == 1
    third = synth.run_synth(synth_cfg(100))
    assert third["requests"]["sent"] == 0 and third["requests"]["cached"] == 3
    wait_for(lambda: served_requests() >= 3, 60, "the version's request series")
    time.sleep(12)  # one more export: a repeated request would show by now
    assert served_requests() == 3

    qa = second["generators"]["grounded_qa"]
    assert qa["rejected"]["counts"] == {} and qa["kept"] >= 1, qa  # the answers follow the format
    with open(second["outputs"]["grounded_qa"]) as f:
        kept = [json.loads(line) for line in f]
    assert kept[0]["messages"] == [{"role": "user", "content": QA["pairs"][0]["question"]},
                                   {"role": "assistant", "content": QA["pairs"][0]["answer"]}], kept
    assert all(e["chunk_id"].startswith(str(handbook) + "#") for e in kept)


def test_a_version_tampered_after_registration_is_refused_with_a_409_not_a_5xx(served):
    """Tampering seen at serve time: after a version has been served once, its registered
    artifact and that of a version not yet loaded are changed. The unloaded one is refused
    with 409 model_integrity_error (the request is valid, the version conflicts with its
    registration: no retry helps, so not a 5xx), and so is any fresh load of the served one."""
    from raylab import models

    cfg, store, url = served["cfg"], registry.open_store(served["cfg"]), served["url"]
    meta = {"identity": "serve-test", "base_model": str(served["root"] / "base"), "method": "lora", "metrics": {}}

    def new_version(key: str) -> int:
        run = registry.log_run(store, registry.experiment_id(store, NAME), name=key, key=key, params={}, history=[],
                               artifacts={}, tags={})
        return int(registry.register(store, cfg, run, str(served["adapters"][2]), meta).version)

    loaded, unloaded = new_version("serve-test-tamper-a"), new_version("serve-test-tamper-b")
    status, body = chat(url, f"{NAME}/{loaded}", QUESTIONS[0])
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS[2], body
    weights = {v: Path(store.client.get_model_version(NAME, str(v)).source) / "adapter_model.safetensors"
               for v in (loaded, unloaded)}
    original = weights[unloaded].read_bytes()
    for path in weights.values():
        path.write_bytes(original[:-8] + b"tampered")
    status, body = chat(url, f"{NAME}/{unloaded}", QUESTIONS[0])
    assert status == 409, body
    error = body["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_integrity_error", "model", "invalid_request_error")
    assert f"{NAME}/{unloaded}" in error["message"] and "adapter_model.safetensors (sha256" in error["message"]
    with pytest.raises(registry.IntegrityError, match=rf"{NAME}/{loaded}: .*adapter_model\.safetensors"):
        models.load(f"{NAME}/{loaded}", store=store)  # a fresh load of the version served before
    for path in weights.values():  # the control: restored, the same never-loaded version serves
        path.write_bytes(original)
    status, body = chat(url, f"{NAME}/{unloaded}", QUESTIONS[0])
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWERS[2], body


def test_canary_rolls_back_a_bad_candidate_and_promotes_a_good_one_without_the_cli(served):
    """`raylab deploy REF --canary 30 --for 3s` returns at once; the controller actor decides.
    Version 2 (18 tokens per answer > serve.canary.max_tokens_per_response 16) is rolled back:
    only its sticky share ever saw it and traffic returns to version 1. A new version answering
    like version 1 is promoted after the window, with its controller killed mid-rollout (it
    restarts and resumes). No request fails; both decisions are in the audit log."""
    import ray

    from raylab.core import audit
    from raylab.serve import rollout

    url, dashboard, cfg = served["url"], served["dashboard"], served["cfg"]
    store = registry.open_store(cfg)
    assert get(url, "/healthz", key=None)[1] == {"status": "ok", "model": f"{NAME}/1", "canary": None}
    users = iter(range(10**6))

    def ask(i, mark):  # production traffic (the model's name) from 40 users, in turn
        return plain(url, "/v1/chat/completions", {"model": NAME, "temperature": 0, "user": f"user-{next(users) % 40}",
                                                    "messages": [{"role": "user", "content": QUESTIONS[i % 4]}]})

    def rollout_to(ref: str) -> tuple[Load, dict]:
        with Load(3, ask) as load:
            if ref == f"{NAME}/2":  # the CLI, which exits at once: the controller decides without it
                started = run_cli("deploy", ref, "--canary", "30", "--for", "3s", "--address", dashboard, timeout=300)
                assert started.returncode == 0 and "running" in started.stdout, started.stderr[-3000:]
            else:  # in this process (a CLI start costs seconds); its controller is killed once, mid-rollout
                assert rollout.start_canary(ref, 30, 3, dashboard)["status"] == rollout.RUNNING
                ray.kill(ray.get_actor(rollout.CONTROLLER, namespace=rollout.NAMESPACE), no_restart=False)
            wait_for(lambda: rollout.canary_status()["status"] != rollout.RUNNING, 120, f"the canary's decision on {ref}")
            decided = time.monotonic()
            wait_for(lambda: sum(1 for o in load.outcomes if o.started > decided) >= 4, 60, "traffic after the decision")
        load.check()
        assert not load.failures(), load.failures()[:3]  # none failed, in the canary's share or outside it
        return load, rollout.canary_status()

    load, bad = rollout_to(f"{NAME}/2")
    assert bad["status"] == rollout.ROLLED_BACK and "max_tokens_per_response" in bad["reason"], bad
    assert bad["metrics"][f"{NAME}/2"]["requests"] >= 6 and bad["metrics"][f"{NAME}/2"]["tokens_per_response"] == 18
    assert bad["metrics"][f"{NAME}/1"]["tokens_per_response"] == 15  # the negative control: the baseline held
    decided = bad["decided"] - time.time() + time.monotonic()
    during = [o for o in load.outcomes if o.ended < decided]
    assert {o.text for o in during} == {ANSWERS[1], ANSWERS[2]}  # the share reached the candidate
    after = [o for o in load.outcomes if o.started > decided]  # the switch had completed when it was recorded
    assert after and {o.text for o in after} == {ANSWERS[1]}  # traffic returned to the old version
    assert get(url, "/healthz", key=None)[1] == {"status": "ok", "model": f"{NAME}/1", "canary": None}
    assert int(registry.get_version(store, f"{NAME}@production").version) == 1  # the alias never moved

    run = registry.log_run(store, registry.experiment_id(store, NAME), name="canary", key="serve-test-canary", params={},
                           history=[], artifacts={}, tags={})
    meta = {"identity": "serve-test", "base_model": str(served["root"] / "base"), "method": "lora", "metrics": {}}
    good = int(registry.register(store, cfg, run, str(served["adapters"][1]), meta).version)
    registry.set_tags(store, NAME, good, {"raylab.gates.status": "passed"})
    load, promoted = rollout_to(f"{NAME}/{good}")
    assert promoted["status"] == rollout.PROMOTED and promoted["starts"] == 2, promoted  # resumed after the kill
    assert promoted["elapsed_s"] >= 3 and promoted["metrics"][f"{NAME}/{good}"]["requests"] >= 6
    assert {o.text for o in load.outcomes} == {ANSWERS[1]}
    assert int(registry.get_version(store, f"{NAME}@production").version) == good
    assert get(url, "/healthz", key=None)[1] == {"status": "ok", "model": f"{NAME}/{good}", "canary": None}

    status = run_cli("deploy", "--status", timeout=120)
    assert status.returncode == 0 and "promoted" in status.stdout and f"{NAME}/{good}" in status.stdout, status.stderr
    logged = [(e["kind"], e["version"]) for e in audit.entries(audit.Settings.from_env())
              if e["model"] == NAME and (e["kind"].startswith("serve.canary") or e["kind"] == "registry.promote")]
    assert [k for k in logged if k[0] != "registry.promote"][-4:] == [
        ("serve.canary_start", "2"), ("serve.canary_rollback", "2"),
        ("serve.canary_start", str(good)), ("serve.canary_promote", str(good))], logged
    assert ("registry.promote", str(good)) in logged and ("registry.promote", "2") not in logged
