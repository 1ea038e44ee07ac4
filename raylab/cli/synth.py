"""`raylab synth CONFIG [key=value ...]`: generate training examples through an OpenAI-compatible
endpoint, filter them, write runs/<name>/synth/*.jsonl and a datasheet (docs/synth.md).

    raylab synth configs/synth.yaml synth.max_requests=200
"""

from __future__ import annotations

import argparse

from raylab.cli.common import split


def add_parsers(sub) -> dict:
    """Add the synth verb to `sub`; return {verb: command}."""
    help_ = ("generate training examples (grounded Q&A, Self-Instruct, Evol-Instruct) through an OpenAI-compatible "
             "endpoint (default: raylab's own served production version), "
             "filter them and write chat JSONL plus a datasheet; re-runs reuse cached answers")
    v = sub.add_parser("synth", help=help_, description=help_)
    v.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help="config file (required) then overrides")
    v.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
    v.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    return {"synth": cmd_synth}


def cmd_synth(args: argparse.Namespace) -> int:
    from raylab import config, synth
    from raylab.core import cluster

    path, overrides = split(args, required=True)
    cluster.run_stage(synth.run_synth, config.load(path, overrides), args.address)
    return 0
