"""Promotion gates: the model tests a version must pass before it may become production.

    raylab models evaluate acme-assistant 3     # run version 3's gates, record the result
    raylab models promote acme-assistant 3      # allowed only once they passed

The gates are `registry.gates` of the config that trained the version, stored with it at
registration (so editing a config later does not change what an old version had to pass):

    max_val_loss, max_perplexity   thresholds on the version's held-out split
    max_regression                 val loss may exceed the production version's, measured on
                                   the same held-out split, by at most this much
    golden                         prompts whose greedy answer must contain a string, match a
                                   regex, equal a text and/or be JSON valid under a schema
    pii_probe, refusal, latency    prompts whose answers must hold no personal data / must be
                                   refusals; a speed budget on the local engine (suites.py)
                                   (a remote version's prompts are asked of its provider's
                                   chat endpoint; remote_checks)
    min_recall_at_k, min_mrr       retrieval quality of the run's index, read from the report
                                   `raylab eval CONFIG --rag` wrote (<output_dir>/eval/rag.json)
    max_quality_drop, min_speedup  a version `raylab optimize` made: its held-out loss at most
                                   this share over its parent's (both measured here), its
                                   recorded tokens/s at concurrency 16 at least this times its
                                   parent's (raylab/optimize/report.py)
    max_bias_gap                   every counterfactual bias probe's gap at most this (the
                                   version's eval.bias_probes, else the shipped sets; bias.py),
                                   measured here; the table goes into the model card (also
                                   without the gate when the version's config sets eval.bias_probes)
    suites                         files with more of the above, read when the config is loaded

Both versions are loaded through `registry.fetch`, so checksums are verified first. The
result goes into version tags: `raylab.gates.status` (passed / failed), `raylab.gates.report`
(every check with its measured value), `raylab.gates.failures`, `eval.val_loss`, ...
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time

from raylab import config, models, registry
from raylab.config import GatesConfig
from raylab.core import cluster, events, runs, storage
from raylab.errors import UserError
from raylab.evaluate import batch, bias
from raylab.evaluate import suites as suites_

log = logging.getLogger(__name__)


def version_config(store: registry.Store, mv) -> config.RaylabConfig:
    """The resolved config the version was trained with (an artifact of its run); for a version
    `raylab optimize` derived (its run logs no config), that of the version it derives from,
    followed to the one that was trained: the same data, so the same held-out split."""
    from mlflow.artifacts import download_artifacts

    seen = set()
    while mv.tags.get("raylab.derived_from") and mv.tags.get("raylab.stage") == "optimize":
        seen.add(f"{mv.name}/{mv.version}")
        if mv.tags["raylab.derived_from"] in seen:
            raise UserError(f"{mv.name}/{mv.version}: raylab.derived_from {mv.tags['raylab.derived_from']} loops")
        mv = registry.get_version(store, mv.tags["raylab.derived_from"])
    with tempfile.TemporaryDirectory(prefix="raylab-gates-") as tmp:
        try:
            path = download_artifacts(run_id=mv.run_id, artifact_path=runs.RESOLVED_CONFIG, dst_path=tmp,
                                      tracking_uri=store.uri)
        except Exception as e:  # noqa: BLE001 - any failure here means the run lacks it
            raise UserError(f"{mv.name}/{mv.version}: its run {mv.run_id} has no {runs.RESOLVED_CONFIG} artifact ({e})") from None
        return config.load(path)


def evaluate_version(store: registry.Store, name: str, version: int, address: str | None = None,
                     suites: list[GatesConfig] = ()) -> dict:
    """Run the version's gates (and any extra `suites`, e.g. `--suite` files); returns
    {status, checks, ...} and records it as tags."""
    mv = registry.get_version(store, f"{name}/{version}")
    gates = GatesConfig.model_validate_json(mv.tags.get("raylab.gates", "{}"))
    cfg = version_config(store, mv)
    if registry.remote_of(mv) is not None:
        production = store.client.get_registered_model(name).aliases.get(registry.PRODUCTION)
        others = production is not None and int(production) != version
        return _record(store, mv, cfg, *remote_checks([gates, *suites], mv, cfg, others),
                       held_out="the provider's")
    manifest = runs.read_manifest(runs.Run(cfg.output_dir), cfg.source)  # a trial's points at its sweep's
    val = manifest.outputs["val"]
    if not storage.exists(val):
        raise UserError(f"{name}/{version}: its held-out split {val} is gone; re-run `raylab data` for "
                        f"{cfg.source} (same inputs give the same split)")
    path = registry.fetch(store, f"{name}/{version}")
    cluster.connect(cfg, address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    foreign = _foreign_tokenizer(mv, path, manifest)
    if foreign:
        measured = {"loss": None, "perplexity": None}
        checks = [_unmeasurable(key, getattr(gates, key), foreign) for key in _LOSS_GATES
                  if getattr(gates, key) is not None]
        checks += derived_checks(gates.model_copy(update={"max_quality_drop": None}), mv.tags, None, None)
    else:
        measured = batch.held_out_loss(cfg, path, val)
        checks = _loss_checks(store, cfg, mv, gates, measured, val)
    every = [gates, *suites]
    cases = [c for g in every for c in suites_.prompt_cases(g, lambda n: _training_probes(cfg, n))]
    for budget in sorted({c.max_new_tokens for c in cases}):
        batch_cases = [c for c in cases if c.max_new_tokens == budget]
        outputs = batch.answers(cfg, path, path, [c.asked for c in batch_cases], max_new_tokens=budget)
        checks += [suites_.judge(c, out) for c, out in zip(batch_cases, outputs, strict=True)]
    for budget in (b for g in every for b in g.latency):
        checks += suites_.latency_checks(budget, suites_.measure_latency(path, budget, max(1, int(cfg.eval.cpus_per_actor))))
    checks += [c for g in every for c in rag_checks(g, cfg.output_dir)]
    bias_table = None
    limits = [g.max_bias_gap for g in every if g.max_bias_gap is not None]
    if limits or cfg.eval.bias_probes is not None:  # with eval.bias_probes and no gate: measured for the card
        probes = cfg.eval.bias_probes or config.BiasProbesConfig()
        bias_table = bias.measure_path(path, probes, threads=max(1, int(cfg.eval.cpus_per_actor)),
                                       batch_size=cfg.eval.batch_size)
    if limits:
        checks.append(bias.gate_check(bias_table, min(limits)))  # a suite may be stricter than the config
    return _record(store, mv, cfg, checks, measured, bias_table, held_out=val)


def _record(store: registry.Store, mv, cfg: config.RaylabConfig, checks: list[dict], measured: dict,
            bias_table: dict | None, held_out: str) -> dict:
    """The result as version tags, the card refreshed, the event, the log lines."""
    name, version = mv.name, int(mv.version)
    failures = [c for c in checks if not c["passed"]]
    status = "failed" if failures else "passed"
    result = {"name": name, "version": version, "status": status, "checks": checks, "val_loss": measured["loss"],
              "perplexity": measured["perplexity"], "held_out": held_out,
              "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": registry.user()}
    registry.set_tags(store, name, version, {
        "raylab.gates.status": status, "raylab.gates.report": json.dumps(result)[:90_000],
        "raylab.gates.failures": "; ".join(suites_.describe(c) for c in failures)[:5000],
    } | ({"eval.val_loss": f"{measured['loss']:.6g}", "eval.perplexity": f"{measured['perplexity']:.6g}"}
         if measured["loss"] is not None else {}))
    if bias_table is not None:  # the card shows the gates just measured and the bias table behind max_bias_gap
        registry.add_card_section(store, name, version, bias.CARD_SECTION, bias.markdown({"version": bias_table}))
    else:
        registry.refresh_card(store, name, version)  # the model card shows the gates just measured
    # In the run that registered the version (a sweep's, not its winning trial's directory).
    run = registry.version_run(mv) or cfg.output_dir
    events.emit("registry.gate", run=run, model=name, version=version, status=status,
                failures=[suites_.describe(c) for c in failures], val_loss=measured["loss"])
    for c in checks:
        log.info(f"gates: {'pass' if c['passed'] else 'FAIL'}  {suites_.describe(c)}")
    if not checks:
        log.info("gates: none declared (registry.gates in the config): the version passes by default")
    log.info(f"gates: {name}/{version} {status.upper()}")
    return result


# The gates that score the version's per-token loss on the held-out split.
_LOSS_GATES = ("max_val_loss", "max_perplexity", "max_regression", "max_quality_drop")


def _foreign_tokenizer(mv, path: str, manifest: runs.DataManifest) -> str | None:
    """Why the held-out loss cannot be measured for a version `raylab optimize` derived with
    another tokenizer than the one the split was encoded with (a student distilled at sequence
    level), else None: its per-token loss on those ids would mean nothing."""
    if not mv.tags.get("raylab.derived_from"):  # trained on this split: its tokenizer encoded it
        return None
    if models.fingerprint(models.load_saved_tokenizer(path))["fingerprint"] == manifest.tokenizer.get("fingerprint"):
        return None
    return ("not measurable: this version's tokenizer is not the one its held-out split was encoded with (a "
            "student distilled at sequence level), and per-token losses over different tokenizers are not "
            "comparable; gate it with prompt checks (golden, pii, refusal) or leave the loss gates out")


def _loss_checks(store: registry.Store, cfg: config.RaylabConfig, mv, gates: GatesConfig, measured: dict,
                 val: str) -> list[dict]:
    """max_val_loss, max_perplexity, max_regression (against production, measured now on the
    same split) and the derived checks (max_quality_drop against the parent, min_speedup)."""
    name, version = mv.name, int(mv.version)
    checks = []
    if gates.max_val_loss is not None:
        checks.append(_check("max_val_loss", measured["loss"], gates.max_val_loss, measured["loss"] <= gates.max_val_loss))
    if gates.max_perplexity is not None:
        checks.append(_check("max_perplexity", measured["perplexity"], gates.max_perplexity,
                             measured["perplexity"] <= gates.max_perplexity))
    production = store.client.get_registered_model(name).aliases.get(registry.PRODUCTION)
    if (gates.max_regression is not None and production is not None and int(production) != version
            and registry.remote_of(registry.get_version(store, f"{name}/{production}")) is not None):
        checks.append(_unmeasurable("max_regression", gates.max_regression, f"production ({name}/{production}) is a "
                                    "remote version: its loss on this held-out split cannot be measured here"))
    elif gates.max_regression is not None and production is not None and int(production) != version:
        prod = batch.held_out_loss(cfg, registry.fetch(store, f"{name}/{production}"), val)
        limit = prod["loss"] + gates.max_regression
        checks.append(_check("max_regression", measured["loss"], limit, measured["loss"] <= limit,
                             production_version=int(production), production_val_loss=prod["loss"]))
    parent_ref = mv.tags.get("raylab.derived_from")
    parent_loss = None
    if gates.max_quality_drop is not None and parent_ref:  # the parent on the same split, now, by the same scorer
        parent_loss = batch.held_out_loss(cfg, registry.fetch(store, parent_ref), val)["loss"]
    return checks + derived_checks(gates, mv.tags, measured["loss"], parent_loss)


# Gates that need the weights (generation, raylab's own held-out scorer, the local engine's
# speed, bias probes' log-probabilities); on a remote version each one that is set fails as not
# measurable, never passes by default. max_quality_drop and min_speedup judge a version
# `raylab optimize` derived against its parent, which a remote version never is: not
# applicable, as for any version trained here.
_NEED_WEIGHTS = ("latency", "max_bias_gap")  # a provider's latency is not the model's; bias needs log-probs


def remote_checks(every: list[GatesConfig], mv, cfg: config.RaylabConfig, production_elsewhere: bool = False
                  ) -> tuple[list[dict], dict, None]:
    """A remote version's gates: the loss thresholds on the provider's reported validation loss
    (its last `metrics` event with valid_loss; the version's metric.val_loss tag); the golden,
    PII and refusal prompts asked of the provider's chat endpoint under the version's model
    name (greedy, as here) and judged as for any version; the index's retrieval gates as for
    any version; the latency and bias gates failed as not measurable here (max_regression
    too, when another version is production: the same scorer cannot run on both)."""
    reported = mv.tags.get("metric.val_loss")
    loss = float(reported) if reported not in (None, "None", "nan") else None
    measured = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if loss is not None else None}
    checks = []
    for g in every:
        for key, value in (("max_val_loss", measured["loss"]), ("max_perplexity", measured["perplexity"])):
            limit = getattr(g, key)
            if limit is not None and value is not None:
                checks.append(_check(key, value, limit, value <= limit, source="the provider's validation loss"))
            elif limit is not None:
                checks.append(_unmeasurable(key, limit, "the provider reported no validation loss (the job had no "
                                                        "validation file: train.remote.validation, or a val split)"))
        if g.max_regression is not None and production_elsewhere:
            checks.append(_unmeasurable("max_regression", g.max_regression, "not measurable for a remote version: "
                                        "production's loss and the provider's come from different scorers"))
        for key in _NEED_WEIGHTS:
            limit = getattr(g, key)
            if limit not in (None, [], ()):
                checks.append(_unmeasurable(key, limit if isinstance(limit, float) else f"{len(limit)} set",
                                            "not measurable for a remote version: its weights are at the provider"))
        checks += rag_checks(g, cfg.output_dir)
    cases = [c for g in every for c in suites_.prompt_cases(g, lambda n: _training_probes(cfg, n))]
    return checks + _asked_of_provider(cfg, registry.remote_of(mv).get("model"), cases), measured, None


def _asked_of_provider(cfg: config.RaylabConfig, model: str, cases: list) -> list[dict]:
    """The prompt gates' checks, each answer asked of the provider's chat endpoint (temperature
    0, the case's token budget). A prompt item is a user turn (the chat template renders it so
    here too) or a conversation. Once the provider fails a request (no chat for this model,
    unreachable, a refused key), it and every later case fail as not measurable, naming why."""
    if not cases:
        return []
    from raylab.train import remote_client, remote_url

    api, out = remote_client(cfg), []  # exit 2 naming train.remote.api_key when its variable is unset
    import openai  # remote_client checked it is installed

    why = None if model else "the version records no provider model name (raylab.remote.model)"
    for case in cases:
        item, reason = case.asked, why
        if reason is None and "text" in item:  # a raw continuation: a chat turn would be another probe
            reason = "a completion-style probe cannot be asked of a chat endpoint"
        if reason is None:
            messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
            try:
                answer = api.chat.completions.create(model=model, messages=messages, temperature=0,
                                                     max_tokens=case.max_new_tokens)
                if answer.choices:
                    out.append(suites_.judge(case, (answer.choices[0].message.content or "").strip()))
                    continue
                reason = why = f"the provider's chat endpoint ({remote_url(cfg)}) answered {model} with no choices"
            except openai.APIError as e:
                reason = why = f"the provider's chat endpoint ({remote_url(cfg)}) did not answer {model}: {e}"
        out.append(suites_.check(case.gate, None, case.spec.suite or case.gate, False, reason, name=case.prompt,
                                 prompt=case.prompt, suite=case.spec.suite or case.gate, unmeasurable=True))
    return out


def derived_checks(gates: GatesConfig, tags: dict[str, str], val_loss: float | None,
                   parent_val_loss: float | None) -> list[dict]:
    """max_quality_drop and min_speedup of a version `raylab optimize` made (tags: its version
    tags; a version derived from nothing gets neither check). max_quality_drop: the relative
    held-out loss increase over the parent's (both measured by the caller on one split);
    min_speedup: the tokens/s ratio at concurrency 16 `raylab optimize` recorded
    (raylab.measure.speedup_c16): speed is measured once, where the result was made, not here."""
    parent = tags.get("raylab.derived_from")
    if not parent:
        return []
    out = []
    if gates.max_quality_drop is not None:
        if val_loss is None or not parent_val_loss:
            out.append(suites_.check("max_quality_drop", None, gates.max_quality_drop, False,
                                     f"no held-out loss of {parent} to compare with", name="max_quality_drop",
                                     suite="optimize", parent=parent))
        else:
            drop = (val_loss - parent_val_loss) / parent_val_loss
            out.append(suites_.check("max_quality_drop", drop, gates.max_quality_drop, drop <= gates.max_quality_drop,
                                     f"eval loss {val_loss:.4f} is {drop:+.2%} over {parent}'s {parent_val_loss:.4f}, "
                                     f"more than the limit {gates.max_quality_drop:.2%}", name="max_quality_drop",
                                     suite="optimize", parent=parent, parent_val_loss=parent_val_loss))
    if gates.min_speedup is not None:
        recorded = tags.get("raylab.measure.speedup_c16")
        if recorded is None:
            out.append(suites_.check("min_speedup", None, gates.min_speedup, False,
                                     "no recorded speed-up (raylab.measure.speedup_c16): the version was registered "
                                     "without `raylab optimize`'s measurements; re-run it", name="min_speedup",
                                     suite="optimize", parent=parent))
        else:
            value = float(recorded)
            out.append(suites_.check("min_speedup", value, gates.min_speedup, value >= gates.min_speedup,
                                     f"tokens/s at concurrency 16 {value:.3f}x {parent}'s, under the limit "
                                     f"{gates.min_speedup:.3f}x", name="min_speedup", suite="optimize",
                                     parent=parent))
    return out


def rag_checks(gates: GatesConfig, output_dir: str) -> list[dict]:
    """min_recall_at_k / min_mrr against the run's `raylab eval --rag` report; with a gate set
    and no report, the gate fails saying how to make one (retrieval is not measured here:
    evaluate may not import rag, a sibling stage)."""
    wanted = [(name, field, limit) for name, field, limit in (("min_recall_at_k", "recall_at_k", gates.min_recall_at_k),
                                                               ("min_mrr", "mrr", gates.min_mrr)) if limit is not None]
    if not wanted:
        return []
    location = runs.Run(output_dir).eval_file("rag")
    if not storage.exists(location):
        return [suites_.check(name, None, limit, False, f"no retrieval report at {location}: run `raylab eval CONFIG "
                              "--rag` (index.eval: questions) first", name=name, suite="retrieval")
                for name, _, limit in wanted]
    report = runs.read_json(location, runs.RagEvalReport)
    out, label = [], {"recall_at_k": f"recall@{report.k}", "mrr": f"MRR@{report.k}"}
    for name, field, limit in wanted:
        value = getattr(report, field)
        out.append(suites_.check(name, value, limit, value >= limit,
                                 f"{label[field]} {value:.4f} is under {limit:.4f} "
                                 f"({report.count} questions in {report.questions})",
                                 name=name, suite="retrieval", k=report.k, report=location))
    return out


def _training_probes(cfg: config.RaylabConfig, n: int) -> list[dict]:
    """PII probes from the version's training records (the data stage's records/)."""
    manifest = runs.read_manifest(runs.Run(cfg.output_dir), cfg.source)
    location = manifest.outputs.get("records") or runs.Run(cfg.output_dir).split("records")
    if not storage.exists(location):
        raise UserError(f"pii_probe.from_training_data: the version's training records {location} are gone; "
                        f"re-run `raylab data` for {cfg.source}")
    rows = storage.read_table(location, columns=["record_id", "format", "text", "messages", "split"]).to_pylist()
    return suites_.training_probes(rows, n)


def _unmeasurable(name: str, limit, why: str) -> dict:
    """A gate that is set but cannot be measured: failed (suites.describe prints `why`)."""
    return suites_.check(name, None, limit, False, why, name=name, suite="metrics", unmeasurable=True)


def _check(name: str, value, limit, passed: bool, **extra) -> dict:
    what = f"{value:.4f} over the limit {limit:.4f}"
    return suites_.check(name, value, limit, passed, what, name=name, suite="metrics", **extra)
