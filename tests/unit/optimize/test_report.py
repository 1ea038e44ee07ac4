"""`raylab optimize`'s measurements and gates (raylab/optimize/measure.py, report.py,
evaluate/gates.py's derived_checks), no registry, no Ray: the measurements of a tiny random
Llama have their shape and are positive (none is judged on its value: timing is noise); the
speed run does a fixed amount of work whatever the model would stop at; ratios and the
relative eval-loss increase come from recorded values; min_speedup and max_quality_drop
decide on recorded values, each with a passing control, and skip a version derived from
nothing; the report accumulates results in optimize/report.{json,md,png}; the config refuses
unknown measure keys and a non-positive min_speedup."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from raylab import config, evaluate, models
from raylab.config import GatesConfig, MeasureConfig
from raylab.core import runs, storage
from raylab.errors import ConfigError
from raylab.optimize import measure, report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model, tokenizer) of a tiny random Llama with the byte tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    tok = models.build_byte_tokenizer()
    model = models.build_tiny_model("tiny-llama", tok, seed=3).eval()
    tok.save_pretrained(d)
    model.save_pretrained(d)
    return str(d), model, tok


def test_measurements_have_their_shape_and_are_positive(tiny):
    path, model, tok = tiny
    assert measure.parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0
    assert measure.disk_bytes(path) > 4 * measure.parameter_count(model)  # float32 weights plus config and tokenizer
    with ThreadPoolExecutor(max_workers=1) as pool:  # the control's process runs beside the measured one
        gone = pool.submit(measure.peak_load_memory, {"gone": path + "-missing"})
        memory = measure.peak_load_memory({"parent": path})  # a fresh process loads it
        with pytest.raises(RuntimeError, match="in a fresh process failed"):  # control: a failed load is no number
            gone.result()
    assert set(memory) == {"parent"} and set(memory["parent"]) == {"peak_rss_bytes", "load_rss_bytes"}
    # a model this small may fit in pages the interpreter already holds: its rise may be 0, never negative
    assert memory["parent"]["peak_rss_bytes"] > memory["parent"]["load_rss_bytes"] >= 0
    speed = measure.speed(model, tok, MeasureConfig(requests=2, max_new_tokens=3))
    assert set(speed) == {"tokens_per_s_c1", "tokens_per_s_c16"} and all(v > 0 for v in speed.values())


def test_the_speed_run_generates_exactly_the_budget(tiny):
    _, model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in measure.PROMPTS[:3]]
    all_but_one_end = [t for t in range(len(tok)) if t != 100]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = all_but_one_end  # almost anything it generates would end the request
    try:
        assert measure._generate(model, tok, prompts, 5) == 15  # min_new_tokens: no request stops early
        # control: without the floor, the same model stops after its first token (seeded weights: not token 100)
        ids, mask = models.left_pad(prompts[:1], tok.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert out.shape[1] - ids.shape[1] == 1
    finally:
        model.generation_config.eos_token_id = saved


def test_ratios_from_recorded_values():
    parent = {"size_bytes": 400, "parameters": 100, "load_rss_bytes": 80, "tokens_per_s_c1": 10.0,
              "tokens_per_s_c16": 100.0, "eval_loss": 2.0, "rouge_l": 0.5}
    result = {"size_bytes": 100, "parameters": 100, "load_rss_bytes": 40, "tokens_per_s_c1": 12.0,
              "tokens_per_s_c16": 110.0, "eval_loss": 2.1, "rouge_l": 0.45}
    r = measure.ratios(parent, result)
    assert r["size_ratio"] == 0.25 and r["memory_ratio"] == 0.5 and r["parameter_ratio"] == 1.0
    assert r["speedup_c16"] == pytest.approx(1.1) and r["speedup_c1"] == pytest.approx(1.2)
    assert r["quality_drop"] == pytest.approx(0.05) and r["rouge_l_change"] == pytest.approx(-0.05)
    # no quality measured (no data stage output): no quality ratio; an infinite loss gives none either
    assert "quality_drop" not in measure.ratios({**parent, "eval_loss": None}, result)
    assert "quality_drop" not in measure.ratios(parent, {**result, "eval_loss": float("inf")})


def derived(speedup: str | None = None) -> dict:
    tags = {"raylab.derived_from": "widgets/1", "raylab.stage": "optimize"}
    return tags | ({"raylab.measure.speedup_c16": speedup} if speedup is not None else {})


def test_min_speedup_decides_on_the_recorded_ratio():
    gates = GatesConfig(min_speedup=1.3)
    [slow] = evaluate.derived_checks(gates, derived("1.1"), None, None)
    assert slow["gate"] == "min_speedup" and not slow["passed"] and slow["value"] == 1.1
    line = evaluate.describe(slow)
    assert line.startswith("min_speedup: ") and "1.100x" in line and "1.300x" in line and "widgets/1" in line
    [fast] = evaluate.derived_checks(gates, derived("1.4"), None, None)  # control
    assert fast["passed"] and evaluate.describe(fast) == "min_speedup: 1.4000 >= 1.3000 (against widgets/1)"
    [unmeasured] = evaluate.derived_checks(gates, derived(), None, None)
    assert not unmeasured["passed"] and "raylab.measure.speedup_c16" in unmeasured["message"]
    # a version derived from nothing has no parent to be faster than: no check
    assert evaluate.derived_checks(gates, {"raylab.stage": "train"}, 2.0, None) == []


def test_max_quality_drop_decides_on_the_relative_loss_increase():
    gates = GatesConfig(max_quality_drop=0.02)
    [worse] = evaluate.derived_checks(gates, derived(), 2.1, 2.0)
    assert not worse["passed"] and worse["value"] == pytest.approx(0.05)
    assert "max_quality_drop: eval loss 2.1000 is +5.00% over widgets/1's 2.0000" in evaluate.describe(worse)
    [close] = evaluate.derived_checks(gates, derived(), 2.02, 2.0)  # control: 1 % is within 2 %
    assert close["passed"] and close["value"] == pytest.approx(0.01)
    [better] = evaluate.derived_checks(gates, derived(), 1.9, 2.0)
    assert better["passed"] and better["value"] < 0
    [missing] = evaluate.derived_checks(gates, derived(), 2.0, None)
    assert not missing["passed"] and "no held-out loss of widgets/1" in missing["message"]


def test_gates_of_a_derived_version_take_this_configs_optimize_gates():
    parent = GatesConfig(max_val_loss=3.0, min_speedup=2.0).model_dump_json()
    merged = GatesConfig.model_validate_json(report.gates_for(parent, GatesConfig(min_speedup=1.3)))
    assert (merged.max_val_loss, merged.min_speedup, merged.max_quality_drop) == (3.0, 1.3, None)
    kept = GatesConfig.model_validate_json(report.gates_for(parent, GatesConfig()))  # control: nothing set here
    assert kept.min_speedup == 2.0


def compared(version: str, speedup: float) -> dict:
    parent = {"size_bytes": 4_000_000, "parameters": 1000, "load_rss_bytes": 8_000_000, "peak_rss_bytes": 5e8,
              "tokens_per_s_c1": 10.0, "tokens_per_s_c16": 100.0, "eval_loss": 2.0, "rouge_l": 0.5}
    result = parent | {"size_bytes": 1_000_000, "tokens_per_s_c16": 100.0 * speedup, "eval_loss": 2.04}
    return {"parent": parent, "result": result, "ratios": measure.ratios(parent, result), "val": "runs/x/data/val",
            "rouge_items": 8, "requests": 16, "max_new_tokens": 16, "version": version,
            "derived_from": "widgets/1", "derivation": "quantize:int8_weight_only"}


def test_the_report_accumulates_results_as_markdown_and_a_chart(tmp_path):
    run = runs.Run(str(tmp_path / "run"))
    report.write(run, compared("widgets/2", 1.1))
    report.write(run, compared("widgets/3", 1.5))
    report.write(run, compared("widgets/2", 1.2))  # measured again: replaced, not added
    saved = json.loads(storage.read_text(run.optimize_file("report")))["results"]
    assert [r["version"] for r in saved] == ["widgets/3", "widgets/2"]
    assert saved[1]["ratios"]["speedup_c16"] == pytest.approx(1.2)
    md = storage.read_text(run.optimize_file("report_md"))
    assert md.count("| metric | parent widgets/1 |") == 2 and "## widgets/3: quantize:int8_weight_only" in md
    assert "| size on disk (MB) | 4.000 | 1.000 | 0.250x |" in md
    assert "| tokens/s, concurrency 16 | 100.0 | 120.0 | 1.200x |" in md
    assert "(registry.gates.max_quality_drop): +0.0200" in md
    assert storage.read_bytes(run.optimize_file("report_png"))[:8] == b"\x89PNG\r\n\x1a\n"
    # a result measured without data: its quality rows are left out, not shown as zero
    bare = compared("widgets/4", 1.0)
    for side in ("parent", "result"):
        bare[side] = {k: v for k, v in bare[side].items() if k not in ("eval_loss", "rouge_l")}
    bare["ratios"] = measure.ratios(bare["parent"], bare["result"])
    table = report.table(bare)
    assert "| eval loss" not in table and "| ROUGE-L" not in table and "max_quality_drop" not in table
    assert "Quality: not measured (no data stage output and no eval.held_out)" in table
    assert "Quality: not measured" not in md  # control: the measured ones say what they were measured on


def test_measure_and_gate_keys_are_validated(tmp_path):
    def load(**sections):
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump({"version": 1, "output_dir": str(tmp_path / "run"),
                                        "data": {"sources": [{"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]},
                                        "model": {"name_or_path": "preset:tiny-llama"}} | sections))
        return config.load(str(path))

    assert load(optimize={"measure": {"requests": 4}}).optimize.measure.max_new_tokens == 16
    assert load(optimize={"measure": None}).optimize.measure is None  # not measured
    with pytest.raises(ConfigError, match="optimize.measure.request"):
        load(optimize={"measure": {"request": 4}})
    with pytest.raises(ConfigError, match="registry.gates.min_speedup"):
        load(registry={"gates": {"min_speedup": 0}})
    assert load(registry={"gates": {"max_quality_drop": 0.02, "min_speedup": 1.3}}).registry.gates.min_speedup == 1.3
