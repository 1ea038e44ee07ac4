"""The delivery pipelines: a GitHub Actions workflow, a GitLab CI file and an MLflow
Project, from the config.

The pipeline: a change to the config, its suite files or its data (or a schedule) ->
`raylab submit` runs the job on the cluster up to registration -> `raylab models evaluate
--junit` runs the version's test suite (the gates) and publishes the JUnit report -> a person
approves (a GitHub environment with required reviewers; a manual GitLab job) -> `raylab
models promote` and `raylab deploy` put it behind the running endpoint.
"""

from __future__ import annotations

from raylab.config import RaylabConfig
from raylab.delivery import common

REPORT = "reports/gates.xml"
# The newest version of the model (what the submitted run registered), for the later jobs.
LATEST = ("raylab models list {name} --json | python -c "
          "\"import json, sys; print(max(int(r['version']) for r in json.load(sys.stdin)))\"")


def _commands(cfg: RaylabConfig) -> dict[str, list[str]]:
    path, name = common.config_path(cfg), common.model_name(cfg)
    overrides = [*common.cluster_overrides(cfg), "registry.auto_promote=false"]
    dashboard = common.dashboard(cfg)
    return {
        # Up to registration (submit validates the config first); the test job runs the gates.
        "train": [common.command("raylab", "submit", path, "--address", dashboard, "--until", "train", *overrides)],
        "latest": [LATEST.format(name=name)],
        "test": [common.command("mkdir", "-p", "reports"),
                 common.command("raylab", "models", "evaluate", f"{name}/${{VERSION}}", "--junit", REPORT)],
        "promote": [common.command("raylab", "models", "promote", name, "${VERSION}", "--reason",
                                   "approved in the delivery pipeline"),
                    common.command("raylab", "deploy", f"{name}@production", "--address", common.serve_dashboard(cfg))],
    }


def _env(cfg: RaylabConfig, secret) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": common.cluster_tracking_uri(cfg), "RAY_API_SERVER_ADDRESS": common.dashboard(cfg),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret("RAY_AUTH_TOKEN"),
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if common.cluster_output_dir(cfg).startswith("s3://"):  # the test job reads the held-out split there
        env |= {"AWS_ACCESS_KEY_ID": secret("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": secret("AWS_SECRET_ACCESS_KEY")}
    return env


def github(cfg: RaylabConfig) -> dict:
    ci, name = cfg.platform.ci, common.model_name(cfg)
    run = _commands(cfg)
    on: dict = {"push": {"branches": [ci.branch], "paths": common.watched_paths(cfg)}}
    if ci.schedule:
        on["schedule"] = [{"cron": ci.schedule}]
    on["workflow_dispatch"] = {}
    container = {"image": cfg.platform.image}
    checkout = {"uses": "actions/checkout@v4"}
    with_version = {"VERSION": "${{ needs.train.outputs.version }}"}
    return {
        "name": f"raylab {name}",
        "on": on,
        # One delivery at a time per model: the version a run registers is the newest.
        "concurrency": {"group": f"raylab-{common.name(cfg)}", "cancel-in-progress": False},
        "env": _env(cfg, lambda k: f"${{{{ secrets.{k} }}}}"),
        "jobs": {
            "train": {"runs-on": "ubuntu-latest", "container": container,
                      "outputs": {"version": "${{ steps.version.outputs.version }}"},
                      "steps": [checkout,
                                {"name": "validate and run on the cluster", "run": "\n".join(run["train"])},
                                {"name": "the version it registered", "id": "version",
                                 "run": f'echo "version=$({run["latest"][0]})" >> "$GITHUB_OUTPUT"'}]},
            "test": {"needs": "train", "runs-on": "ubuntu-latest", "container": container, "env": with_version,
                     "steps": [checkout,
                               {"name": "the test suite (promotion gates)", "run": "\n".join(run["test"])},
                               {"name": "publish the JUnit report", "if": "always()", "uses": "actions/upload-artifact@v4",
                                "with": {"name": "gates", "path": REPORT}}]},
            "promote": {"needs": ["train", "test"], "runs-on": "ubuntu-latest", "container": container,
                        # Required reviewers on this environment are the approval.
                        "environment": ci.environment, "env": with_version,
                        "steps": [{"name": "promote and deploy", "run": "\n".join(run["promote"])}]},
        },
    }


def gitlab(cfg: RaylabConfig) -> dict:
    ci = cfg.platform.ci
    run = _commands(cfg)
    rules = [{"if": f'$CI_COMMIT_BRANCH == "{ci.branch}" && $CI_PIPELINE_SOURCE == "push"',
              "changes": common.watched_paths(cfg)},
             {"if": '$CI_PIPELINE_SOURCE == "schedule" || $CI_PIPELINE_SOURCE == "web"'}]
    return {
        "stages": ["train", "test", "promote"],
        "default": {"image": cfg.platform.image},
        # RAY_AUTH_TOKEN (and the storage keys) are masked CI/CD variables of the project.
        "variables": {k: v for k, v in _env(cfg, lambda k: None).items() if v is not None},
        "train": {"stage": "train", "rules": rules, "resource_group": f"raylab-{common.name(cfg)}",
                  "script": [*run["train"], f'echo "VERSION=$({run["latest"][0]})" > version.env'],
                  "artifacts": {"reports": {"dotenv": "version.env"}}},
        "test": {"stage": "test", "rules": rules, "needs": ["train"], "script": run["test"],
                 "artifacts": {"when": "always", "paths": [REPORT], "reports": {"junit": REPORT}}},
        "promote": {"stage": "promote", "rules": [dict(r, when="manual") for r in rules], "needs": ["train", "test"],
                    "allow_failure": False, "environment": {"name": ci.environment}, "script": run["promote"]},
    }


def mlproject(cfg: RaylabConfig) -> dict:
    """An MLflow Project: `mlflow run . -e main` runs the job, `-e evaluate` the test suite."""
    path, name = common.config_path(cfg), common.model_name(cfg)
    return {
        "name": name,
        "docker_env": {"image": cfg.platform.image},
        "entry_points": {
            "main": {"parameters": {"overrides": {"type": "string", "default": ""}},
                     "command": f"{common.command('raylab', 'run', path, '--no-serve')} {{overrides}}"},
            "evaluate": {"parameters": {"version": {"type": "string", "default": "latest"},
                                        "junit": {"type": "string", "default": REPORT}},
                         "command": f"{common.command('raylab', 'models', 'evaluate', name)}/{{version}} --junit {{junit}}"},
        },
    }
