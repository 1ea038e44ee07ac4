"""`raylab serve --model DIR`: a plain Hugging Face directory (no registry entry) behind the
real Serve app on the session's Ray. The registry is made unreachable on purpose (a tracking
URI nothing answers), so any registry use would fail the deploy or the requests. Served greedy
text equals offline greedy generation; the model (a tiny Qwen 3: issue 22's family through
serve) is listed and routed by its directory name.
Runs after test_serve.py's endpoint is gone (its module fixture deletes the app)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from families import build

from conftest import free_port
from raylab import config, models
from raylab.serve import deploy

pytestmark = pytest.mark.integration


def build_model(path: Path) -> None:
    """A tiny Qwen 3 (tests/families.py: another family than the Llama the registry tests serve,
    with its query/key norms, so the engine is shown serving more than one architecture) whose
    embeddings are scaled up (confident logits, greedy text far from ties)."""
    import torch

    tok = models.build_byte_tokenizer()
    lm = build("qwen3", tok, seed=7)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(10)
    tok.save_pretrained(path)
    lm.save_pretrained(path)


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_plain_model_directory_is_served_without_a_registry(tmp_path, _session_ray):
    base = tmp_path / "acme-base"
    build_model(base)
    cfg = config.load_dict({
        "version": 1, "output_dir": str(tmp_path / "run"), "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "unused.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "registry": {"tracking_uri": f"http://127.0.0.1:{free_port()}"},  # nothing answers there
        "serve": {"port": free_port(), "cpus_per_replica": 0.5, "max_batch_size": 2, "batch_wait_timeout_s": 0.01,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    stop = threading.Event()
    thread = threading.Thread(target=deploy.run_serve, args=(cfg, str(base)), kwargs={"stop": stop}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{cfg.serve.port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive() and not deploy._endpoint_file().exists():
        time.sleep(0.5)
    assert thread.is_alive() and deploy._endpoint_file().exists(), "raylab serve --model DIR did not come up"
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=60) as r:
            listed = json.loads(r.read())["data"]
        assert [m["id"] for m in listed] == ["acme-base"] and listed[0]["root"] == str(base)
        prompt = "Ticket 7: the red widget"
        status, body = post(url, "/v1/completions", {"model": "acme-base", "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0})
        assert status == 200, body
        model, tok = models.load_inference(str(base))
        offline = models.greedy(model, tok, [models.prompt_ids(tok, {"text": prompt})], 12)[0]
        assert body["choices"][0]["text"].strip() == offline and offline, (body, offline)
        status, body = post(url, "/v1/chat/completions", {"model": "acme-base", "temperature": 0, "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["model"] == "acme-base", body
        status, body = post(url, "/v1/completions", {"model": "acme-base/1", "prompt": "x"})
        assert status == 404 and body["error"]["code"] == "model_not_found", body
    finally:
        stop.set()
        thread.join(120)
        from ray import serve

        serve.shutdown()
