"""What every verb's command shares: CONFIG and overrides from the command line, a config
passed in an environment variable, a database URL shown without its password."""

from __future__ import annotations

import argparse
import os

from raylab.errors import UserError


def split(args: argparse.Namespace, required: bool) -> tuple[str | None, list[str]]:
    """(config path, overrides) from the positional list and --config."""
    config = args.config
    overrides = []
    for item in args.args:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument {item!r}: overrides look like key=value, and CONFIG was already given ({config})")
    if required and config is None:
        raise UserError("a CONFIG file is required (positional or --config)")
    if overrides and config is None:
        raise UserError(f"overrides {overrides} need a CONFIG to apply to")
    return config, overrides


def from_env(args: argparse.Namespace):
    """The config in $NAME for --config-env NAME (then overrides), validated like a file."""
    from raylab import config

    name = args.config_env
    flag = f"--config-env {name}"
    if args.config is not None:
        raise UserError(f"{flag} and --config both give the config; use one")
    _, overrides = split(argparse.Namespace(config=flag, args=args.args), required=False)
    if not name.isidentifier():
        raise UserError(f"{flag}: expected the name of an environment variable")
    if not os.environ.get(name):
        raise UserError(f"{flag}: ${name} is not set (or empty); it should hold the config as YAML text")
    return config.load_text(os.environ[name], overrides, source=flag)


def storage_url(db_url: str) -> str:
    from raylab.core.secrets import redact_url

    return redact_url(db_url)
