"""`raylab api CONFIG --standalone`: the OpenAI-compatible fine-tuning service on its own port.

    raylab keys create --org acme --role ml_engineer --name ada     # a key for the caller
    raylab api configs/quickstart.yaml --standalone --port 8100     # http://127.0.0.1:8100/v1

CONFIG is every job's template (data rules, method, train settings, registry, governance) and
holds the `api:` section (base models, upload limit, the Ray dashboard jobs go to). With
`api.enabled: true`, `raylab serve CONFIG` mounts the same routes in the inference endpoint's
ingress instead (one base URL).
"""

from __future__ import annotations

import argparse

from raylab.cli.common import split


def add_parsers(sub) -> dict:
    """Add `raylab api`; return {verb: command}."""
    help_ = "the OpenAI-compatible fine-tuning service (/v1/files, /v1/fine_tuning/jobs) on its own port"
    a = sub.add_parser("api", help=help_, description=help_)
    a.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help="config file (required) then overrides")
    a.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
    a.add_argument("--standalone", action="store_true", help="serve with uvicorn on api.host:api.port (without it, "
                   "set api.enabled and run `raylab serve`: the routes join the inference endpoint)")
    a.add_argument("--host", help="listen address (default api.host)")
    a.add_argument("--port", type=int, help="port (default api.port)")
    return {"api": cmd_api}


def cmd_api(args: argparse.Namespace) -> int:
    from raylab import config
    from raylab.serve import run_api

    path, overrides = split(args, required=True)
    return run_api(config.load(path, overrides), args.standalone, args.host, args.port)
