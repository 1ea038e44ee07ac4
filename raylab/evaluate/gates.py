"""Promotion gates: the model tests a version must pass before it may become production.

    raylab models evaluate acme-assistant 3     # run version 3's gates, record the result
    raylab models promote acme-assistant 3      # allowed only once they passed

The gates are `registry.gates` of the config that trained the version, stored with it at
registration (so editing a config later does not change what an old version had to pass):

    max_val_loss, max_perplexity   thresholds on the version's held-out split
    max_regression                 val loss may exceed the production version's, measured on
                                   the same held-out split, by at most this much
    golden                         prompts whose greedy answer must contain a string and/or
                                   match a regex

Both versions are loaded through `registry.fetch`, so checksums are verified first. The
result goes into version tags: `raylab.gates.status` (passed / failed), `raylab.gates.report`
(every check with its measured value), `raylab.gates.failures`, `eval.val_loss`, ...
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time

from raylab import config, registry
from raylab.config import GatesConfig
from raylab.core import cluster, events, runs, storage
from raylab.errors import UserError
from raylab.evaluate import batch

log = logging.getLogger(__name__)


def version_config(store: registry.Store, mv) -> config.RaylabConfig:
    """The resolved config the version was trained with (an artifact of its run)."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory(prefix="raylab-gates-") as tmp:
        try:
            path = download_artifacts(run_id=mv.run_id, artifact_path=runs.RESOLVED_CONFIG, dst_path=tmp,
                                      tracking_uri=store.uri)
        except Exception as e:  # noqa: BLE001 - any failure here means the run lacks it
            raise UserError(f"{mv.name}/{mv.version}: its run {mv.run_id} has no {runs.RESOLVED_CONFIG} artifact ({e})") from None
        return config.load(path)


def evaluate_version(store: registry.Store, name: str, version: int, address: str | None = None) -> dict:
    """Run the version's gates; returns {status, checks, ...} and records it as tags."""
    mv = registry.get_version(store, f"{name}/{version}")
    gates = GatesConfig.model_validate_json(mv.tags.get("raylab.gates", "{}"))
    cfg = version_config(store, mv)
    val = runs.read_manifest(runs.Run(cfg.output_dir), cfg.source).outputs["val"]  # a trial's points at its sweep's
    if not storage.exists(val):
        raise UserError(f"{name}/{version}: its held-out split {val} is gone; re-run `raylab data` for "
                        f"{cfg.source} (same inputs give the same split)")
    path = registry.fetch(store, f"{name}/{version}")
    cluster.connect(cfg, address)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    measured = batch.held_out_loss(cfg, path, val)
    checks = []
    if gates.max_val_loss is not None:
        checks.append(_check("max_val_loss", measured["loss"], gates.max_val_loss, measured["loss"] <= gates.max_val_loss))
    if gates.max_perplexity is not None:
        checks.append(_check("max_perplexity", measured["perplexity"], gates.max_perplexity,
                             measured["perplexity"] <= gates.max_perplexity))
    production = store.client.get_registered_model(name).aliases.get(registry.PRODUCTION)
    if gates.max_regression is not None and production is not None and int(production) != version:
        prod = batch.held_out_loss(cfg, registry.fetch(store, f"{name}/{production}"), val)
        limit = prod["loss"] + gates.max_regression
        checks.append(_check("max_regression", measured["loss"], limit, measured["loss"] <= limit,
                             production_version=int(production), production_val_loss=prod["loss"]))
    for budget in sorted({g.max_new_tokens for g in gates.golden}):
        golden = [g for g in gates.golden if g.max_new_tokens == budget]
        outputs = batch.answers(cfg, path, path, [{"prompt": g.prompt} for g in golden], max_new_tokens=budget)
        for g, out in zip(golden, outputs, strict=True):
            ok = (g.contains is None or g.contains in out) and (g.regex is None or re.search(g.regex, out) is not None)
            checks.append(_check("golden", out, {"contains": g.contains, "regex": g.regex}, ok, prompt=g.prompt))
    failures = [c for c in checks if not c["passed"]]
    status = "failed" if failures else "passed"
    result = {"name": name, "version": version, "status": status, "checks": checks, "val_loss": measured["loss"],
              "perplexity": measured["perplexity"], "held_out": val,
              "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": registry.user()}
    registry.set_tags(store, name, version, {
        "raylab.gates.status": status, "raylab.gates.report": json.dumps(result)[:90_000],
        "raylab.gates.failures": "; ".join(_describe(c) for c in failures)[:5000],
        "eval.val_loss": f"{measured['loss']:.6g}", "eval.perplexity": f"{measured['perplexity']:.6g}",
    })
    # In the run that registered the version (a sweep's, not its winning trial's directory).
    run = registry.version_run(mv) or cfg.output_dir
    events.emit("registry.gate", run=run, model=name, version=version, status=status,
                failures=[_describe(c) for c in failures], val_loss=measured["loss"])
    for c in checks:
        log.info(f"gates: {'pass' if c['passed'] else 'FAIL'}  {_describe(c)}")
    if not checks:
        log.info("gates: none declared (registry.gates in the config): the version passes by default")
    log.info(f"gates: {name}/{version} {status.upper()}")
    return result


def _check(name: str, value, limit, passed: bool, **extra) -> dict:
    return {"gate": name, "value": value, "limit": limit, "passed": bool(passed), **extra}


def _describe(c: dict) -> str:
    if c["gate"] == "golden":
        return f"golden {c['prompt']!r:.60}: answer {c['value']!r:.80} must match {json.dumps(c['limit'])}"
    extra = f" (production v{c['production_version']}: {c['production_val_loss']:.4f})" if "production_version" in c else ""
    return f"{c['gate']}: {c['value']:.4f} <= {c['limit']:.4f}{extra}"

