"""Serving (`raylab serve`, `raylab deploy`): a registry version behind an OpenAI-compatible
Ray Serve endpoint, switched to another version without downtime.

    from raylab.serve import start_serving, stop_serving
    info = start_serving(cfg)          # returns once the endpoint answers: {url, model, ...}

Modules: deploy (the verbs, Serve's declarative REST API), app (the FastAPI ingress and
`build`, the application's import path `raylab.serve:build`), generator (the model
deployment), load (`deploy --load/--unload`: versions kept loaded on every replica), explainer (the Explainer deployment: token attributions for /v1/explain), canary (the canary's pure rule: traffic
share, metrics, decision), rollout (`deploy --canary`: the controller actor, --status), engine (the Engine seam and TransformersEngine), decode (the continuous-batching
decode loop), openai_api (request, response and error shapes), auth (API keys), finetune
(the fine-tuning service, `raylab api`: standalone its own port, ftstore its tables, ftrequests its request and
response shapes, routers/files.py and routers/fine_tuning.py its routes).
"""

from __future__ import annotations

from raylab.serve.auth import api_keys
from raylab.serve.deploy import (
    APP,
    default_ref,
    emit,
    emit_text,
    run_deploy,
    run_serve,
    start_serving,
    stop_serving,
    wait_until_stopped,
)
from raylab.serve.load import run_load
from raylab.serve.vllm_engine import engine_report

__all__ = ["APP", "api_keys", "build", "canary_status", "default_ref", "describe_canary", "engine_report", "parse_duration",
           "run_api", "start_canary", "emit", "emit_text", "run_deploy", "run_load", "run_serve", "start_serving",
           "stop_serving", "wait_until_stopped"]


def __getattr__(name: str):
    # `build` imports FastAPI and Ray Serve's deployment machinery; only Serve's controller
    # (import_path raylab.serve:build) and the replicas need it, not every CLI command.
    if name == "build":
        from raylab.serve.app import build

        return build
    if name == "run_api":  # the fine-tuning service: FastAPI, uvicorn and the data stage's rules
        from raylab.serve.standalone import run_api

        return run_api
    if name in ("start_canary", "canary_status", "describe_canary"):  # they import Ray: only `deploy --canary` needs it
        from raylab.serve import rollout

        return getattr(rollout, "describe" if name == "describe_canary" else name)
    if name == "parse_duration":
        from raylab.serve.canary import parse_duration

        return parse_duration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
