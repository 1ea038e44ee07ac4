"""`raylab eval CONFIG [--model REF] [--input FILE]`: batch inference with Ray Data.

    raylab eval configs/quickstart.yaml                                 # base vs this run's model
    raylab eval configs/quickstart.yaml --model acme-assistant@production
    raylab eval configs/quickstart.yaml --input prompts.jsonl           # answer your own prompts

Each model is held by an actor pool (`map_batches` with a class: one load per actor,
`eval.actors` of them). Over the data stage's held-out split it measures loss and
perplexity on the packed sequences (the same numbers training reports as val_loss), and
answers up to `eval.max_samples` held-out instruction/chat records greedily, scoring the
answers against the reference turn with exact match and ROUGE-L. The base model is run with
the tuned model's tokenizer, so both see identical prompts.

`--input` is offline batch inference: a JSONL file of `{"prompt": ...}`, `{"messages":
[...]}` or `{"text": ...}` rows (an optional `"reference"` is scored).

With `eval.bias_probes` it also runs the counterfactual bias probes on both models in this
process (evaluate/bias.py) and prints their table; evaluating a registry version (`--model
REF`) adds that table to the version's model card. With `eval.global_explanation` it explains
the tuned model's answers to a sample of the prompts (evaluate/explanations.py: which prompt
parts and positions carry them, eval/global_explanation.json and .png); for a registry version
the card's Explanations section links it, the bias table and the sweep's importance.

Writes `<output_dir>/eval/report.json`, `report.md` (metrics, the bias table, the global
explanation, side-by-side answers) and `predictions.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

import numpy as np

from raylab import explain, models, registry
from raylab.config import RaylabConfig
from raylab.core import cluster, events, runs, storage
from raylab.errors import UserError
from raylab.evaluate import bias, explanations

# ---------------------------------------------------------------- scores

log = logging.getLogger(__name__)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised words."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- actor-pool UDFs


class LossScorer:
    """Summed token loss and target count per batch of packed sequences."""

    def __init__(self, path: str, base: bool, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = models.load(path, base=base).model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from raylab.train import attn_impl_of, forward_sums

        tensors = {k: torch.from_numpy(np.stack(batch[k]).astype(np.int64))
                   for k in ("input_ids", "labels", "segment_ids", "position_ids")}
        with torch.inference_mode():
            sums = forward_sums(self.model, tensors, attn_impl_of(self.model), accuracy=False)
        return {"loss_sum": np.array([float(sums.loss)]), "targets": np.array([sums.targets])}


class Answerer:
    """Greedy answers for rows holding a JSON prompt item (see raylab/models/generate.py)."""

    def __init__(self, path: str, tokenizer_path: str, base: bool, max_new_tokens: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        inf = models.load(path, tokenizer_path=tokenizer_path, base=base)
        self.model, self.tok = inf.model, inf.tokenizer
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [models.prompt_ids(self.tok, json.loads(item)) for item in batch["item"]]
        batch["output"] = np.array(models.greedy(self.model, self.tok, prompts, self.max_new_tokens), dtype=object)
        return batch


def _pool(cfg: RaylabConfig) -> dict[str, Any]:
    import ray

    e = cfg.eval
    return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=e.actors), "num_cpus": e.cpus_per_actor,
            "batch_size": e.batch_size}


def _threads(cfg: RaylabConfig) -> int:
    return max(1, int(cfg.eval.cpus_per_actor))


def held_out_loss(cfg: RaylabConfig, path: str, val_location: str, base: bool = False) -> dict[str, float]:
    """Loss and perplexity of a model over packed held-out sequences (Parquet)."""

    scored = storage.read_parquet(val_location).map_batches(
        LossScorer, fn_constructor_kwargs={"path": path, "base": base, "threads": _threads(cfg)}, **_pool(cfg))
    loss_sum, targets = 0.0, 0
    for row in scored.iter_rows():
        loss_sum += row["loss_sum"]
        targets += int(row["targets"])
    if targets == 0:
        raise UserError(f"{val_location}: no target tokens in the held-out split; re-run `raylab data` with "
                        "data.val_fraction > 0")
    loss = loss_sum / targets
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": targets}


def answers(cfg: RaylabConfig, path: str, tokenizer_path: str, items: list[dict], base: bool = False,
            max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to prompt items, in order."""
    import ray

    if not items:
        return []
    rows = [{"i": i, "item": json.dumps(item)} for i, item in enumerate(items)]
    kwargs = {"path": path, "tokenizer_path": tokenizer_path, "base": base, "threads": _threads(cfg),
              "max_new_tokens": max_new_tokens or cfg.eval.max_new_tokens}
    out = ray.data.from_items(rows).map_batches(Answerer, fn_constructor_kwargs=kwargs, **_pool(cfg))
    by_index = {int(r["i"]): r["output"] for r in out.iter_rows()}
    return [by_index[i] for i in range(len(items))]


# ---------------------------------------------------------------- inputs


def held_out_items(cfg: RaylabConfig, manifest: runs.DataManifest, split: str = "val") -> list[dict]:
    """Up to eval.max_samples held-out instruction/chat records as {messages, reference, id}:
    the conversation up to its last assistant turn, and that turn (`split="train"`: records the
    model was trained on, for a recall check)."""
    records = manifest.outputs.get("records") or runs.Run(cfg.output_dir).split("records")
    return record_prompts(records, split, None, cfg.eval.max_samples)


def record_prompts(records: str, split: str, prompt_words: int | None, limit: int | None) -> list[dict]:
    """The split's records (the data stage's records table at `records`) as prompts with their
    references, by record id, at most `limit`: a chat or instruction record's conversation up to
    its last assistant turn, {id, messages, reference: that turn}; with `prompt_words`, a
    completion record's first that many words too, {id, text, reference: the rest} (a record of
    no more words than that is left out: nothing to continue)."""
    table = storage.read_table(records, columns=["record_id", "format", "text", "messages", "split"])
    items: list[dict] = []
    for row in sorted(table.to_pylist(), key=lambda r: r["record_id"]):
        if row["split"] != split:
            continue
        if row["format"] in ("instruction", "chat") and row["messages"]:
            messages = json.loads(row["messages"])
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if not last:  # no assistant turn, or nothing before it to answer
                continue
            items.append({"id": row["record_id"], "messages": messages[:last], "reference": messages[last]["content"]})
        elif prompt_words is not None and row["text"]:
            words = row["text"].split()
            if len(words) <= prompt_words:
                continue
            items.append({"id": row["record_id"], "text": " ".join(words[:prompt_words]),
                          "reference": " ".join(words[prompt_words:])})
        if len(items) == limit:
            break
    return items


def read_input(location: str, what: str = "--input") -> list[dict]:
    """Prompt rows of a JSONL file; every bad line is reported at once (exit 2), under `what`
    (the flag or config key that named the file)."""
    if not storage.exists(location):
        raise UserError(f"{what} {location}: file not found")
    items, problems = [], []
    for n, line in enumerate(storage.read_text(location).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(item, dict) or not any(k in item for k in ("messages", "prompt", "text")):
            problems.append(f"line {n}: expected an object with 'messages', 'prompt' or 'text'")
            continue
        if "messages" in item:
            try:
                models.check_messages(item["messages"], f"line {n}")
            except UserError as e:
                problems.append(str(e))
                continue
        items.append({"id": str(item.get("id", n)), **item})
    if problems or not items:
        raise UserError(f"{what} {location}: " + ("; ".join(problems[:20]) if problems else "no prompts in the file"))
    return items


# ---------------------------------------------------------------- the stage


def tuned_model(cfg: RaylabConfig, ref: str | None) -> tuple[str, str]:
    """(label, local directory) of the model to evaluate: a registry REF (checksums checked),
    else this run's train/final/, else its sweep's winner."""
    if ref:
        return ref, registry.fetch(registry.open_store(cfg), ref)
    run = runs.Run(cfg.output_dir)
    candidates = [run.train_final]
    best = run.tune_file("results")
    if storage.exists(best):
        top = runs.read_json(best, runs.SweepResult).results
        candidates += [r["final_model"] for r in top if r.get("final_model")][:1]
    for c in candidates:
        if storage.exists(runs.model_file(c, runs.TRAIN_META)):
            if "://" in c:
                raise UserError(f"{c}: evaluating a model in remote storage needs it registered; pass --model NAME@ALIAS")
            return c, c
    raise UserError(f"no trained model in {cfg.output_dir}: run `raylab train CONFIG` (or `raylab tune`) first, "
                    "or pass --model NAME@ALIAS")


def score(predictions: list[str], items: list[dict]) -> dict[str, float | int]:
    pairs = [(p, it["reference"]) for p, it in zip(predictions, items, strict=True) if isinstance(it.get("reference"), str)]
    if not pairs:
        return {"scored": 0}
    return {"exact_match": sum(exact_match(p, r) for p, r in pairs) / len(pairs),
            "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / len(pairs), "scored": len(pairs)}


def run_eval(cfg: RaylabConfig, model_ref: str | None = None, input_path: str | None = None,
             address: str | None = None) -> dict:
    """Evaluate the base model and the tuned one; returns the report (also written to eval/)."""
    with events.stage("eval", run=cfg.output_dir, model_ref=model_ref, input=input_path):
        return _run_eval(cfg, model_ref, input_path, address)


def _run_eval(cfg: RaylabConfig, model_ref: str | None, input_path: str | None, address: str | None) -> dict:
    label, path = tuned_model(cfg, model_ref)
    cluster.connect(cfg, address)
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    started = time.time()
    manifest = None if input_path else runs.read_manifest(runs.Run(cfg.output_dir), cfg.source)
    items = read_input(input_path) if input_path else held_out_items(cfg, manifest)
    report: dict[str, Any] = {"config": cfg.source, "model": label, "model_path": path,
                              "base_model": models.base_of(path) if models.is_adapter(path) else models.trained_from(path),
                              "input": input_path or "held-out split", "models": {}}
    outputs = {}
    for name, base in (("base", True), ("tuned", False)):
        entry: dict[str, Any] = {}
        if manifest:
            entry |= held_out_loss(cfg, path, manifest.outputs["val"], base=base)
        outputs[name] = answers(cfg, path, path, items, base=base)
        entry |= score(outputs[name], items)
        report["models"][name] = entry
        log.info(f"eval: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in entry.items()))
    report["samples"] = [{"id": it["id"], "prompt": it.get("messages") or it.get("prompt") or it.get("text"),
                          "reference": it.get("reference"), **{m: outputs[m][i] for m in outputs}}
                         for i, it in enumerate(items)]
    if cfg.eval.bias_probes is not None:
        report["bias"] = {name: bias.measure_path(path, cfg.eval.bias_probes, base=base, threads=_threads(cfg),
                                                  batch_size=cfg.eval.batch_size)
                          for name, base in (("base", True), ("tuned", False))}
        for line in bias.summary_lines(report["bias"]):
            log.info(f"eval: {line}")
    if cfg.eval.global_explanation is not None:
        report["global_explanation"] = explanations.run_global(cfg, path, items, label)
    report["seconds"] = round(time.time() - started, 1)
    typed = runs.EvalReport.model_validate(report)
    write_report(runs.Run(cfg.output_dir), typed, cfg.eval.show_samples)
    if typed.bias and model_ref:  # a registry version: its card holds the table (a local final/ has no card)
        store = registry.open_store(cfg)
        mv = registry.get_version(store, model_ref)
        registry.add_card_section(store, mv.name, int(mv.version), bias.CARD_SECTION, bias.markdown(typed.bias))
        log.info(f"eval: bias table added to the model card of {mv.name}/{mv.version}")
    if model_ref and (typed.bias or typed.global_explanation):
        explanations.add_to_card(cfg, registry.open_store(cfg), model_ref, typed.global_explanation, typed.bias)
    log.info(f"eval: report -> {runs.Run(cfg.output_dir).eval_file('report_md')}")
    return typed.model_dump(mode="json")


def write_report(run: runs.Run, report: runs.EvalReport, show_samples: int) -> None:
    runs.write_json(run.eval_file("report"), report)
    storage.write_text(run.eval_file("predictions"), "".join(json.dumps(s) + "\n" for s in report.samples))
    storage.write_text(run.eval_file("report_md"), markdown(report.model_dump(mode="json"), show_samples))


def markdown(report: dict, show: int) -> str:
    models = list(report["models"])
    keys = sorted({k for m in models for k in report["models"][m]})
    lines = [f"# Evaluation of {report['model']}", "", f"Base model: `{report['base_model']}`; input: "
             f"{report['input']}; {len(report['samples'])} prompts.", "", "| metric | " + " | ".join(models) + " |",
             "|---|" + "---|" * len(models)]
    for k in keys:
        cells = [report["models"][m].get(k) for m in models]
        lines.append(f"| {k} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
    if report.get("bias"):
        lines += ["", "## Bias probes", "", bias.markdown(report["bias"])]
    if report.get("global_explanation"):
        lines += ["", "## Global explanation", "", explain.global_markdown(report["global_explanation"]), "",
                  "![where the answers come from](global_explanation.png)"]
    lines += ["", "## Sample answers", ""]
    for s in report["samples"][:show]:
        prompt = s["prompt"][-1]["content"] if isinstance(s["prompt"], list) else s["prompt"]
        lines += [f"**{s['id']}**: {prompt}", ""]
        if s.get("reference") is not None:
            lines.append(f"- reference: {s['reference']}")
        lines += [f"- {m}: {s[m]}" for m in models] + [""]
    return "\n".join(lines)
