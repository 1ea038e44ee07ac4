"""raylab: fine-tune large language models on your own data with Ray.

    raylab run configs/quickstart.yaml        # the CLI
    python -c "import raylab; raylab.run('configs/quickstart.yaml')"

Python API (notebooks, Ray Client sessions): one function per CLI verb. Each takes a config
file path, a dict, or a loaded RaylabConfig, then `key=value` overrides as a list:

    import raylab
    cfg = raylab.load_config("configs/quickstart.yaml", ["train.max_steps=10"])
    raylab.run_data(cfg); raylab.run_train(cfg)          # or raylab.run_tune(cfg)
    raylab.run_eval(cfg)
    raylab.run_optimize(cfg, ["optimize.quantize=int8_weight_only"], model="acme-assistant/3")
    endpoint = raylab.start_serving(cfg)                 # returns once it answers
    raylab.stop_serving()
    raylab.run(cfg, serve=False)                         # the pipeline, like `raylab run`
    job_id = raylab.submit(cfg, address="http://HEAD:8265")  # as a Ray job (raylab.core.jobs)
"""

from __future__ import annotations

from typing import Any

from raylab.config import RaylabConfig
from raylab.config import load as load_config
from raylab.core import cluster as _cluster
from raylab.core import logs as _logs
from raylab.errors import ConfigError, UserError
from raylab.version import __version__


def _config(config: Any, overrides: list[str] | None = None) -> RaylabConfig:
    _logs.console()  # progress lines on stdout, as the CLI prints them
    from raylab import config as config_module

    if isinstance(config, RaylabConfig):
        return config_module.load_dict(config.model_dump(mode="json"), overrides) if overrides else config
    if isinstance(config, dict):
        return config_module.load_dict(config, overrides or ())
    return load_config(str(config), overrides or ())


def run(config, overrides: list[str] | None = None, *, address: str | None = None, until: str | None = None,
        serve: bool = True, keep_serving: bool = False) -> dict:
    """The pipeline (`raylab run`): data, tune|train, gates, promote, serve, smoke; the summary."""
    from raylab import pipeline

    return _cluster.run_stage(pipeline.run, _config(config, overrides), address, until=until, serve=serve,
                              keep_serving=keep_serving)


def run_data(config, overrides: list[str] | None = None, *, address: str | None = None) -> dict:
    """The data stage (`raylab data`); returns the manifest."""
    from raylab import data

    return _cluster.run_stage(data.run_data, _config(config, overrides), address)


def run_train(config, overrides: list[str] | None = None, *, address: str | None = None) -> dict:
    """The train stage (`raylab train`); returns the final model's metadata (and registry version)."""
    from raylab import train

    return _cluster.run_stage(train.run_train, _config(config, overrides), address)


def run_tune(config, overrides: list[str] | None = None, *, address: str | None = None) -> dict:
    """The sweep (`raylab tune`); returns its summary (best trial, registry version)."""
    from raylab import tune

    return _cluster.run_stage(tune.run_tune, _config(config, overrides), address)


def run_eval(config, overrides: list[str] | None = None, *, model: str | None = None, input: str | None = None,
             address: str | None = None) -> dict:
    """Batch evaluation (`raylab eval`); returns the report."""
    from raylab import evaluate

    return _cluster.run_stage(evaluate.run_eval, _config(config, overrides), address, model_ref=model,
                              input_path=input)


def run_optimize(config, overrides: list[str] | None = None, *, model: str) -> dict:
    """`raylab optimize`: the registry version `model` (NAME/VERSION or NAME@ALIAS) merged and
    quantised, or pruned and recovered, as `optimize:` says, registered as a version derived
    from it; returns its name, version and measurements. Quantisation needs no Ray; pruning's
    recovery fine-tune runs on Ray Train (on the data stage's shards in output_dir)."""
    from raylab import optimize

    return optimize.run_optimize(_config(config, overrides), model)


def submit(config, overrides: list[str] | None = None, *, address: str | None = None, working_dir: str = ".",
           env: list[str] | tuple[str, ...] = (), flags: list[str] | tuple[str, ...] = ()) -> str:
    """`raylab run` as a Ray job on the cluster whose dashboard is `address` (`raylab submit
    --no-wait`); returns the job id at once. The config (a file anywhere, a dict or a
    RaylabConfig) is checked here first; follow the job with raylab.core.jobs (status, wait,
    logs, events, stop)."""
    from raylab.core import jobs

    cfg = _config(config, overrides)
    path = str(config) if not isinstance(config, (RaylabConfig, dict)) else None
    return jobs.submit(cfg, address, path=path, overrides=overrides or (), working_dir=working_dir, env=env,
                       flags=flags)


def start_serving(config=None, overrides: list[str] | None = None, *, model: str | None = None,
                  address: str | None = None) -> dict:
    """Deploy the endpoint (`raylab serve` without the foreground wait); returns its URL and models."""
    from raylab import serve

    _logs.console()
    return serve.start_serving(_config(config, overrides) if config is not None else None, model, address)


def stop_serving() -> None:
    from raylab import serve

    serve.stop_serving()


__all__ = ["RaylabConfig", "load_config", "UserError", "ConfigError", "__version__", "run", "run_data", "run_train",
           "run_tune", "run_eval", "run_optimize", "submit", "start_serving", "stop_serving"]
