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

import contextlib
import json
import logging
import os
import time

from raylab import config, registry, train
from raylab.config import RaylabConfig
from raylab.core import events, logs, plan, runs, signals, storage
from raylab.errors import UserError
from raylab.tune import asha, progress, report
from raylab.tune.space import distributions, encode, space_problems, with_params

# ---------------------------------------------------------------- one trial (a Tune function trainable)

log = logging.getLogger(__name__)


def run_trial(params: dict, base_raw: dict, manifest_text: str, output_dir: str, rungs: dict | None) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trial = runs.Run(output_dir).trial(trial_id)
    # The shards are shared: each trial reads the sweep's data through a copy of its manifest.
    storage.write_text(trial.manifest, manifest_text)
    cfg = config.load_dict(with_params(base_raw, params, trial.root), source=f"trial {trial.root}")
    gate = asha.RungWait(rungs["actor"], trial_id, rungs["rungs"]) if rungs else None
    logs.console()  # the train stage's progress lines on the trial's stdout, as before
    train.run_train(cfg, callbacks=[TuneReportCallback()], track=False, gate=gate, in_sweep=True)


# ---------------------------------------------------------------- the sweep


def run_tune(cfg: RaylabConfig, address: str | None = None) -> dict:
    """Run (or resume) the sweep; returns the summary also written to tune/results.json."""
    with events.stage("tune", run=cfg.output_dir):
        return _run_tune(cfg, address)


def _run_tune(cfg: RaylabConfig, address: str | None) -> dict:
    if cfg.tune is None:
        raise UserError("the config has no tune section; add tune.search_space (see configs/quickstart.yaml)")
    train.ensure_pretrained(cfg, address)
    cfg = train.with_pretrained_base(cfg)  # a `pretrain` section: its pre-trained model is the base
    run = runs.Run(cfg.output_dir)
    manifest = runs.read_manifest(run, cfg.source)
    train.preflight(cfg, manifest)
    raw = json.loads(cfg.model_dump_json())
    steps = train.plan_steps(manifest.tokens.train.sequences, cfg.train.min_workers, cfg.train.batch_size,
                             cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps).total
    problems = space_problems(cfg, raw, steps)
    if problems:
        raise UserError("cannot tune:\n  " + "\n  ".join(problems))
    _, the_plan = plan.prepare(cfg, address, state_api=True)
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    t = cfg.tune
    tune_dir = run.tune
    storage.makedirs(tune_dir)
    config.write_resolved(cfg)
    # ASHA's max_t is one past the last step: a trial reaching max_t is stopped at once,
    # before its train stage has written the final model.
    max_t = steps + 1
    rungs = None
    if t.asha:  # the trials' workers wait at each rung for ASHA's decision (asha.py)
        rungs = {"actor": asha.start(tune_dir),
                 "rungs": asha.rung_steps(t.asha.grace_period, t.asha.reduction_factor, max_t)}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=raw, manifest_text=manifest.model_dump_json(), output_dir=cfg.output_dir,
                             rungs=rungs),
        {"cpu": t.cpus_per_trial_driver},
    )
    started = time.time()
    if tune.Tuner.can_restore(tune_dir):
        log.info(f"tune: resuming the sweep in {tune_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(tune_dir, trainable, resume_errored=False, restart_errored=False)
    else:
        # Optuna's default of 10 random start-up trials would make a short sweep pure random search.
        startup = t.startup_trials or max(2, min(10, t.num_samples // 3))
        sampler = (optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=startup) if t.searcher == "tpe"
                   else optuna.samplers.RandomSampler(seed=t.seed))
        study_storage = None
        if "://" not in cfg.output_dir:  # SQLite needs a local file; Tune's checkpoint keeps the rest
            study_storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(run.tune_file('study'))}")
        points = [{k: encode(v) for k, v in point.items()} for point in t.points_to_evaluate] or None
        searcher = OptunaSearch(space=distributions(t.search_space), metric=t.metric, mode=t.mode, sampler=sampler,
                                study_name=cfg.run_name, storage=study_storage, points_to_evaluate=points)
        scheduler = (asha.SyncedASHA(rungs["actor"], time_attr="step", metric=t.metric, mode=t.mode, max_t=max_t,
                                     grace_period=t.asha.grace_period, reduction_factor=t.asha.reduction_factor)
                     if t.asha else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=the_plan.trial_concurrency),
                                        scheduler=scheduler, num_samples=t.num_samples, time_budget_s=t.time_budget_s),
            run_config=tune.RunConfig(name=runs.TUNE_RUN_NAME, storage_path=cfg.output_dir,
                                      stop=step_budget(t.max_total_steps, run) if t.max_total_steps else None,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                      callbacks=[progress.SweepProgress(t.num_samples, t.metric, t.mode, steps)]),
        )
    log.info(f"tune: {t.num_samples} trials ({t.searcher}{' + ASHA' if t.asha else ''}), {the_plan.trial_concurrency} at once, "
        f"{steps} steps each at most -> {tune_dir}")
    with signals.callers_handlers(), _tunes_own_output_off():  # Tune leaves its SIGINT/SIGUSR1 handlers installed
        grid = tuner.fit()
    summary = report.summarize(cfg, grid, time.time() - started)
    if cfg.registry.enabled:
        summary["registry"] = registry.track_sweep(cfg, summary)
    return summary


def step_budget(budget: int, run: runs.Run):
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
                ran = report.steps_run(run, other)
                self.spent[other] = max(self.spent[other], ran)
            self.unread = {trial_id}
            self.spent[trial_id] = max(self.spent.get(trial_id, 0), int(result.get("step") or 0))
            return self.stop_all()

        def stop_all(self) -> bool:
            return sum(self.spent.values()) >= budget

    return StepBudget()


@contextlib.contextmanager
def _tunes_own_output_off():
    """Ray Tune's console output off while the sweep runs; raylab's SweepProgress callback
    prints the progress. RunConfig(verbose=0) is not enough in Ray 2.60: its new output engine
    prints the experiment's box, result path and TensorBoard hint whatever the verbosity
    (tune.run calls experiment_started unconditionally), while the legacy engine, chosen by
    RAY_AIR_NEW_OUTPUT=0 at fit() time, honours verbose=0. The caller's value is put back."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
