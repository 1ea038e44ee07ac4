"""API keys for the endpoint: `serve.api_keys_env` (comma-separated) and `serve.api_keys_file`
(one per line). No keys configured means no authentication (a local endpoint)."""

from __future__ import annotations

import os


def api_keys(args: dict) -> set[str]:
    keys: set[str] = set()
    if args.get("api_keys_env"):
        keys |= {k.strip() for k in os.environ.get(args["api_keys_env"], "").split(",") if k.strip()}
    if args.get("api_keys_file"):
        with open(args["api_keys_file"]) as f:
            keys |= {line.strip() for line in f if line.strip() and not line.startswith("#")}
    if (args.get("api_keys_env") or args.get("api_keys_file")) and not keys:
        raise RuntimeError("API keys are configured (serve.api_keys_env / serve.api_keys_file) but none were found")
    return keys
