"""`raylab optimize` end to end through a real registry (MLflow on SQLite in tmp_path, no
Ray): a LoRA adapter on a tiny random Llama is registered, merged, quantised to int8 and
registered as a new version whose lineage names its parent and method, measured against
its parent (tags, card section, optimize/report.md: shape and positivity only); that version
loads through `models.load` (int8 weights, logits within TOL of the merged parent) and
generates through the transformers serving engine; quantising it again, int4 on CPU and a
missing method exit 2 through the CLI, naming the key or flag; so do optimize.prune's
refusals (a quantised version, a gpt2 model, fractions that round to nothing or lie outside
(0, 1), no data stage output), and optimize.distill's (a quantised teacher)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import yaml

import raylab
from raylab import config, models, registry
from raylab.cli import main
from raylab.optimize import QUANTIZED_TAG
from raylab.optimize import quantize as q
from raylab.serve.engine import Request, Sampling, TransformersEngine
from registry_helpers import open_test_store
from registry_helpers import register as register_version

pytest.importorskip("torchao")

TOL = 0.05  # as in test_quantize.py: relative max logit error int8 may cost
IDS = torch.tensor([[5, 60, 70, 80, 90, 100, 110, 3, 44, 200]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapter_on_tiny_base(root):
    """base/ (tiny Llama) and adapter/ (LoRA on every projection, non-zero B so merging
    changes the weights) with its tokenizer, as the train stage leaves final/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = models.build_byte_tokenizer()
    base, adapter = root / "base", root / "adapter"
    tok.save_pretrained(base)
    models.build_tiny_model("tiny-llama", tok, seed=11).save_pretrained(base)
    torch.manual_seed(12)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    return adapter


def tiny_full(root, preset: str):
    """A full model directory (random weights) of a preset with the byte tokenizer."""
    tok = models.build_byte_tokenizer()
    d = root / preset
    tok.save_pretrained(d)
    models.build_tiny_model(preset, tok, seed=5).save_pretrained(d)
    return d


def config_file(tmp_path, **optimize) -> str:
    name = '-'.join(f'{k}-{v}' for k, v in optimize.items()).translate(str.maketrans("", "", "{}:' ,"))
    path = tmp_path / f"optimize-{name or 'none'}.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "output_dir": str(tmp_path / "run"),
        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
        "model": {"name_or_path": "preset:tiny-llama"},
        "registry": {"model_name": "widgets"},
        # the measurements kept short (memory: test_report.py): no test decides on a speed
        "optimize": {"measure": {"requests": 1, "max_new_tokens": 2, "memory": False}} | optimize}))
    return str(path)


def test_a_quantised_version_is_registered_with_lineage_loads_and_serves(tmp_path, monkeypatch, capsys):
    store = open_test_store(tmp_path, monkeypatch)
    parent = register_version(store, tmp_path, 1, final=adapter_on_tiny_base(tmp_path))
    cfg_path = config_file(tmp_path, quantize="int8_weight_only", include_embeddings=True)

    out = raylab.run_optimize(cfg_path, model=f"widgets/{parent}")  # the Python API; the store: $RAYLAB_HOME's
    assert (out["name"], out["version"], out["derived_from"]) == ("widgets", 2, "widgets/1")
    merged = models.load("widgets/1", store=store).model.merge_and_unload()
    eligible = q.eligible_modules(merged, include_embeddings=True)
    assert out["quantized_layers"] == out["eligible_layers"] == len(eligible) > 0
    assert out["parameters"] == sum(p.numel() for p in merged.parameters())

    mv = registry.get_version(store, "widgets/2")
    assert mv.tags["raylab.derived_from"] == "widgets/1"
    assert mv.tags["raylab.derivation"] == "quantize:int8_weight_only:embeddings"
    assert mv.tags[QUANTIZED_TAG] == "int8_weight_only" and mv.tags["raylab.stage"] == "optimize"
    assert mv.tags["base_model"] == "preset:tiny-llama"  # the parent's lineage carried over
    assert int(mv.tags["raylab.quantize.layers"]) == len(eligible)
    # int8 with embeddings: about a quarter of the float weights' bytes (+ scales, config, tokenizer)
    assert 0 < int(mv.tags["raylab.size_bytes"]) < 0.5 * int(mv.tags["raylab.float_weight_bytes"])
    # measured against the parent (report.py), recorded on the version, in its card and in optimize/report.md;
    # no data stage output here, so no quality numbers (their absence is stated, not zeros)
    measured = json.loads(mv.tags["raylab.measure"])
    assert measured["derived_from"] == "widgets/1" and out["measurements"]["ratios"] == measured["ratios"]
    for side in ("parent", "result"):
        assert all(measured[side][k] > 0 for k in ("size_bytes", "parameters", "tokens_per_s_c1", "tokens_per_s_c16"))
        assert not {"eval_loss", "rouge_l", "peak_rss_bytes"} & set(measured[side])  # not measured, not zero
    assert 0 < float(mv.tags["raylab.measure.size_ratio"]) < 0.5 and float(mv.tags["raylab.measure.speedup_c16"]) > 0
    assert "Measurements" in registry.card_for(store, mv)["extra_sections"]
    report_md = (tmp_path / "run" / "optimize" / "report.md").read_text()
    assert "## widgets/2: quantize:int8_weight_only:embeddings of widgets/1" in report_md
    assert "Quality: not measured" in report_md and (tmp_path / "run" / "optimize" / "report.png").exists()
    # `models evaluate` judges it with its trained ancestor's config (the derived run logs none): here the
    # parent's run, which this fake registration gave no config either, so the refusal names the parent's run
    from raylab.errors import UserError
    from raylab.evaluate.gates import version_config

    parent_run = registry.get_version(store, "widgets/1").run_id
    with pytest.raises(UserError, match=f"widgets/1: its run {parent_run} has no config.resolved.yaml"):
        version_config(store, mv)
    parent_tags = registry.get_version(store, "widgets/1").tags  # negative control: the parent derives from nothing
    assert "raylab.derived_from" not in parent_tags and QUANTIZED_TAG not in parent_tags
    assert "raylab.measure" not in parent_tags

    card = registry.card_for(store, mv)  # the parent's facts under the new name, plus the method's section
    assert (card["name"], card["version"]) == ("widgets", 2) and "widgets/1" in card["note"]
    section = card["extra_sections"]["Quantisation"]
    assert f"Layers quantised: {len(eligible)} of {len(eligible)} eligible" in section and "int8_weight_only" in section
    assert "Quantisation" not in registry.card_for(store, registry.get_version(store, "widgets/1"))["extra_sections"]

    inf = models.load("widgets/2", store=store)  # checksums verified, no re-quantisation
    assert measured["result"]["parameters"] == sum(p.numel() for p in inf.model.parameters())
    assert inf.kind == "full" and q.is_quantized(inf.model.model.layers[0].self_attn.q_proj.weight)
    assert q.is_quantized(inf.model.lm_head.weight)
    assert q.logit_drift(logits(merged), logits(inf.model)) < TOL
    # negative control: the unmerged base is far from the merged parent, so the check can fail
    assert q.logit_drift(logits(merged), logits(models.load("widgets/1", base=True, store=store).model)) > TOL

    prompt = inf.tokenizer("widgets ship today")["input_ids"]
    with torch.inference_mode():
        expected = inf.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                      eos_token_id=None, pad_token_id=inf.tokenizer.pad_token_id)[0, len(prompt):]

    async def serve_once():
        engine = TransformersEngine(inf.model, inf.tokenizer)
        outs = [o async for o in engine.submit(Request("r1", prompt, Sampling(max_tokens=6, temperature=0,
                                                                                   ignore_eos=True)))]
        return "".join(o.text for o in outs), outs[-1]

    text, last = asyncio.run(serve_once())
    assert last.num_tokens == 6 and text == inf.tokenizer.decode(expected, skip_special_tokens=True)

    # bad input, through the CLI: each exits 2 naming what to fix
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert main(["optimize", cfg_path, "--model", "widgets/2"]) == 2
    err = capsys.readouterr().err
    assert "--model widgets/2: already quantised (raylab.quantized=int8_weight_only)" in err and "widgets/1" in err
    assert main(["optimize", config_file(tmp_path, quantize="int4_weight_only"), "--model", "widgets/1"]) == (
        0 if torch.cuda.is_available() else 2)
    assert torch.cuda.is_available() or "optimize.quantize: int4_weight_only needs a CUDA or XPU" in capsys.readouterr().err
    assert main(["optimize", config_file(tmp_path), "--model", "widgets/1"]) == 2
    assert "optimize.quantize: not set" in capsys.readouterr().err
    assert main(["optimize", cfg_path, "--model", "runs/x/train/final"]) == 2
    assert "--model 'runs/x/train/final': expected a registry version" in capsys.readouterr().err
    assert [v["version"] for v in registry.versions(store, "widgets")] == [1, 2]  # nothing registered by the refusals

    # the same derivation again finds the version it registered (idempotent), printed as JSON
    assert main(["optimize", cfg_path, "--model", "widgets/1"]) == 0
    out = capsys.readouterr().out  # progress lines, then the result as JSON
    assert json.loads(out[out.index("\n{") + 1:])["version"] == 2

    # optimize.prune's refusals, on the same store (a registry costs seconds to create): each exits 2 naming
    # what to fix and registers nothing (the pruning: test_prune.py; its recovery: tests/integration/test_prune.py)
    half = config_file(tmp_path, prune={"heads": 0.5, "mlp_channels": 0.3})
    assert main(["optimize", half, "--model", "widgets/2"]) == 2
    err = capsys.readouterr().err
    assert "--model widgets/2: already quantised" in err and "optimize.prune applies to a float version" in err
    assert main(["optimize", config_file(tmp_path, prune={"heads": 0.1}), "--model", "widgets/1"]) == 2
    assert "optimize.prune.heads=0.1: removes 0 of 2 key/value groups" in capsys.readouterr().err  # tiny-llama: 2 groups
    assert main(["optimize", half, "--model", "widgets/1", "optimize.prune.mlp_channels=1.5"]) == 2
    assert "optimize.prune.mlp_channels" in capsys.readouterr().err
    gpt2 = register_version(store, tmp_path, 3, final=tiny_full(tmp_path, "tiny-gpt2"))
    assert main(["optimize", half, "--model", f"widgets/{gpt2}"]) == 2
    assert "optimize.prune: cannot prune a 'gpt2' model" in capsys.readouterr().err
    # negative control for the refusals above: the merged adapter on tiny-llama with these fractions passes
    # every check up to the data stage's output, which this tmp_path lacks
    assert main(["optimize", half, "--model", "widgets/1"]) == 2
    assert "no data stage output at" in capsys.readouterr().err
    assert [v["version"] for v in registry.versions(store, "widgets")] == [1, 2, 3]

    # optimize.distill's: a quantised teacher is refused naming its parent; a float one passes every check
    # up to the data stage's output (the distillation itself: tests/integration/test_distill.py)
    student = config_file(tmp_path, distill={"student": {"num_hidden_layers": 1}})
    assert main(["optimize", student, "--model", "widgets/2"]) == 2
    err = capsys.readouterr().err
    assert "--model widgets/2: already quantised" in err and "optimize.distill applies to a float version: " \
        "distil from widgets/1 instead" in err
    assert main(["optimize", student, "--model", "widgets/1"]) == 2
    assert "no data stage output at" in capsys.readouterr().err
    assert [v["version"] for v in registry.versions(store, "widgets")] == [1, 2, 3]


def test_optimize_section_forbids_unknown_keys_and_methods(tmp_path):
    from raylab.errors import ConfigError

    with pytest.raises(ConfigError, match="optimize.quantise"):
        config.load(config_file(tmp_path, quantise="int8_weight_only"))
    with pytest.raises(ConfigError, match="optimize.quantize"):
        config.load(config_file(tmp_path, quantize="int3"))
    assert config.load(config_file(tmp_path, quantize="int8_dynamic")).optimize.quantize == "int8_dynamic"
