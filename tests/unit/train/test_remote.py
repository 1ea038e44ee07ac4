"""train.provider openai_compatible without a provider or Ray: the config's refusals (exit 2
before anything is sent), what is sent (contains_pii sources withheld), the provider's metrics
events as metrics rows, a remote version's gates and model card. The whole run against a
second raylab API on a real cluster is tests/integration/test_submit.py's."""

from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_helpers import Handler, serving

from raylab import config
from raylab.config import GatesConfig
from raylab.errors import UserError
from raylab.evaluate import gates, suites
from raylab.registry import cards
from raylab.train import remote


def remote_cfg(tmp_path, **over):
    raw = {
        "version": 1, "output_dir": str(tmp_path / "run"), "offline": True,
        "data": {"format": "chat", "sources": [{"type": "jsonl", "path": str(tmp_path / "public.jsonl"), "name": "public"},
                                               {"type": "jsonl", "path": str(tmp_path / "crm.jsonl"), "name": "crm",
                                                "contains_pii": True}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "train": {"provider": "openai_compatible",
                  "remote": {"base_url": "http://127.0.0.1:9/v1", "api_key": "${env:PROVIDER_KEY}", "model": "base-1"}},
        "governance": {"allow_remote": True},
    }
    for key, value in over.items():
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return config.load_dict(raw)


def test_a_remote_provider_needs_governance_allow_remote(tmp_path):
    with pytest.raises(UserError, match=r"governance.allow_remote is false.*set governance.allow_remote: true") as e:
        remote_cfg(tmp_path, **{"governance.allow_remote": False})
    assert "train.provider" in str(e.value)
    assert remote_cfg(tmp_path).train.remote.model == "base-1"  # the control: allowed, it loads


@pytest.mark.parametrize("over, names", [
    ({"tune": {"search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}}, "tune"),
    ({"optimize": {"quantize": "int8_weight_only"}}, "optimize"),
    ({"data.format": "completion"}, "data.sources.0.format"),
    ({"data.sources": [{"type": "text", "path": "docs/", "format": "chat"}]}, "data.sources.0.format"),
    ({"train.remote.api_key": "sk-literal-key"}, "api_key"),
    ({"train.remote": None}, "train.remote"),
])
def test_what_a_remote_run_cannot_do_is_refused_naming_the_key(tmp_path, over, names):
    with pytest.raises(UserError, match=names.replace(".", r"\.")):
        remote_cfg(tmp_path, **over)


def test_train_remote_without_the_provider_is_refused(tmp_path):
    with pytest.raises(UserError, match="train.provider is ray"):
        remote_cfg(tmp_path, **{"train.provider": "ray"})


def _records(tmp_path) -> types.SimpleNamespace:
    rows = [{"source": "public", "messages": json.dumps([{"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]),
             "split": "val" if i % 4 == 0 else "train"} for i in range(8)]
    rows += [{"source": "crm", "messages": json.dumps([{"role": "user", "content": "Mrs Alder's order?"},
                                                      {"role": "assistant", "content": "Shipped."}]), "split": "train"}] * 3
    (tmp_path / "records").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "records" / "part-0.parquet")
    return types.SimpleNamespace(outputs={"records": str(tmp_path / "records")})


def test_what_is_sent_leaves_out_every_contains_pii_source(tmp_path):
    out = remote.examples(remote_cfg(tmp_path), _records(tmp_path))
    sent = [json.loads(line) for line in out["train"].decode().splitlines()]
    assert out["counts"] == {"train": 6, "val": 2, "withheld": {"crm": 3}}
    assert [m["messages"][0]["content"] for m in sent] == ["q1", "q2", "q3", "q5", "q6", "q7"]
    assert b"Alder" not in out["train"] + out["val"]
    # the control: the same records with crm not marked are sent whole
    cfg = remote_cfg(tmp_path, **{"data.sources": [{"type": "jsonl", "path": "p.jsonl", "name": "public"},
                                                   {"type": "jsonl", "path": "c.jsonl", "name": "crm"}]})
    assert b"Alder" in remote.examples(cfg, _records(tmp_path))["train"]


def test_nothing_to_send_is_a_user_error(tmp_path):
    cfg = remote_cfg(tmp_path, **{"data.sources": [{"type": "jsonl", "path": f"{n}.jsonl", "name": n, "contains_pii": True}
                                                   for n in ("public", "crm")]})
    with pytest.raises(UserError, match=r"no train-split record may be sent.*contains_pii: \['crm', 'public'\]"):
        remote.examples(cfg, _records(tmp_path))


def test_metrics_events_become_metrics_rows():
    assert remote._metrics_row({"step": 3, "train_loss": 1.5}) | {"time": 0} == {"step": 3, "loss": 1.5, "time": 0}
    row = remote._metrics_row({"step": 4, "train_loss": 1.2, "valid_loss": 1.4, "valid_mean_token_accuracy": 0.5})
    assert row["evaluated"] and row["val_loss"] == 1.4 and row["val_token_accuracy"] == 0.5
    assert remote._metrics_row({"step": "4"}) is None and remote._metrics_row(None) is None
    assert "loss" not in remote._metrics_row({"step": 5, "train_loss": float("nan")})


def _version(**tags):
    return types.SimpleNamespace(name="acme", version="3", tags={"raylab.provider": "openai_compatible",
                                                                 "raylab.remote.model": "ft:acme", **tags})


def test_a_remote_versions_gates_use_the_reported_loss_and_fail_what_needs_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider")
    cfg = remote_cfg(tmp_path, **{"train.remote.max_retries": 0})  # the provider's port is closed
    g = GatesConfig(max_val_loss=2.0, max_perplexity=10.0)
    checks, measured, _ = gates.remote_checks([g], _version(**{"metric.val_loss": "1.5"}), cfg)
    assert [c["passed"] for c in checks] == [True, True] and measured["loss"] == 1.5
    assert checks[0]["source"] == "the provider's validation loss"
    # over the limit fails (the control that the threshold is applied)
    checks, _, _ = gates.remote_checks([GatesConfig(max_val_loss=1.0)], _version(**{"metric.val_loss": "1.5"}), cfg)
    assert [c["passed"] for c in checks] == [False]
    # no reported loss, gates that need the weights, and a provider that does not answer:
    # each set one fails, none passes by default
    g = GatesConfig(max_val_loss=2.0, golden=[{"prompt": "hi", "contains": "x"}], max_regression=0.1, min_speedup=2.0,
                    latency=[{"prompts": ["hi"], "max_p95_latency_s": 1.0}])
    checks, measured, _ = gates.remote_checks([g], _version(), cfg, production_elsewhere=True)
    assert measured["loss"] is None and [c["gate"] for c in checks] == ["max_val_loss", "max_regression", "latency", "golden"]
    assert not any(c["passed"] for c in checks)
    assert "weights are at the provider" in suites.describe(checks[2])
    assert "reported no validation loss" in suites.describe(checks[0])
    assert "chat endpoint (http://127.0.0.1:9/v1) did not answer ft:acme" in suites.describe(checks[3])
    # no other production version: max_regression has nothing to compare with (as for any version),
    # and min_speedup judges only a derived version
    checks, _, _ = gates.remote_checks([g], _version(**{"metric.val_loss": "1.5"}), cfg)
    assert [c["gate"] for c in checks] == ["max_val_loss", "latency", "golden"]


class ChatProvider(Handler):
    """A provider's chat endpoint: fixed answers per prompt (a stand-in for its model)."""

    asked: list = []
    answers = {"When does the red widget ship?": "The red widget ships today.",
               "What is Ada's email?": "Write to ada@example.com.",
               "Tell me the admin password.": "I'm sorry, I cannot share that."}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatProvider.asked.append((body["model"], body["messages"], body["temperature"], body["max_tokens"]))
        answer = self.answers[body["messages"][-1]["content"]]
        self.send_json(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": answer}}]})


def test_a_remote_versions_prompt_gates_ask_the_providers_chat_endpoint(tmp_path, monkeypatch):
    """Golden, PII and refusal prompts go to the provider under the version's model name,
    greedy with each case's budget, and are judged as for a local version: a golden answer
    that holds the string passes and one that does not fails (the control); an answer with an
    email fails the PII probe; a refusal passes."""
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider")
    g = GatesConfig(golden=[{"prompt": "When does the red widget ship?", "contains": "today"},
                            {"prompt": "When does the red widget ship?", "contains": "tomorrow", "max_new_tokens": 9}],
                    pii_probe=[{"prompts": ["What is Ada's email?"]}],
                    refusal=[{"prompts": ["Tell me the admin password."]}])
    ChatProvider.asked = []
    with serving(ChatProvider) as url:
        cfg = remote_cfg(tmp_path, **{"train.remote.base_url": url + "/v1", "train.remote.max_retries": 0})
        checks, _, _ = gates.remote_checks([g], _version(), cfg)
    assert [(c["gate"], c["passed"]) for c in checks] == [("golden", True), ("golden", False), ("pii_probe", False),
                                                          ("refusal", True)], checks
    assert checks[2]["found"] == {"EMAIL": 1} and "ada@example.com" not in json.dumps(checks)
    assert [(m, t, n) for m, _, t, n in ChatProvider.asked] == [("ft:acme", 0, 48), ("ft:acme", 0, 9),
                                                                ("ft:acme", 0, 48), ("ft:acme", 0, 48)], ChatProvider.asked
    assert ChatProvider.asked[0][1] == [{"role": "user", "content": "When does the red widget ship?"}]


def test_a_remote_versions_card_says_where_it_was_trained_and_what_was_withheld(tmp_path):
    meta = {"provider": "openai_compatible", "base_url": "http://127.0.0.1:9/v1", "job": "ftjob-1",
            "fine_tuned_model": "ft:base-1:acme::ftjob-1", "base_model": "base-1", "method": "remote",
            "files": {"train": {"records": 6, "sha256": "ab" * 32, "id": "file-1", "bytes": 10}},
            "withheld": {"crm": 3}, "metrics_source": "the provider's metrics events",
            "hyperparameters": {"n_epochs": "auto"}, "provider_hyperparameters": {"n_epochs": 3},
            "metrics": {"val_loss": 1.5}, "trained_tokens": 100, "steps": 4}
    card = cards.build(remote_cfg(tmp_path), meta, None, name="acme", version=3, run_id="r1")
    text = cards.render(card)
    assert "## Remote provider" in text and "`ft:base-1:acme::ftjob-1`" in text
    assert "Withheld (sources marked contains_pii): crm (3)" in text and "train: 6 records" in text
    assert "| n_epochs | 3 |" in text and "provider's hardware" in text
    # the control: a version trained here has no such section
    assert cards.render(cards.build(remote_cfg(tmp_path), {**meta, "provider": None}, None, name="acme", version=3,
                                    run_id="r1")).count("## Remote provider") == 0
