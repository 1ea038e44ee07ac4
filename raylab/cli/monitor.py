"""`raylab monitor CONFIG`: drift of the served prompts from the training data.

    raylab monitor configs/quickstart.yaml           # exit 0: within serve.monitor.drift_threshold
    raylab monitor configs/quickstart.yaml --json    # exit 1: drifted; 2: too few prompts, no records

Run it on a schedule next to a running endpoint (cron, the CI's schedule trigger); the
endpoint's per-version Prometheus metrics are described in docs/serving.md, "Monitoring".
"""

from __future__ import annotations

import argparse

from raylab.cli.common import split


def add_parsers(sub) -> dict:
    """Add `raylab monitor`; return {verb: command}."""
    help_ = "score the drift of the served prompts from the training data (exit 1 above serve.monitor.drift_threshold)"
    m = sub.add_parser("monitor", help=help_, description=help_)
    m.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help="config file (required) then overrides")
    m.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    return {"monitor": cmd_monitor}


def cmd_monitor(args: argparse.Namespace) -> int:
    import json

    from raylab import config
    from raylab.monitor import run_monitor, summary

    path, overrides = split(args, required=True)
    report = run_monitor(config.load(path, overrides))
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 1 if report["drifted"] else 0
