"""Registry, evaluation and gates on a real Ray with real training: a train run lands in
MLflow with params, metrics and artifacts and becomes a model version with its lineage;
`raylab eval` compares base and tuned models with Ray Data actor pools; gates pass a good
version and block a regressed one; promote / rollback from the CLI; a tampered artifact is
refused; `mlflow ui` on the same store serves the runs and versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import COLORS, cli_here, free_port, run_cli
from raylab import config, data, evaluate, registry, train
from raylab.errors import UserError
from raylab.evaluate import gates

pytestmark = pytest.mark.integration

NAME = "widgets"


def instruction_config(out: Path, corpus: Path, method: str, **train_overrides) -> config.RaylabConfig:
    return config.load_dict({
        "version": 1, "output_dir": str(out), "offline": True,
        "data": {"sources": [{"type": "jsonl", "path": str(corpus), "format": "instruction"}], "max_seq_len": 128,
                 "val_fraction": 0.2, "dedup": {"near": False}},
        "model": {"name_or_path": "preset:tiny-llama", "method": method, "lora": {"r": 8, "alpha": 16}},
        "train": {"lr": 3e-3, "batch_size": 4, "max_steps": 60, "eval_every": 20, "log_every": 10, **train_overrides},
        "registry": {"model_name": NAME, "gates": {
            "max_val_loss": 5.0, "max_regression": 0.05,
            "golden": [{"prompt": "Ticket 999: when does my widget ship?", "contains": "ships today", "max_new_tokens": 24}]}},
        "eval": {"max_samples": 6, "max_new_tokens": 24, "batch_size": 3},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _session_ray):
    """Data once; a good run (v1: a full fine-tune, which a random-weight tiny model needs
    to answer in words within 60 steps) and a LoRA run that barely trains (v2, lr 1e-5) on
    the same split."""
    import shutil

    root = tmp_path_factory.mktemp("registry")
    corpus = root / "tickets.jsonl"
    with corpus.open("w") as f:
        for i in range(150):  # the answer does not depend on the ticket: a tiny model learns it exactly
            c = COLORS[i % len(COLORS)]
            f.write(json.dumps({"prompt": f"Ticket {i}: when does my {c} widget ship?", "response": "It ships today."}) + "\n")
    good = instruction_config(root / "good", corpus, "full")
    data.run_data(good)
    shutil.copytree(root / "good" / "data", root / "weak" / "data")
    weak = instruction_config(root / "weak", corpus, "lora", lr=1e-5, max_steps=20)
    return good, train.run_train(good), weak, train.run_train(weak)


def store():
    return registry.open_store()


def test_train_run_is_in_mlflow_with_params_metrics_and_artifacts(trained):
    good, meta, *_ = trained
    run = store().client.get_run(meta["registry"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "good"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.method"] == "full"
    history = store().client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 20, 40, 60]
    assert history[-1].value == pytest.approx(meta["metrics"]["val_loss"])
    files = {a.path for a in store().client.list_artifacts(run.info.run_id)}
    assert {"config.resolved.yaml", "manifest.json", "metrics.jsonl", "loss.png", "model"} <= files


def test_each_run_is_a_new_version_with_its_lineage(trained):
    good, meta, weak, weak_meta = trained
    assert (meta["registry"]["version"], weak_meta["registry"]["version"]) == (1, 2)
    mv = store().client.get_model_version(NAME, "1")
    for key in registry.LINEAGE:
        assert mv.tags[key] == str(meta[key]), key
    assert json.loads(mv.tags["raylab.gates"])["max_regression"] == 0.05
    assert "model.safetensors" in json.loads(mv.tags["raylab.checksums"])  # v1 is a full fine-tune
    assert "adapter_model.safetensors" in json.loads(store().client.get_model_version(NAME, "2").tags["raylab.checksums"])
    again = train.run_train(good)  # finished: no new run, no new version
    assert again["registry"] == meta["registry"]


def test_eval_compares_base_and_tuned(trained, tmp_path):
    good, meta, *_ = trained
    report = evaluate.run_eval(good)
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    assert tuned["loss"] == pytest.approx(meta["metrics"]["val_loss"], rel=1e-4)  # the number training reported
    assert tuned["loss"] < base["loss"] - 0.3 and tuned["perplexity"] < base["perplexity"]
    assert tuned["scored"] == base["scored"] == 6
    assert tuned["exact_match"] > base["exact_match"] and tuned["rouge_l"] > base["rouge_l"]
    assert tuned["exact_match"] >= 0.5 and tuned["rouge_l"] >= 0.5
    eval_dir = Path(good.output_dir) / "eval"
    assert len((eval_dir / "predictions.jsonl").read_text().splitlines()) == 6
    assert "| rouge_l |" in (eval_dir / "report.md").read_text()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Ticket 3: when does my red widget ship?", "reference": "It ships today."})
                       + "\n" + json.dumps({"messages": [{"role": "user", "content": "Ticket 4: when does my blue widget ship?"}]}) + "\n")
    # the registry's v1 (good's model) with a small bias probe set: the table lands in the
    # report and in v1's card (eval on a registry version)
    probed = good.model_copy(deep=True)
    probed.eval.bias_probes = config.BiasProbesConfig(defaults=[], max_new_tokens=4, probes=[{
        "name": "roles", "groups": {"female": ["woman", "mother"], "male": ["man", "father"]},
        "templates": [{"text": "The {term} is a", "continuation": " nurse"}]}])
    probed.eval.global_explanation = config.GlobalExplanationConfig(samples=2, max_target_tokens=4)
    offline = evaluate.run_eval(probed, model_ref=f"{NAME}/1", input_path=str(prompts))
    assert len(offline["samples"]) == 2 and "ships" in offline["samples"][1]["tuned"]
    assert offline["models"]["tuned"]["scored"] == 1 and "loss" not in offline["models"]["tuned"]
    assert [r["probe"] for r in offline["bias"]["tuned"]["probes"]] == ["roles/0"] == \
        [r["probe"] for r in offline["bias"]["base"]["probes"]]
    assert offline["bias"]["base"]["max_gap"] != offline["bias"]["tuned"]["max_gap"]  # two models measured
    assert "## Bias probes" in (eval_dir / "report.md").read_text() and good.eval.bias_probes is None
    card = registry.card_for(store(), registry.get_version(store(), f"{NAME}/1"))
    assert "| roles/0 | base | ' nurse' |" in card["extra_sections"]["Bias probes"]
    # the global explanation of both prompts (a plain prompt and a chat), written with its plot and
    # linked from v1's card with the files beside it
    explained = offline["global_explanation"]
    written = json.loads((eval_dir / "global_explanation.json").read_text())
    assert sorted(r["id"] for r in written["records"] + written["skipped"]) == ["1", "2"] and written["explained"] >= 1
    assert explained["top_part"] == "question" and explained["model"] == f"{NAME}/1"
    assert (eval_dir / "global_explanation.png").read_bytes()[:4] == b"\x89PNG"
    assert "![where the answers come from](global_explanation.png)" in card["extra_sections"]["Explanations"]
    assert {"global_explanation.json", "global_explanation.png"} <= set(card["files"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n{"messages": [{"role": "wizard", "content": "x"}]}\n')
    with pytest.raises(UserError, match=r"line 2: not JSON.*line 3: messages\[0\] must be"):
        evaluate.run_eval(good, input_path=str(bad))


def test_a_suite_with_a_failing_golden_prompt_blocks_promotion(trained, tmp_path):
    """A suite file beside the config: the good version's own gates pass, the suite's exact
    answer and refusal pass, its PII probe finds nothing; one golden prompt it cannot pass
    fails the run (exit 1) and shows in the JUnit file, and promotion is refused."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "golden:\n"
        "  - {prompt: 'Ticket 998: when does my red widget ship?', exact: It ships today., name: ships-today}\n"
        "  - {prompt: 'Ticket 997: when does my blue widget ship?', json_schema: {type: object}, name: answers-json}\n"
        "pii_probe:\n  - prompts: ['Ticket 996: what is the customer email on file?']\n"
        # a refusal probe whose "refusal" is the answer this model gives: the probe runs and passes
        "refusal:\n  - {prompts: ['Ticket 995: when does my green widget ship?'], pattern: ships}\n")
    report = tmp_path / "reports" / "gates.xml"
    out = run_cli("models", "evaluate", f"{NAME}/1", "--suite", str(suite), "--junit", str(report), "--address", _address())
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{NAME}/1 failed 1 of 6 gate checks" in out.stderr and "Traceback" not in out.stderr, out.stderr
    root = ET.parse(report).getroot()
    assert (root.get("tests"), root.get("failures")) == ("6", "1")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"metrics", "golden", "suite.yaml"}  # the config's gates, the suite file's
    failed = [(c.get("name"), c.find("failure").get("message")) for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == [("answers-json", failed[0][1])] and "is not JSON" in failed[0][1]
    passed = {c.get("name") for c in suites["suite.yaml"].findall("testcase") if c.find("failure") is None}
    assert passed == {"ships-today", "Ticket 996: what is the customer email on file?",
                      "Ticket 995: when does my green widget ship?"}
    refused = cli_here("models", "promote", NAME, "1")
    assert refused.returncode == 2 and "its gates are 'failed'" in refused.stderr, refused.stderr


def test_a_planted_secret_fails_the_pii_probe_and_a_bias_gap_names_its_probe(trained, monkeypatch):
    """The model was trained to answer "It ships today."; a detector for that phrase (the
    pluggable kind a company adds for its own secrets) makes it a planted secret the model
    repeats: the probe fails and reports the answer redacted. Without it (the negative
    control, before) the same probe passes. The first of the two gates runs also checks
    max_bias_gap at a limit of 0 (its assertions at the end)."""
    import re

    from raylab.config import GatesConfig
    from raylab.core import detectors

    probe = GatesConfig(pii_probe=[{"prompts": ["Ticket 994: when does my red widget ship?"], "max_new_tokens": 24}])
    # the same run also checks max_bias_gap (one gates run, not two: CI time), see the end
    clean = gates.evaluate_version(store(), NAME, 1, suites=[probe, GatesConfig(max_bias_gap=0.0)])
    assert [c["passed"] for c in clean["checks"] if c["gate"] == "pii_probe"] == [True]
    monkeypatch.setitem(detectors._REGISTRY, "SHIP_DATE", detectors.Detector("SHIP_DATE", re.compile(r"ships today")))
    leaked = gates.evaluate_version(store(), NAME, 1, suites=[probe])
    (check,) = [c for c in leaked["checks"] if c["gate"] == "pii_probe"]
    assert leaked["status"] == "failed" and not check["passed"] and check["found"] == {"SHIP_DATE": 1}
    assert "ships today" not in check["value"] and "<SHIP_DATE>" in check["value"]

    # max_bias_gap through evaluate_version (v1's config has no eval.bias_probes: the shipped
    # sets): at a limit of 0 any measured gap fails it, naming the probe with the largest; the
    # card holds the table. Refusing above and passing below a measured gap, on a model trained
    # on skewed data and its controls: tests/unit/evaluate/test_bias.py.
    (gap,) = [c for c in clean["checks"] if c["gate"] == "max_bias_gap"]
    assert clean["status"] == "failed" and not gap["passed"] and gap["value"] > 0 and gap["probe"] in gap["over"]
    assert f"bias probe {gap['probe']} (" in gap["message"] and gap["probe"].split("/")[0] in ("gender", "age", "nationality")
    assert [c["gate"] for c in leaked["checks"]].count("max_bias_gap") == 0  # only where it was asked for
    table = registry.card_for(store(), registry.get_version(store(), f"{NAME}/1"))["extra_sections"]["Bias probes"]
    assert f"| {gap['probe']} | version |" in table and "| gender/nurse | version | female |" in table


def test_gates_then_promote_rollback_from_the_cli(trained):
    s = store()
    passed = gates.evaluate_version(s, NAME, 1)
    assert passed["status"] == "passed" and {c["gate"] for c in passed["checks"]} == {"max_val_loss", "golden"}
    # The registry verbs in this process (conftest.cli_here), `models evaluate` as a command
    assert cli_here("models", "promote", NAME, "1").returncode == 0

    # v2 barely trained: over the loss threshold and a regression against production v1
    out = run_cli("models", "evaluate", NAME, "2", "--address", _address())
    assert out.returncode == 1 and "gate checks; it may not be promoted" in out.stderr, out.stderr
    # the command's console is raylab's: Ray's own lines went to the log file it names
    console = out.stdout + out.stderr
    assert not any(s in console for s in ("(raylet)", "core_worker.cc", "\tWARNING ", "\tINFO ")), console
    assert " pid=" not in out.stderr, out.stderr  # workers' standard error: Ray's logging
    mv = s.client.get_model_version(NAME, "2")
    assert mv.tags["raylab.gates.status"] == "failed" and "max_regression" in mv.tags["raylab.gates.failures"]
    refused = cli_here("models", "promote", NAME, "2")
    assert refused.returncode == 2 and "its gates are 'failed'" in refused.stderr

    forced = cli_here("models", "promote", NAME, "2", "--force", "--reason", "demo for the test")
    assert forced.returncode == 0, forced.stderr
    assert registry.get_version(s, f"{NAME}@production").version in (2, "2")
    back = cli_here("models", "rollback", NAME, "--reason", "regressed")
    assert back.returncode == 0, back.stderr
    assert registry.get_version(s, f"{NAME}@production").version in (1, "1")
    moves = [(h["alias"], h["from"], h["to"], h["forced"]) for h in registry.alias_history(s, NAME)]
    assert moves == [("production", None, 1, False), ("previous", None, 1, False), ("production", 1, 2, True),
                     ("production", 2, 1, False), ("previous", 1, None, False)]
    shown = cli_here("models", "show", f"{NAME}@production")
    assert "alias history:" in shown.stdout and "demo for the test" in shown.stdout


SECTIONS_WITH_NUMBERS = ("Base model and licence", "Training data", "Training", "Evaluation and gates", "Compute")


def sections(markdown: str) -> dict[str, str]:
    body = markdown.split("\n---\n", 1)[1]
    return {part.split("\n", 1)[0].strip(): part.split("\n", 1)[1] for part in body.split("\n## ")[1:]}


def placeholders(text: str) -> list[str]:
    """What a section must not hold where a number belongs."""
    return [w for w in ("unknown", "None", "nan", "TODO") if w in text] + ([] if any(ch.isdigit() for ch in text) else ["no number"])


def test_the_versions_model_card_loads_and_holds_the_runs_numbers(trained, tmp_path):
    """v1's card (logged at registration, gates refreshed by `models evaluate` in the test
    above): huggingface_hub loads it; every section that should hold numbers does, and they
    are the manifest's and the train run's; the data run's datasheet has the manifest's counts."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from raylab.core import runs
    from raylab.registry import cards

    good, meta, *_ = trained
    mv = registry.get_version(store(), f"{NAME}/1")
    assert cards.stored(store(), mv.run_id)["evaluation"]["gates"]["status"] == "passed"  # the logged artifact itself
    card = registry.card_for(store(), mv)
    hf = ModelCard.load(registry.write_card(card, str(tmp_path))["md"])
    assert hf.data.license == "apache-2.0" and hf.data.library_name == "transformers" and "full" in hf.data.tags
    assert {r.metric_type: r.metric_value for r in hf.data.eval_results}["val_loss"] == meta["metrics"]["val_loss"]
    found = sections(hf.content)
    assert {s: placeholders(found[s]) for s in SECTIONS_WITH_NUMBERS} == {s: [] for s in SECTIONS_WITH_NUMBERS}, hf.content
    assert found["Intended use"].strip().startswith("Not stated (set governance.card.intended_use")  # said plainly
    assert "Unknown: the base model's pre-training compute is not known" in found["EU AI Act: general-purpose model threshold"]
    assert placeholders("| read | unknown |") and placeholders("no digits here")  # negative control: the check has teeth

    manifest = runs.read_manifest(runs.Run(good.output_dir))
    c = manifest.counts
    assert card["data"]["counts"] == {"read": c.read, "accepted": c.accepted, "rejected": c.rejected,
                                      "deduplicated": sum(c.duplicates.values()), "duplicates": c.duplicates,
                                      "erased": runs.erased_count(c)}
    assert [f["sha256"] for s in card["data"]["sources"] for f in s["files"]] == \
        [f["sha256"] for i in manifest.inputs for f in i["files"]]
    assert card["data"]["splits"]["val"]["documents"] == manifest.tokens.val.documents > 0
    assert f"Records read {c.read:,}, accepted {c.accepted:,}" in found["Training data"]
    assert card["compute"]["training_flops"] == meta["estimated_training_flops"] > 0 and card["compute"]["device_seconds"] > 0
    base = AutoModelForCausalLM.from_pretrained(meta["base_model_path"])
    assert card["base_model"]["parameters"] == sum(p.numel() for p in base.parameters())
    assert card["training"]["hyperparameters"]["lr"] == 0.003 and card["training"]["steps"] == 60
    assert [(g["gate"], g["passed"]) for g in card["evaluation"]["gates"]["checks"]][0] == ("max_val_loss", True)

    changed = manifest.model_copy(update={"counts": c.model_copy(update={"accepted": c.accepted + 1})})
    other = cards.build(good, meta, changed, name=NAME, version=1, run_id=mv.run_id)
    assert other["data"]["counts"]["accepted"] != card["data"]["counts"]["accepted"]  # negative control

    sheet = json.loads(Path(runs.Run(good.output_dir).datasheet("json")).read_text())
    assert sheet["counts"] == {"read": c.read, "accepted": c.accepted, "rejected": c.rejected, "duplicates": c.duplicates,
                               "erased": runs.erased_count(c), "rejected_by_reason": c.rejected_by_reason}
    assert sheet["by_source"] == manifest.by_source and sheet["splits"]["train"] == manifest.tokens.train.documents
    assert f"{c.read:,} records read; {c.accepted:,} accepted" in Path(runs.Run(good.output_dir).datasheet()).read_text()


def test_mlflow_ui_serves_the_same_store(trained, tmp_path):
    port = free_port()
    uri, root = registry.locate()
    log = tmp_path / "mlflow-ui.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", root,
                             # one worker: mlflow's default four each import its whole server at
                             # start, minutes of CPU on 2 shared cores
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"mlflow ui did not start: {log.read_text(errors='replace')[-3000:]}"
                time.sleep(1)
        found = json.load(urllib.request.urlopen(base + f"/api/2.0/mlflow/model-versions/search?filter=name%3D%27{NAME}%27"))
        assert sorted(int(v["version"]) for v in found["model_versions"]) == [1, 2]
        run = json.load(urllib.request.urlopen(base + f"/api/2.0/mlflow/runs/get?run_id={trained[1]['registry']['run_id']}"))
        assert run["run"]["info"]["run_name"] == "good"
        listed = cli_here("models", "list", NAME, "--tracking-uri", base)  # the CLI through the server too
        assert listed.returncode == 0 and f"{NAME}" in listed.stdout and "full" in listed.stdout, listed.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's workers too
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_a_tampered_artifact_is_refused_where_it_is_loaded(trained):
    good, *_ = trained
    source = Path(store().client.get_model_version(NAME, "1").source)
    weights = source / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-8] + b"tampered")
        with pytest.raises(registry.IntegrityError, match="model.safetensors"):
            evaluate.run_eval(good, model_ref=f"{NAME}/1")
        out = run_cli("models", "evaluate", NAME, "1")
        assert out.returncode == 2 and "does not match its registration checksums" in out.stderr, out.stderr
    finally:
        weights.write_bytes(original)



def test_a_student_with_its_own_tokenizer_learns_the_teachers_answers_at_sequence_level(trained, tmp_path):
    """Sequence-level distillation (optimize.distill.level auto): v1 (byte-level tokenizer)
    answers the train split's prompts through a Ray Data actor pool; a tiny student around a
    BPE tokenizer of its own learns those answers through its own data stage and Ray Train; its
    answers move toward the teacher's; the version reloads with its own tokenizer; its measurements
    and gates leave out the per-token loss over the teacher's ids (not comparable), and the
    teacher's gates, trained on that split, still measure it (the control)."""
    from transformers import AutoTokenizer

    from raylab import models
    from raylab.optimize import run_optimize

    good, meta, *_ = trained
    teacher = f"{NAME}/{meta['registry']['version']}"
    corpus = Path(good.data.sources[0].path)
    texts = [f"{r['prompt']} {r['response']}" for r in map(json.loads, corpus.read_text().splitlines())]
    bpe = models.train_corpus_tokenizer(texts, vocab_size=320, min_frequency=1)
    student = tmp_path / "student"
    bpe.save_pretrained(student)
    models.build_tiny_model("tiny-llama", bpe, seed=0).save_pretrained(student)
    raw = good.model_dump(mode="json")
    raw["optimize"] = {"distill": {"student": str(student), "steps": 40, "lr": 3e-3, "max_new_tokens": 24,
                                   "max_prompts": 48},
                       "measure": {"requests": 1, "max_new_tokens": 2, "memory": False}}
    out = run_optimize(config.load_dict(raw), teacher)

    assert (out["method"], out["level"], out["derived_from"]) == ("distill", "sequence", teacher)
    counts = out["corpus"]
    assert counts["prompts"] == 48 and counts["chat"] + counts["empty"] == 48 and counts["completion"] == 0
    [written] = (Path(good.output_dir) / "optimize").glob("distill-*/teacher-chat.jsonl")
    answers = [json.loads(line)["messages"][-1] for line in written.read_text().splitlines()]
    assert len(answers) == counts["chat"] and all(a["role"] == "assistant" for a in answers)
    assert sum("ships today" in a["content"] for a in answers) >= 0.9 * len(answers)  # what v1 answers
    assert out["val_loss"] < out["initial_val_loss"]  # it learned the teacher's answers
    assert out["after"]["rouge_l_to_teacher"] > out["before"]["rouge_l_to_teacher"] + 0.3

    mv = registry.get_version(store(), f"{NAME}/{out['version']}")
    assert mv.tags["raylab.distill.level"] == "sequence"
    assert mv.tags["raylab.derivation"] == "distill:sequence:max_new_tokens=24"
    path = registry.fetch(store(), f"{NAME}/{out['version']}")
    assert len(AutoTokenizer.from_pretrained(path)) == len(bpe) != len(AutoTokenizer.from_pretrained(
        registry.fetch(store(), teacher)))
    measured = out["measurements"]
    assert "eval_loss" in measured["parent"] and "eval_loss" not in measured["result"]
    assert "rouge_l" in measured["result"] and "quality_drop" not in measured["ratios"]

    result = gates.evaluate_version(store(), NAME, out["version"], address=_address())
    by_name = {c["name"]: c for c in result["checks"]}
    assert result["val_loss"] is None and result["status"] == "failed"
    assert not by_name["max_val_loss"]["passed"] and "tokenizer is not the one" in by_name["max_val_loss"]["message"]
    golden = by_name["Ticket 999: when does my widget ship?"]  # the prompt checks still ask the student
    assert golden["gate"] == "golden" and isinstance(golden["value"], str)
    control = gates.evaluate_version(store(), NAME, int(meta["registry"]["version"]), address=_address())
    assert control["val_loss"] is not None and "max_val_loss" in {c["name"] for c in control["checks"]}


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
