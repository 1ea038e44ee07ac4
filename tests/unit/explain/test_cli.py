"""`raylab explain` through the CLI on a version registered in a throwaway MLflow store (no
Ray): the JSON result's shapes, the HTML view written with its text escaped, and every bad
input exiting 2 with a line that names the flag or key to fix."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from raylab import models
from raylab.cli import main
from registry_helpers import open_test_store
from registry_helpers import register as register_version

pytest.importorskip("captum")


def config_file(tmp_path) -> str:
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"}, "registry": {"model_name": "widgets"},
        "explain": {"max_target_tokens": 4, "n_steps": 8}}))
    return str(path)


def json_out(out: str) -> dict:
    return json.loads(out[out.index("{"):])  # progress lines may come first


def test_explain_a_registered_version_through_the_cli(tmp_path, monkeypatch, capsys):
    store = open_test_store(tmp_path, monkeypatch)
    final = tmp_path / "final"
    tok = models.build_byte_tokenizer()
    tok.save_pretrained(final)
    models.build_tiny_model("tiny-llama", tok, seed=7).save_pretrained(final)
    register_version(store, tmp_path, 1, final=final)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    cfg = config_file(tmp_path)
    page = tmp_path / "why.html"

    # the model's own greedy answer, explained by integrated gradients
    assert main(["explain", cfg, "--model", "widgets/1", "--prompt", "a <b> & c", "--json", "--html", str(page)]) == 0
    got = json_out(capsys.readouterr().out)
    prompt = models.prompt_ids(tok, {"prompt": "a <b> & c"})
    assert got["input_ids"] == prompt and got["target_source"] == "greedy answer" and got["model"] == "widgets/1"
    assert 1 <= len(got["output_ids"]) <= 4  # explain.max_target_tokens bounds the greedy answer
    assert len(got["attributions"]) == len(got["output_tokens"]) == len(got["convergence_deltas"])
    assert all(len(row) == len(prompt) for row in got["attributions"])
    assert got["input_totals"] == pytest.approx([sum(c) for c in zip(*got["attributions"], strict=True)])
    assert got["parameters"]["n_steps"] == 8 and got["seconds"] > 0
    text = page.read_text()
    assert "<b>" not in text and "&lt;" in text and "&amp;" in text  # escaped, never raw
    assert text.count('class="t"') == len(prompt) * (1 + len(got["output_tokens"]))

    # a given target, a perturbation method, the readable summary
    assert main(["explain", cfg, "--model", "widgets/1", "--prompt", "hello", "--target", "ok",
                 "--method", "feature_ablation"]) == 0
    out = capsys.readouterr().out
    assert "feature_ablation" in out and "target (given): 'ok'" in out and out.count(" <- ") == 3  # 2 tokens + totals

    # per sentence, and given spans of a chat's last message (character offsets into it)
    assert main(["explain", cfg, "--model", "widgets/1", "--prompt", "Hi there. Bye.", "--target", "ok",
                 "--method", "feature_ablation", "--granularity", "sentence", "--json"]) == 0
    got = json_out(capsys.readouterr().out)
    assert [s["text"] for s in got["input_spans"]] == ["Hi there.", "Bye."] and len(got["attributions"][0]) == 2
    messages = json.dumps([{"role": "user", "content": "Hi there. Bye."}])
    assert main(["explain", cfg, "--model", "widgets/1", "--messages", messages, "--target", "ok",
                 "--method", "shapley_sampling", "--samples", "2", "--spans", "[[3, 8]]"]) == 0
    assert "<- there@0 " in capsys.readouterr().out  # the summary names the span by its text

    # bad input: exit 2, one line naming what to fix
    def refused(*argv) -> str:
        assert main(["explain", cfg, "--model", "widgets/1", *argv]) == 2
        return capsys.readouterr().err

    assert "--prompt: empty" in refused("--prompt", "  ")
    assert "explain.max_target_tokens: --target is 6 tokens" in refused("--prompt", "hi", "--target", "sixsix")
    assert "explain.max_prompt_tokens: the prompt is" in refused("--prompt", "hi", "explain.max_prompt_tokens=5")
    assert "--method 'lime': unknown" in refused("--prompt", "hi", "--method", "lime")
    assert "--messages: not JSON" in refused("--messages", "[{")
    assert "--spans: not JSON" in refused("--prompt", "hi", "--method", "feature_ablation", "--spans", "[[0,")
    assert "--spans[0]: [0, 9] is not a non-empty range" in refused("--prompt", "hi", "--method", "feature_ablation",
                                                                    "--spans", "[[0, 9]]")
    assert "--spans/--granularity: method integrated_gradients attributes to tokens only" in refused(
        "--prompt", "hi. yo.", "--granularity", "sentence")
    assert "explain.colour" in refused("--prompt", "hi", "explain.colour=red")  # the section forbids unknown keys
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if the extra were not installed
    assert "pip install 'raylab[explain]'" in refused("--prompt", "hi")
    monkeypatch.setitem(sys.modules, "shap", None)
    assert "method shap needs the shap package" in refused("--prompt", "hi", "--method", "shap")
