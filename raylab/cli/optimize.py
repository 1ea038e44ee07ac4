"""`raylab optimize CONFIG --model REF`: a quantised, pruned or distilled version derived from a registered one.

    raylab optimize configs/quickstart.yaml --model acme-assistant/3 optimize.quantize=int8_weight_only
    raylab optimize configs/quickstart.yaml --model acme-assistant@production \
        optimize.quantize=int8_dynamic optimize.include_embeddings=true
    raylab optimize configs/quickstart.yaml --model acme-assistant/3 \
        optimize.prune.heads=0.25 optimize.prune.mlp_channels=0.3 optimize.prune.recovery_steps=50
"""

from __future__ import annotations

import argparse

from raylab.cli.common import split


def add_parsers(sub) -> dict:
    """Add `raylab optimize`; return {verb: command}."""
    help_ = ("quantise (optimize.quantize), prune and recover (optimize.prune) or distil (optimize.distill) a "
             "registered version into a new version derived from it")
    o = sub.add_parser("optimize", help=help_, description=help_)
    o.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help="config file (required) then overrides")
    o.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
    o.add_argument("--model", required=True, metavar="REF",
                   help="the registry version to start from: NAME/VERSION or NAME@ALIAS")
    return {"optimize": cmd_optimize}


def cmd_optimize(args: argparse.Namespace) -> int:
    import json

    from raylab import config
    from raylab.optimize import run_optimize

    path, overrides = split(args, required=True)
    result = run_optimize(config.load(path, overrides), args.model)
    print(json.dumps(result, indent=2))
    return 0
