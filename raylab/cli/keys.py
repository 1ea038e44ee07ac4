"""`raylab keys create|list|revoke`: API keys for the API and the inference endpoint, kept in
the control-plane database (raylab/core/access/keys.py: stored as sha256, shown once).

    raylab keys create --org acme --role ml_engineer --name ada   # prints the key once
    raylab keys list --org acme
    raylab keys revoke 3f9c0a1b2d4e                               # the KEY_ID `list` shows

Who runs these is recorded as the OS user (embedded mode: whoever can write the control-plane
database manages keys; docs/governance.md). Each action is one sub-parser in `_ACTIONS`'
order; another (`rotate`, for encryption keys) is one more entry there and a branch in
`cmd_keys`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parsers(sub) -> dict:
    """Add `raylab keys ACTION`; return {verb: command}."""
    k = sub.add_parser("keys", help="API keys (identities with a role in an organisation): create, list, revoke",
                       description="API keys (identities with a role in an organisation): create, list, revoke")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="take governance.database from this config")
    common.add_argument("--database", help="control-plane database URL (default: governance.database, "
                        "$RAYLAB_DATABASE_URL, else $RAYLAB_HOME/raylab.db)")
    actions = k.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (help_, add) in _ACTIONS.items():
        add(actions.add_parser(name, parents=[common], help=help_, description=help_))
    return {"keys": cmd_keys}


def _create_args(p: argparse.ArgumentParser) -> None:
    from raylab.core.access import ROLES

    p.add_argument("--org", required=True, help="the organisation the key acts in (it sees only this org's resources)")
    p.add_argument("--role", required=True, choices=ROLES, metavar="ROLE", help=f"one of {', '.join(ROLES)}")
    p.add_argument("--name", help="who the key stands for (the audit log's actor; separation of duties compares it "
                   "with a version's creator); default key-<KEY_ID>")
    p.add_argument("--json", action="store_true", help="print the key and its record as JSON")


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--org", help="only this organisation's keys")
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.add_argument("--json", action="store_true", help="print a JSON array")


def _revoke_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("key_id", metavar="KEY_ID", help="the id `raylab keys list` shows (or the whole key)")


_ACTIONS = {
    "create": ("create a key with a role in an organisation; the key is printed once", _create_args),
    "list": ("the keys (ids, names, orgs, roles; never the keys themselves)", _list_args),
    "revoke": ("refuse a key from now on", _revoke_args),
}


def cmd_keys(args: argparse.Namespace) -> int:
    from raylab.core import controldb, events
    from raylab.core.access import keys

    if args.config:
        from raylab import config
        from raylab.core import audit

        os.environ.update(audit.process_env(config.load(args.config)))
    db = controldb.url(args.database)
    by = events.actor()
    if args.action == "create":
        key, row = keys.create(db, args.org, args.role, args.name, by)
        events.emit("access.key_create", key_id=row["key_id"], name=row["name"], org=row["org"], role=row["role"])
        if args.json:
            print(json.dumps({"key": key, **row}, indent=2))
        else:
            print(key)
            print(f"created key {row['key_id']} for {row['name']} ({row['role']} in {row['org']}); it is shown "
                  "only now: store it in a secret manager", file=sys.stderr)
    elif args.action == "list":
        rows = keys.listing(db, args.org, args.all)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                state = f"revoked {r['revoked']}" if r["revoked"] else "active"
                print(f"{r['key_id']}  {r['org']:<16} {r['role']:<13} {r['name']:<24} {r['created']}  {state}")
            if not rows:
                print("no API keys" + (f" in org {args.org}" if args.org else ""), file=sys.stderr)
    elif args.action == "revoke":
        row = keys.revoke(db, args.key_id, by)
        events.emit("access.key_revoke", key_id=row["key_id"], name=row["name"], org=row["org"], role=row["role"])
        print(f"revoked key {row['key_id']} ({row['name']}, {row['role']} in {row['org']}) at {row['revoked']}")
    return 0
