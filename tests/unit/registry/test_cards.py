"""Model cards: built at registration from a real run directory's manifest, loadable by
huggingface_hub, with the data counts, compute and the EU AI Act comparison; gates follow the
registry's tags; extra sections; a card for a version registered before cards existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manifests import card_cfg, manifest_for
from raylab import config, registry
from raylab.core import runs, storage
from raylab.errors import UserError
from raylab.registry import cards
from registry_helpers import META, fake_final, open_test_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One registry for the module (creating MLflow's tables takes seconds); each test
    registers its own versions of `widgets` and names them by number."""
    with pytest.MonkeyPatch.context() as mp:
        yield open_test_store(tmp_path_factory.mktemp("cards"), mp)


def registered(store, tmp_path: Path, cfg=None, manifest: dict | None = None, meta: dict | None = None):
    cfg = cfg or card_cfg(tmp_path)
    storage.write_text(runs.Run(cfg.output_dir).manifest, json.dumps(manifest or manifest_for(tmp_path)))
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name="r", key=f"k{tmp_path}{len(store.client.search_runs([exp]))}",
                              params={}, history=[], artifacts={}, tags={})
    final = fake_final(tmp_path, f"final{run_id[:6]}")
    full = META | {"train_seconds": 30.0, "created": "2026-12-01T01:00:00Z", "flops_formula": "4N"} | (meta or {})
    return registry.register(store, cfg, run_id, str(final), full)


def test_a_registered_version_has_a_card_huggingface_loads_with_the_manifests_numbers(store, tmp_path):
    from huggingface_hub import ModelCard

    mv = registered(store, tmp_path)
    card = registry.card_for(store, registry.get_version(store, f"widgets/{mv.version}"))
    out = registry.write_card(card, str(tmp_path / "out"))
    hf = ModelCard.load(out["md"])
    assert hf.data.license == "apache-2.0" and "lora" in hf.data.tags and hf.data.library_name == "peft"
    assert hf.data.eval_results[0].metric_type == "val_loss" and hf.data.eval_results[0].metric_value == 2.5
    data = card["data"]
    assert data["counts"] == {"read": 12, "accepted": 8, "rejected": 1, "deduplicated": 2,
                              "duplicates": {"exact": 1, "near": 1}, "erased": 1}
    assert [(s["name"], s["read"], s["accepted"], s["duplicates"], s["erased"]) for s in data["sources"]] == \
        [("faq", 6, 5, 0, 0), ("support", 6, 3, 2, 1)]
    assert data["sources"][0]["files"][0]["sha256"] == storage.sha256(str(tmp_path / "faq.csv"))
    assert data["pii_found"] == {"EMAIL": 3, "PERSON": 2} and data["splits"]["val"]["documents"] == 1
    text = hf.text
    for needed in ("Answer widget questions.", "Medical advice.", "| support | jsonl | 6 | 3 | 0 | 2 | 1 |",
                   storage.sha256(str(tmp_path / "faq.csv")), "EMAIL 3, PERSON 2", "| lr | 0.002 |",
                   "Seed: 7 (training)", "Device-seconds: 30 on CPU", "Training FLOPs: 5.5e+09", "raylab test",
                   "Promotion gates: **pending**"):
        assert needed in text, needed
    assert json.loads(Path(out["json"]).read_text())["data"] == data  # the JSON twin holds the same facts


def test_a_changed_count_changes_the_card(store, tmp_path):  # negative control for the test above
    changed = manifest_for(tmp_path)
    changed["counts"]["accepted"] = 7
    card = cards.build(card_cfg(tmp_path), META, runs.DataManifest.model_validate(changed), name="widgets", version=1,
                       run_id="r")
    same = cards.build(card_cfg(tmp_path), META, runs.DataManifest.model_validate(manifest_for(tmp_path)),
                       name="widgets", version=1, run_id="r")
    assert card["data"]["counts"]["accepted"] == 7 != same["data"]["counts"]["accepted"]
    assert cards.render(card) != cards.render(same)


def test_eu_ai_act_comparison_is_computed_when_known_and_unknown_said_plainly(tmp_path):
    meta = META | {"estimated_training_flops": 1.0e18}
    known = cards.build(card_cfg(tmp_path, base_parameters=1_000_000_000, base_pretraining_tokens=1e12), meta, None,
                        name="w", version=1, run_id="r")["eu_ai_act"]
    assert known["base_pretraining_flops"] == 6e21 and known["threshold_flops"] == pytest.approx(2e21)
    assert known["exceeds_threshold"] is False and "below the one-third threshold" in known["statement"]
    big = cards.build(card_cfg(tmp_path, base_parameters=1000, base_pretraining_tokens=1000), meta, None,
                      name="w", version=1, run_id="r")["eu_ai_act"]
    assert big["exceeds_threshold"] is True and "new general-purpose model" in big["statement"]
    unknown = cards.build(card_cfg(tmp_path), meta, None, name="w", version=1, run_id="r")
    assert unknown["eu_ai_act"]["exceeds_threshold"] is None and unknown["eu_ai_act"]["statement"].startswith("Unknown")
    assert "pre-training token count" in unknown["eu_ai_act"]["basis"]
    assert "Unknown: the data stage's manifest was not found" in cards.render(unknown)


def test_gates_follow_the_registry_and_extra_sections_render_in_order(store, tmp_path):
    mv = registered(store, tmp_path)
    report = {"evaluated": "2026-12-01T02:00:00Z", "val_loss": 2.4, "perplexity": 11.0,
              "checks": [{"gate": "max_val_loss", "passed": True, "value": 2.4, "limit": 6.0}]}
    registry.set_tags(store, "widgets", int(mv.version), {"raylab.gates.status": "passed",
                                                          "raylab.gates.report": json.dumps(report)})
    registry.refresh_card(store, "widgets", int(mv.version))
    assert cards.stored(store, mv.run_id)["evaluation"]["gates"]["status"] == "passed"  # re-logged, not only overlaid
    registry.add_card_section(store, "widgets", int(mv.version), "Optimisation", "Quantised to int8: 2.1x faster.")
    registry.add_card_section(store, "widgets", int(mv.version), "Explanations", "Attributions for 20 prompts.")
    text = cards.render(registry.card_for(store, registry.get_version(store, f"widgets/{mv.version}")))
    assert "| max_val_loss | pass | 2.4 | 6.0 |" in text
    assert text.index("## Optimisation") < text.index("## Explanations") and "2.1x faster" in text


def test_a_version_registered_before_cards_gets_one_built_from_its_run(store, tmp_path):
    cfg = card_cfg(tmp_path)
    config.write_resolved(cfg)
    run = runs.Run(cfg.output_dir)
    storage.write_text(run.manifest, json.dumps(manifest_for(tmp_path)))
    exp = registry.experiment_id(store, "widgets")
    run_id = registry.log_run(store, exp, name="old", key="old", params={}, history=[], tags={},
                              artifacts={runs.RESOLVED_CONFIG: run.resolved_config, runs.MANIFEST: run.manifest})
    final = fake_final(tmp_path, "oldfinal")
    (final / runs.TRAIN_META).write_text(json.dumps(META))
    store.client.log_artifacts(run_id, str(final), "model")
    registry.experiment_id(store, "widgets")
    if not store.client.search_registered_models("name = 'widgets'"):
        store.client.create_registered_model("widgets")
    source = f"{store.client.get_run(run_id).info.artifact_uri}/model"
    mv = store.client.create_model_version("widgets", source, run_id)  # as an older raylab registered it
    card = registry.card_for(store, mv)
    assert "registered before raylab wrote model cards" in card["note"] and card["data"]["counts"]["read"] == 12
    bare = store.client.create_model_version("widgets", f"{store.client.get_run(run_id).info.artifact_uri}/nothing",
                                             registry.log_run(store, exp, name="bare", key="bare", params={},
                                                              history=[], artifacts={}, tags={}))
    with pytest.raises(UserError, match="has no model card and its run .* lacks"):
        registry.card_for(store, bare)


def test_models_card_prints_writes_and_refuses_with_exit_2(store, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from raylab.cli import main

    mv = registered(store, tmp_path)
    assert main(["models", "card", f"widgets/{mv.version}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and "## Training data" in printed
    ref = f"widgets/{mv.version}"
    assert main(["models", "card", ref, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["counts"]["read"] == 12
    assert main(["models", "card", ref, "--output", str(tmp_path / "cards")]) == 0
    capsys.readouterr()
    assert ModelCard.load(tmp_path / "cards" / "README.md").data.license == "apache-2.0"
    assert json.loads((tmp_path / "cards" / "model_card.json").read_text())["version"] == int(mv.version)
    for args, message in [(["widgets/99"], "no version 99"), ([ref, "--output", str(tmp_path / "x.jsonl")], "is a file")]:
        (tmp_path / "x.jsonl").write_text("")
        assert main(["models", "card", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_base_pretrained_by_the_run_takes_its_compute_from_the_pretrain_stage(tmp_path):
    """With pretrain.tokenizer the base was built with random weights and pre-trained here:
    its whole pre-training compute is the pretrain run's recorded FLOPs."""
    raw = card_cfg(tmp_path).model_dump(mode="json", exclude_none=True)
    raw["pretrain"] = {"tokenizer": {"vocab_size": 512}, "max_steps": 10}
    cfg = config.load_dict(raw)
    pre = runs.TrainMeta.model_validate(META | {
        "identity": "p", "base_model_path": "/b", "epochs_started": 1, "stopped_early": False, "replica_digests": [],
        "worker_nodes": [], "resumed_at_steps": [], "flops_per_token": 10.0, "estimated_training_flops": 3.0e12,
        "trained_tokens": 300_000_000_000, "flops_formula": "4N", "best_checkpoint": None, "latest_checkpoint": "c",
        "train_seconds": 1.0, "created": "t"})
    runs.write_json(runs.Run(cfg.output_dir).pretrain.train_meta, pre)
    card = cards.build(cfg, META | {"estimated_training_flops": 2.0e12}, None, name="w", version=1, run_id="r")
    eu = card["eu_ai_act"]
    assert eu["base_pretraining_flops"] == 3.0e12 and eu["exceeds_threshold"] is True  # 2e12 > 1e12
    assert "300,000,000,000 tokens" in eu["basis"] and card["base_model"]["built_by_raylab"] == "pretrained"


def test_a_sweep_trial_on_the_pretrained_base_finds_its_pretraining_beside_the_base(tmp_path):
    """A sweep's trials name the pre-trained base by path, with no pretrain section (what the
    quickstart registers): the base's own TrainMeta, over a preset raylab built with random
    weights, is its whole pre-training. Without the preset's marker it is not (negative control)."""
    preset, final = tmp_path / "pretrain" / "base", tmp_path / "pretrain" / "train" / "final"
    storage.write_text(runs.model_file(str(preset), runs.PRESET_MARKER), "{}")
    pre = runs.TrainMeta.model_validate(META | {
        "identity": "p", "base_model_path": str(preset), "epochs_started": 1, "stopped_early": False,
        "replica_digests": [], "worker_nodes": [], "resumed_at_steps": [], "flops_per_token": 10.0,
        "estimated_training_flops": 3.0e12, "trained_tokens": 300_000_000_000, "flops_formula": "4N",
        "best_checkpoint": None, "latest_checkpoint": "c", "train_seconds": 1.0, "created": "t"})
    runs.write_json(runs.model_file(str(final), runs.TRAIN_META), pre)
    cfg = card_cfg(tmp_path)
    assert cfg.pretrain is None
    card = cards.build(cfg, META | {"estimated_training_flops": 2.0e11, "base_model": str(final), "base_model_path": str(final)}, None,
                       name="w", version=1, run_id="r")
    assert card["eu_ai_act"]["base_pretraining_flops"] == 3.0e12 and card["eu_ai_act"]["exceeds_threshold"] is False
    assert card["base_model"]["built_by_raylab"] == "pretrained" and card["license"]["id"] != cards.UNKNOWN

    (preset / runs.PRESET_MARKER).unlink()  # a base trained by raylab from someone's weights: its pre-training is not known
    other = cards.build(cfg, META | {"estimated_training_flops": 2.0e11, "base_model": str(final), "base_model_path": str(final)}, None,
                        name="w", version=1, run_id="r")
    assert other["eu_ai_act"]["base_pretraining_flops"] is None and other["base_model"]["built_by_raylab"] is None


def test_a_sections_linked_files_are_logged_beside_the_card_and_copied_with_it(store, tmp_path):
    mv = registered(store, tmp_path)
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"\x89PNG not really")
    registry.add_card_section(store, "widgets", int(mv.version), "Explanations", "![why](why.png)",
                              files={"why.png": str(plot)})
    card = registry.card_for(store, registry.get_version(store, f"widgets/{mv.version}"))
    assert card["files"] == ["why.png"]
    out = tmp_path / "out"
    written = registry.download_card_files(store, mv, card, str(out))
    assert written == [str(out / "why.png")] and (out / "why.png").read_bytes() == plot.read_bytes()
    # the control: a card without linked files copies nothing
    other = registered(store, tmp_path)
    bare = registry.card_for(store, registry.get_version(store, f"widgets/{other.version}"))
    assert "files" not in bare and registry.download_card_files(store, other, bare, str(tmp_path / "none")) == []
