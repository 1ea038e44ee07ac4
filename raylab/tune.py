"""Tune stage: `raylab tune CONFIG` sweeps hyperparameters over full train-stage runs.

    raylab data configs/quickstart.yaml
    raylab tune configs/quickstart.yaml                  # resumes a sweep that was interrupted
    raylab train <output_dir>/tune/best.yaml             # the winner again, as a plain train run

The search space is `tune.search_space`, dotted config keys (`train.lr: {loguniform: [1e-5,
1e-3]}`, `model.lora.r: {choice: [4, 8, 16]}`, `randint: [lo, hi)`), each value checked
against the config schema before anything runs. Each trial is `raylab.train.run_train` (Ray
Train, any number of workers) in `<output_dir>/tune/trials/<trial id>/`, driven by a small
Tune function trainable; `TuneReportCallback` forwards the trial's reports (every one
carries `val_loss`) to Tune. Search: `OptunaSearch` with a seeded TPE sampler
(`tune.searcher: random` for Optuna's random sampler), its study kept in
`<output_dir>/tune/study.db` (SQLite) for local run directories; `ConcurrencyLimiter` at the
trial concurrency the resource plan computes; ASHA on val loss with `time_attr=step`
(optimizer steps; put `tune.asha.grace_period` at or after an evaluation step). A failing
trial is recorded with its error and the sweep goes on; running the command again after
the driver died resumes the sweep (`Tuner.restore`), finished trials kept.

Outputs in `<output_dir>/tune/`: results.csv / results.json (ranked), best.yaml (the
winner's fully resolved config: re-runnable as is, it trains in `<output_dir>/train`),
importance.json + importance.png (Optuna's PED-ANOVA), partial_dependence.json +
partial_dependence.png (a kernel-ridge surrogate fitted over the finished trials, since
Optuna has no partial-dependence plot), slice.png (Optuna's slice plot).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from typing import Any

import yaml

from raylab import cluster, config, overrides, storage, train
from raylab.config import RaylabConfig, SearchDim
from raylab.errors import UserError

# ---------------------------------------------------------------- the search space


def _encode(value: Any) -> Any:
    """Optuna choices must be scalars: a list or mapping choice travels as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def distributions(space: dict[str, SearchDim]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in space.items():
        if dim.loguniform:
            out[key] = FloatDistribution(*dim.loguniform, log=True)
        elif dim.uniform:
            out[key] = FloatDistribution(*dim.uniform)
        elif dim.randint:
            out[key] = IntDistribution(dim.randint[0], dim.randint[1] - 1)
        else:
            out[key] = CategoricalDistribution([_encode(c) for c in dim.choice])
    return out


def with_params(raw: dict, params: dict[str, Any], output_dir: str) -> dict:
    """The base config (as a mapping) with a trial's parameters and run directory."""
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for key, value in params.items():
        overrides.apply_override(raw, key, _decode(value))
    raw["output_dir"] = output_dir
    raw.pop("tune", None)
    return raw


def space_problems(cfg: RaylabConfig, raw: dict, steps_per_trial: int) -> list[str]:
    """Every value a dimension can take must make a valid config: the bounds of a range and
    each choice are tried against the schema (wrong types, out-of-range values)."""
    problems = []
    for key, dim in cfg.tune.search_space.items():
        values = dim.choice if dim.choice is not None else list(dim.loguniform or dim.uniform or (dim.randint[0], dim.randint[1] - 1))
        for value in values:
            try:
                config.load_dict(with_params(raw, {key: value}, cfg.output_dir))
            except config.ConfigError as e:
                detail = "; ".join(p.split(": ", 1)[-1] for p in e.problems)
                problems.append(f"tune.search_space.{key}: the value {value!r} does not make a valid config: {detail}")
                break
    t = cfg.tune
    if t.max_total_steps is not None and t.max_total_steps < steps_per_trial:
        problems.append(f"tune.max_total_steps={t.max_total_steps} is less than one trial ({steps_per_trial} steps); "
                        "raise it or lower train.max_steps / train.epochs")
    if t.time_budget_s is not None and t.time_budget_s < MIN_TRIAL_SECONDS:
        problems.append(f"tune.time_budget_s={t.time_budget_s:g} cannot fit one trial: starting the trial, its "
                        f"Ray Train workers and the data stream alone takes about {MIN_TRIAL_SECONDS} s")
    return problems


TRIAL_DIR = re.compile(r"_([0-9a-f]{8})_(\d+)_")  # Tune names a trial's directory <fn>_<trial id>_<index>_...
MIN_TRIAL_SECONDS = 30  # measured fixed cost of one trial here (RAY_NOTES: ~25 s before any model work)


# ---------------------------------------------------------------- one trial (a Tune function trainable)


def run_trial(params: dict, base_raw: dict, manifest_text: str, output_dir: str, rungs: dict | None) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trial_dir = storage.join(output_dir, "tune", "trials", trial_id)
    # The shards are shared: each trial reads the sweep's data through a copy of its manifest.
    storage.write_text(storage.join(trial_dir, "data", "manifest.json"), manifest_text)
    cfg = config.load_dict(with_params(base_raw, params, trial_dir), source=f"trial {trial_dir}")
    train.run_train(cfg, callbacks=[TuneReportCallback()], log=print, track=False,
                    rungs=rungs and {**rungs, "trial_id": trial_id})


# ---------------------------------------------------------------- the sweep


def run_tune(cfg: RaylabConfig, address: str | None = None, log=print) -> dict:
    """Run (or resume) the sweep; returns the summary also written to tune/results.json."""
    if cfg.tune is None:
        raise UserError("the config has no tune section; add tune.search_space (see configs/quickstart.yaml)")
    from raylab import pretrain

    cfg = pretrain.resolve(cfg)  # a `pretrain` section: its pre-trained model is the base
    manifest = train.read_manifest(cfg)
    train.preflight(cfg, manifest)
    raw = json.loads(cfg.model_dump_json())
    steps = train.plan_steps(manifest["tokens"]["train"]["sequences"], cfg.train.min_workers, cfg.train.batch_size,
                             cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps).total
    problems = space_problems(cfg, raw, steps)
    if problems:
        raise UserError("cannot tune:\n  " + "\n  ".join(problems))
    conn, plan = cluster.prepare(cfg, address, state_api=True)
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from raylab import asha

    t = cfg.tune
    tune_dir = storage.join(cfg.output_dir, "tune")
    storage.makedirs(tune_dir)
    config.write_resolved(cfg)
    # ASHA's max_t is one past the last step: a trial reaching max_t is stopped at once,
    # before its train stage has written the final model.
    max_t = steps + 1
    rungs = None
    if t.asha:  # the trials' workers wait at each rung for ASHA's decision (raylab/asha.py)
        rungs = {"actor": asha.start(tune_dir),
                 "rungs": asha.rung_steps(t.asha.grace_period, t.asha.reduction_factor, max_t)}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=raw, manifest_text=json.dumps(manifest), output_dir=cfg.output_dir,
                             rungs=rungs),
        {"cpu": t.cpus_per_trial_driver},
    )
    started = time.time()
    if tune.Tuner.can_restore(tune_dir):
        log(f"tune: resuming the sweep in {tune_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=False, restart_errored=False)
    else:
        # Optuna's default of 10 random start-up trials would make a short sweep pure random search.
        startup = t.startup_trials or max(2, min(10, t.num_samples // 3))
        sampler = (optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=startup) if t.searcher == "tpe"
                   else optuna.samplers.RandomSampler(seed=t.seed))
        study_storage = None
        if "://" not in cfg.output_dir:  # SQLite needs a local file; Tune's checkpoint keeps the rest
            study_storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.join(os.path.abspath(tune_dir), 'study.db')}")
        points = [{k: _encode(v) for k, v in point.items()} for point in t.points_to_evaluate] or None
        searcher = OptunaSearch(space=distributions(t.search_space), metric=t.metric, mode=t.mode, sampler=sampler,
                                study_name=cfg.run_name, storage=study_storage, points_to_evaluate=points)
        scheduler = (asha.SyncedASHA(rungs["actor"], time_attr="step", metric=t.metric, mode=t.mode, max_t=max_t,
                                     grace_period=t.asha.grace_period, reduction_factor=t.asha.reduction_factor)
                     if t.asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=plan.trial_concurrency),
                                        scheduler=scheduler, num_samples=t.num_samples, time_budget_s=t.time_budget_s),
            run_config=tune.RunConfig(name="tune", storage_path=cfg.output_dir,
                                      stop=_step_budget(t.max_total_steps, tune_dir) if t.max_total_steps else None,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0),
        )
    log(f"tune: {t.num_samples} trials ({t.searcher}{' + ASHA' if t.asha else ''}), {plan.trial_concurrency} at once, "
        f"{steps} steps each at most -> {tune_dir}")
    grid = tuner.fit()
    summary = report(cfg, grid, time.time() - started, log)
    if cfg.registry.enabled:
        from raylab import registry

        summary["registry"] = registry.track_sweep(cfg, summary, log)
    return summary


def _step_budget(budget: int, tune_dir: str):
    """A Tune stopper ending the sweep once its trials have spent `budget` optimizer steps.

    A trial's results lag its training: Ray Train's workers report asynchronously, only
    evaluations reach Tune, and a trial stopped by this budget (or, before SyncedASHA, by
    ASHA) trains on until the stop reaches its workers. So once another trial has reported
    after it, a trial counts the steps its metrics.jsonl shows it ran, not its last result:
    counting results alone let a benchmark sweep spend 344 steps of a 288-step budget."""
    from ray.tune.stopper import Stopper

    class StepBudget(Stopper):
        def __init__(self):
            self.spent: dict[str, int] = {}
            self.unread: set[str] = set()  # trials that reported since their metrics were read

        def __call__(self, trial_id: str, result: dict) -> bool:
            for other in self.unread - {trial_id}:
                ran = _steps_run(tune_dir, other)
                self.spent[other] = max(self.spent[other], ran)
            self.unread = {trial_id}
            self.spent[trial_id] = max(self.spent.get(trial_id, 0), int(result.get("step") or 0))
            return self.stop_all()

        def stop_all(self) -> bool:
            return sum(self.spent.values()) >= budget

    return StepBudget()


# ---------------------------------------------------------------- results and reports


def _rows(cfg: RaylabConfig, grid) -> list[dict]:
    t = cfg.tune
    rows = []
    for result in grid:
        m = result.metrics or {}
        found = TRIAL_DIR.search(os.path.basename(result.path or ""))
        trial_id = m.get("trial_id") or (found.group(1) if found else "?")
        params = {k.removeprefix("config/"): v for k, v in (result.config or {}).items()}
        final = storage.join(cfg.output_dir, "tune", "trials", trial_id, "train", "final")
        finished = storage.exists(storage.join(final, train.META))
        value = m.get(t.metric)
        ran = _steps_run(storage.join(cfg.output_dir, "tune"), trial_id)
        rows.append({
            "trial_id": trial_id,
            "index": int(found.group(2)) if found else None,  # creation order
            "status": "error" if result.error else ("finished" if finished else "stopped early"),
            **{k: _decode(v) for k, v in params.items()},
            t.metric: value if isinstance(value, (int, float)) and math.isfinite(value) else None,
            "best_val_loss": m.get("best_val_loss"),
            "steps": m.get("step"),
            "steps_run": max(ran, m.get("step") or 0),
            "reports": m.get("training_iteration"),
            "final_model": final if finished else None,
            "error": (str(result.error).strip().splitlines() or [""])[-1][:500] if result.error else None,
        })
    sign = 1 if t.mode == "min" else -1
    rows.sort(key=lambda r: (r["status"] != "finished", r[t.metric] is None, sign * (r[t.metric] or 0)))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def _steps_run(tune_dir: str, trial_id: str) -> int:
    """Optimizer steps a trial really ran, from its metrics.jsonl: a stopped trial may have
    trained past its last result (see `_step_budget`)."""
    metrics_path = storage.join(tune_dir, "trials", trial_id, "train", "metrics.jsonl")
    if not storage.exists(metrics_path):
        return 0
    lines = storage.read_text(metrics_path).splitlines()
    return int(json.loads(lines[-1])["step"]) if lines else 0


def report(cfg: RaylabConfig, grid, seconds: float, log) -> dict:
    from raylab import tune_report

    t = cfg.tune
    tune_dir = storage.join(cfg.output_dir, "tune")
    rows = _rows(cfg, grid)
    keys = list(t.search_space)
    winner = next((r for r in rows if r["status"] == "finished" and r[t.metric] is not None), None)
    summary: dict[str, Any] = {
        "metric": t.metric, "mode": t.mode, "searcher": t.searcher, "asha": bool(t.asha),
        "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "steps_spent": sum(r["steps_run"] for r in rows), "seconds": round(seconds, 1),
        "best": None, "results": rows,
    }
    if winner:
        best_raw = with_params(json.loads(cfg.model_dump_json()), {k: winner[k] for k in keys}, cfg.output_dir)
        best_cfg = config.load_dict(best_raw)
        header = (f"# the winner of the sweep in {tune_dir} (trial {winner['trial_id']}, {t.metric} {winner[t.metric]:.4f});\n"
                  f"# re-run with: raylab train THIS_FILE  (trains in {cfg.output_dir}/train)\n")
        storage.write_text(storage.join(tune_dir, "best.yaml"), header + config.to_yaml(best_cfg))
        summary["best"] = {"trial_id": winner["trial_id"], "params": {k: winner[k] for k in keys},
                           t.metric: winner[t.metric], "final_model": winner["final_model"],
                           "config": storage.join(tune_dir, "best.yaml")}
    summary["analysis"] = tune_report.write(tune_dir, rows, t.search_space, t.metric, t.mode)
    storage.write_text(storage.join(tune_dir, "results.json"), json.dumps(summary, indent=2, default=str) + "\n")
    storage.write_text(storage.join(tune_dir, "results.csv"), _csv(rows, keys, t.metric))
    log(table(rows, keys, t.metric))
    if winner:
        log(f"tune: best trial {winner['trial_id']}: {t.metric} {winner[t.metric]:.4f} with "
            + ", ".join(f"{k}={winner[k]}" for k in keys) + f" -> {storage.join(tune_dir, 'best.yaml')}")
    else:
        raise UserError(f"no trial of the sweep finished ({summary['errors']} failed); see {storage.join(tune_dir, 'results.json')}")
    return summary


def _csv(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["rank", "trial_id", "status", *keys, metric, "best_val_loss", "steps", "steps_run", "final_model", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return out.getvalue()


def table(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["rank", "trial_id", "status", *keys, metric, "steps"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    grid = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in grid]
    errors = [f"  {r['trial_id']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + (["errors:"] + errors if errors else []))
