"""What the endpoint records for monitoring: the served-prompt sample (bounded, redacted by
the data stage's PII detectors before it is kept, written through core/storage), the
engine's per-step observer behind the batch-size and queue-depth metrics, and the Grafana
dashboard in cluster/monitoring/, whose every PromQL series is one raylab exports. The
Prometheus endpoint itself is checked on a real Serve in tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from conftest import REPO
from raylab import config, models
from raylab.core import runs
from raylab.serve import deploy
from raylab.serve.engine import Request, Sampling, TransformersEngine
from raylab.serve.metrics import METRICS, PREFIX, exported_names, version_tags
from raylab.serve.sample import PromptSample, prompt_text

DASHBOARD = REPO / "cluster" / "monitoring" / "grafana-dashboard.json"
EMAIL = "jane.doe@example.com"
PII = {"types": None, "engine": "builtin", "regions": ["US"]}


def lines(location: str) -> list[str]:
    with open(location, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f]


def test_a_planted_email_never_reaches_the_stored_sample(tmp_path):
    prompt = f"Hi, please send my payslip to {EMAIL} before Friday."
    redacted = PromptSample({"output_dir": str(tmp_path), "sample_prompts": 10, "flush_every": 1, "pii": PII}, "r1")
    assert redacted.add(prompt)  # kept, and a flush is due (flush_every: 1)
    stored = lines(redacted.flush())
    assert stored == ["Hi, please send my payslip to <EMAIL> before Friday."]
    assert EMAIL not in "".join(redacted.kept)  # not even in memory
    # the negative control: with data.pii off the same writer stores the address as sent
    plain = PromptSample({"output_dir": str(tmp_path), "sample_prompts": 10, "flush_every": 1, "pii": None}, "r2")
    plain.add(prompt)
    assert EMAIL in lines(plain.flush())[0]
    assert plain.location == runs.Run(str(tmp_path)).served_prompts_file("r2")


def test_the_sample_is_a_bounded_uniform_reservoir_written_every_flush_every(tmp_path):
    sample = PromptSample({"output_dir": str(tmp_path), "sample_prompts": 20, "flush_every": 5, "pii": None}, "r", seed=3)
    due = [sample.add(f"prompt {i}") for i in range(500)]
    assert due[:5] == [False] * 4 + [True] and sample.seen == 500
    kept = lines(sample.flush())
    assert len(kept) == 20 and len(set(kept)) == 20
    assert max(int(p.split()[1]) for p in kept) >= 100  # later prompts replace early ones, not only the first 20
    assert sample.flush() is None  # nothing new since
    assert not sample.add("   ")  # an empty prompt is not a sample
    off = PromptSample({"output_dir": str(tmp_path), "sample_prompts": 0, "flush_every": 1, "pii": None}, "z")
    assert not off.add("a prompt") and off.flush() is None


def test_the_sampled_text_is_what_the_user_wrote():
    chat = {"chat": True, "prompts": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hours?"}]]}
    assert prompt_text(chat) == "Hi\nHours?"
    assert prompt_text({"chat": False, "prompts": ["one", "two"]}) == "one\ntwo"


def test_monitor_args_carry_the_data_stages_detectors_and_an_absolute_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load_dict({"version": 1, "output_dir": "runs/x", "data": {"sources": [{"type": "jsonl", "path": "d.jsonl"}],
                                                                         "pii": {"types": ["EMAIL"]}},
                            "model": {"name_or_path": "tiny-llama"}})
    args = deploy.monitor_args(cfg)
    assert args["output_dir"] == str(tmp_path / "runs" / "x") and args["pii"]["types"] == ["EMAIL"]
    assert args["sample_prompts"] == cfg.serve.monitor.sample_prompts
    assert deploy.monitor_args(cfg.model_copy(update={"serve": config.ServeConfig(monitor={"sample_prompts": 0})})) is None
    assert deploy.monitor_args(None) is None


def test_version_tags():
    assert version_tags("acme-assistant/12") == {"model": "acme-assistant", "version": "12"}
    assert version_tags("/models/plain") == {"model": "/models/plain", "version": ""}
    assert version_tags(None, "asked-for") == {"model": "asked-for", "version": ""}


def test_the_engine_reports_each_steps_rows_and_queue_to_its_observer():
    tok = models.build_byte_tokenizer()
    model = models.build_tiny_model("tiny-llama", tok, seed=1).eval()
    seen: list[tuple[list, list]] = []
    engine = TransformersEngine(model, tok, max_batch_size=2, stop_ids=set(),
                                observer=lambda running, waiting: seen.append((running, waiting)))

    async def main():
        async def one(i):
            return [o async for o in engine.submit(Request(f"r{i}", tok("hello")["input_ids"],
                                                           Sampling(max_tokens=4, temperature=0, ignore_eos=True)))]
        await asyncio.gather(*(one(i) for i in range(3)))

    asyncio.run(main())
    assert max(len(r) for r, _ in seen) == 2  # max_batch_size rows decoding together
    assert any(len(w) == 1 for _, w in seen)  # the third request queued meanwhile
    assert seen[-1] == ([], [])  # idle at the end: the gauges go back to 0
    assert all(a is None for r, w in seen for a in r + w)  # no adapters: the model's own rows


def promql_series(dashboard: dict) -> list[str]:
    """Every `ray_...` series name in the dashboard's queries (panels' targets, template variables)."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    assert exprs and all(re.search(r"\bray_\w+", e) for e in exprs), "a query names no raylab series"
    return [name for e in exprs for name in re.findall(r"\bray_\w+", e)]


def unknown_series(dashboard: dict) -> set[str]:
    return set(promql_series(dashboard)) - exported_names()


def test_the_dashboard_queries_only_series_raylab_exports_and_charts_every_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    assert unknown_series(dashboard) == set()
    charted = {re.sub(r"_(total|bucket|sum|count)$", "", n).removeprefix("ray_" + PREFIX) for n in promql_series(dashboard)}
    assert charted == set(METRICS)
    # the negative control: a misspelt series (and one of Serve's own) is caught
    broken = json.loads(DASHBOARD.read_text())
    broken["panels"][0]["targets"][0]["expr"] = "sum(rate(ray_raylab_serve_request_total[5m]))"
    broken["panels"][1]["targets"][0]["expr"] = "sum(rate(ray_serve_num_http_requests_total[5m]))"
    assert unknown_series(broken) == {"ray_raylab_serve_request_total", "ray_serve_num_http_requests_total"}


@pytest.mark.parametrize("kind", ["counter", "histogram", "gauge"])
def test_exported_names_follow_rays_prometheus_naming(kind):
    name = next(n for n, spec in METRICS.items() if spec[0] == kind)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[kind]
    assert {f"ray_{PREFIX}{name}{s}" for s in suffixes} <= exported_names()
