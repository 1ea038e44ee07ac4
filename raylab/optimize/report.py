"""Each `raylab optimize` result measured against its parent, recorded on the new version and
in `<output_dir>/optimize/report.{json,md,png}` (measure.py says how each number is taken).

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.quantize=int8_weight_only
    raylab models show acme-assistant/4     # raylab.measure.speedup_c16, raylab.measure.quality_drop, ...
    cat runs/quickstart/optimize/report.md  # parent vs result, one table per result; report.png: the ratios
    raylab models evaluate acme-assistant 4 # registry.gates.min_speedup / max_quality_drop decide promotion

Recorded as version tags (as the registry records everything else): `raylab.measure` (the
whole comparison as JSON) and one tag per ratio (`raylab.measure.speedup_c16`, ...), which
`evaluate/gates.py` reads; the card gets a Measurements section. The version's gates are its
parent's, with `max_quality_drop` / `min_speedup` of this config's registry.gates when it sets
them (the config that made the result says what it must achieve). Measured once: a re-run that
finds the version registered (register_derived is idempotent) finds its measurements too.
"""

from __future__ import annotations

import json
import logging
import os

from raylab import models, registry
from raylab.config import GatesConfig, MeasureConfig, RaylabConfig
from raylab.core import runs, storage
from raylab.optimize import measure

log = logging.getLogger(__name__)

TAG = "raylab.measure"
CARD_SECTION = "Measurements"
GATE_KEYS = ("max_quality_drop", "min_speedup")
# (row label, key, format) of the report's table, in its order
ROWS = (("size on disk (MB)", "size_bytes", lambda v: f"{v / 1e6:.3f}"),
        ("parameters", "parameters", lambda v: f"{v:,}"),
        ("peak memory at load, rise (MB)", "load_rss_bytes", lambda v: f"{v / 1e6:.1f}"),
        ("peak memory of the loading process (MB)", "peak_rss_bytes", lambda v: f"{v / 1e6:.1f}"),
        ("tokens/s, concurrency 1", "tokens_per_s_c1", lambda v: f"{v:.1f}"),
        ("tokens/s, concurrency 16", "tokens_per_s_c16", lambda v: f"{v:.1f}"),
        ("eval loss (val split)", "eval_loss", lambda v: f"{v:.4f}"),
        ("ROUGE-L (held-out answers)", "rouge_l", lambda v: f"{v:.4f}"))


def measure_model(cfg: RaylabConfig, path: str, items: list[dict], val: str | None,
                  split_tokenizer: str | None = None) -> dict:
    """Everything but memory of one local model directory, loaded here once (an adapter's size
    on disk is its files and its base's: what serving it needs). A model whose tokenizer is not
    the one the val split was tokenized with (fingerprint `split_tokenizer`: a student distilled
    at sequence level) gets no eval loss: its per-token loss on those ids would mean nothing."""
    inf = models.load(path, dtype="float32")
    if val is not None and split_tokenizer and models.fingerprint(inf.tokenizer)["fingerprint"] != split_tokenizer:
        log.info(f"optimize: {path}: its tokenizer is not the val split's, so no eval loss is measured for it")
        val = None
    size = measure.disk_bytes(path)
    if inf.kind == "adapter" and os.path.isdir(inf.base):  # serving an adapter needs its base's files too
        size += measure.disk_bytes(inf.base)
    out = {"size_bytes": size, "parameters": measure.parameter_count(inf.model)}
    out |= measure.speed(inf.model, inf.tokenizer, cfg.optimize.measure or MeasureConfig())
    return out | measure.quality(cfg, path, inf.model, inf.tokenizer, items, val)


def compare(cfg: RaylabConfig, parent_path: str, result_path: str) -> dict:
    """{parent: {...}, result: {...}, ratios: {...}, val, rouge_items, requests, max_new_tokens} for two local
    model directories (val: the split the eval loss is measured on)."""
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source) if storage.exists(run.manifest) else None
    items, val = measure.held_out(cfg, manifest), manifest.outputs.get("val") if manifest else None
    m = cfg.optimize.measure or MeasureConfig()
    memory = measure.peak_load_memory({"parent": parent_path, "result": result_path}) if m.memory else \
        {"parent": {}, "result": {}}
    split_tokenizer = manifest.tokenizer.get("fingerprint") if manifest else None
    parent = measure_model(cfg, parent_path, items, val, split_tokenizer) | memory["parent"]
    result = measure_model(cfg, result_path, items, val, split_tokenizer) | memory["result"]
    held = val or "none (no data stage output)"
    return {"parent": parent, "result": result, "ratios": measure.ratios(parent, result), "val": held,
            "rouge_items": len(items), "requests": m.requests, "max_new_tokens": m.max_new_tokens}


def gates_for(parent_gates: str, gates: GatesConfig) -> str:
    """The derived version's gates (JSON): its parent's, with this config's max_quality_drop and
    min_speedup where it sets them."""
    merged = json.loads(parent_gates or "{}")
    merged |= {k: getattr(gates, k) for k in GATE_KEYS if getattr(gates, k) is not None}
    return GatesConfig.model_validate(merged).model_dump_json(exclude_defaults=True)


def record(cfg: RaylabConfig, store: registry.Store, result: dict) -> dict:
    """Measure the registered result (run_optimize's dict) against its parent, once; tag the
    version, add the card section, write the run's report; returns the comparison."""
    ref = f"{result['name']}/{result['version']}"
    mv = registry.get_version(store, ref)
    if TAG in mv.tags:
        log.info(f"optimize: {ref} was measured when it was registered (tag {TAG})")
        return json.loads(mv.tags[TAG])
    parent_ref = result["derived_from"]
    parent = registry.get_version(store, parent_ref)
    compared = compare(cfg, registry.fetch(store, parent_ref), registry.fetch(store, ref))
    compared |= {"version": ref, "derived_from": parent_ref, "derivation": mv.tags.get("raylab.derivation", "")}
    tags = {TAG: json.dumps(compared), "raylab.gates": gates_for(parent.tags.get("raylab.gates", "{}"),
                                                                  cfg.registry.gates)}
    tags |= {f"{TAG}.{k}": f"{v:.6g}" for k, v in compared["ratios"].items()}
    registry.set_tags(store, result["name"], int(result["version"]), tags)
    registry.add_card_section(store, result["name"], int(result["version"]), CARD_SECTION, table(compared))
    write(runs.Run(cfg.output_dir), compared)
    r = compared["ratios"]
    log.info(f"optimize: {ref} against {parent_ref}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items())
             + f"; report -> {runs.Run(cfg.output_dir).optimize_file('report_md')}")
    return compared


def table(c: dict) -> str:
    """One result against its parent (Markdown)."""
    lines = [f"| metric | parent {c['derived_from']} | result {c['version']} | result / parent |", "|---|---|---|---|"]
    for label, key, fmt in ROWS:
        p, r = c["parent"].get(key), c["result"].get(key)
        if p is None and r is None:
            continue
        ratio = "" if not p or r is None else f"{r / p:.3f}x"
        lines.append(f"| {label} | {'' if p is None else fmt(p)} | {'' if r is None else fmt(r)} | {ratio} |")
    notes = [f"Speed: {c['requests']} requests of {c['max_new_tokens']} new tokens each, greedy, on this machine's "
             "CPU/GPU, one process (a ratio, not a served figure)",
             "Memory: " + ("the resident-set rise while loading, in a fresh process per model"
                           if "load_rss_bytes" in c["result"] else "not measured (optimize.measure.memory: false)")]
    has_loss, has_rouge = "eval_loss" in c["result"], "rouge_l" in c["result"]
    if "eval_loss" in c["parent"] and not has_loss:
        notes.append("Eval loss: not measured for the result, whose tokenizer is not the val split's (per-token "
                     "losses over different tokenizers are not comparable); ROUGE-L compares them")
    notes.append("Quality: " + ("; ".join(([f"eval loss on {c['val']}"] if has_loss else [])
                                          + ([f"ROUGE-L on {c['rouge_items']} held-out prompts"] if has_rouge else []))
                                or "not measured (no data stage output and no eval.held_out)"))
    if "quality_drop" in c["ratios"]:
        notes.append(f"Relative eval-loss increase (registry.gates.max_quality_drop): {c['ratios']['quality_drop']:+.4f}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def write(run: runs.Run, compared: dict) -> None:
    """Add (or replace) this result in optimize/report.json and rewrite report.md and report.png."""
    location = run.optimize_file("report")
    results = json.loads(storage.read_text(location))["results"] if storage.exists(location) else []
    results = [r for r in results if r["version"] != compared["version"]] + [compared]
    storage.write_text(location, json.dumps({"results": results}, indent=2) + "\n")
    storage.write_text(run.optimize_file("report_md"), markdown(results))
    chart(results, run.optimize_file("report_png"))


def markdown(results: list[dict]) -> str:
    lines = ["# Optimised versions against their parents", "",
             "Written by `raylab optimize` (raylab/optimize/report.py); the chart is report.png.", ""]
    for c in results:
        lines += [f"## {c['version']}: {c['derivation']} of {c['derived_from']}", "", table(c), ""]
    return "\n".join(lines)


CHART = (("size_ratio", "size"), ("parameter_ratio", "parameters"), ("memory_ratio", "load memory"),
         ("speedup_c1", "tokens/s c=1"), ("speedup_c16", "tokens/s c=16"))


def chart(results: list[dict], location: str) -> None:
    """Grouped bars: each result's ratios to its parent (1.0 = the parent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(CHART)), 4))
    width = 0.8 / max(1, len(results))
    for i, c in enumerate(results):
        values = [c["ratios"].get(key, 0.0) for key, _ in CHART]
        ax.bar([j + i * width for j in range(len(CHART))], values, width,
               label=f"{c['version']} ({c['derivation']})")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(CHART))], [label for _, label in CHART])
    ax.set_ylabel("result / parent")
    ax.set_title("Optimised versions against their parents")
    ax.legend(fontsize=8)
    fig.tight_layout()
    storage.save_figure(fig, location, dpi=100)
    plt.close(fig)
