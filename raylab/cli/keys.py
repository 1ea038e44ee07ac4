"""`raylab keys create|list|revoke`: API keys for the API and the inference endpoint, kept in
the control-plane database (raylab/core/access/keys.py: stored as sha256, shown once);
`raylab keys rotate`: a new encryption key for the files sealed at rest (raylab/core/rotation.py).

    raylab keys create --org acme --role ml_engineer --name ada   # prints the key once
    raylab keys list --org acme
    raylab keys revoke 3f9c0a1b2d4e                               # the KEY_ID `list` shows
    raylab keys rotate --config job.yaml [--retire]               # governance.encryption's key

Who runs these is recorded as the OS user (embedded mode: whoever can write the control-plane
database manages keys; docs/governance.md). Each action is one sub-parser in `_ACTIONS`'
order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parsers(sub) -> dict:
    """Add `raylab keys ACTION`; return {verb: command}."""
    h = ("API keys (identities with a role in an organisation): create, list, revoke; "
         "encryption at rest: rotate")
    k = sub.add_parser("keys", help=h, description=h)
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


def _rotate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="another directory or URI holding sealed files (repeatable); the config's output_dir and "
                        "$RAYLAB_HOME are always covered")
    p.add_argument("--retire", action="store_true",
                   help="local key ring: drop the old keys afterwards (files elsewhere wrapped by them become unreadable)")


_ACTIONS = {
    "create": ("create a key with a role in an organisation; the key is printed once", _create_args),
    "list": ("the keys (ids, names, orgs, roles; never the keys themselves)", _list_args),
    "revoke": ("refuse a key from now on", _revoke_args),
    "rotate": ("encryption at rest: a new key-encryption key, every sealed file's data key re-wrapped under it "
               "(the data is not re-encrypted); needs --config", _rotate_args),
}


def cmd_keys(args: argparse.Namespace) -> int:
    from raylab.core import controldb, events
    from raylab.core.access import keys

    if args.action == "rotate":
        return _rotate(args)
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


def _rotate(args: argparse.Namespace) -> int:
    """`raylab keys rotate` (raylab/core/rotation.py)."""
    from raylab import config
    from raylab.core import audit, crypto, rotation, runs
    from raylab.errors import UserError

    if not args.config:
        raise UserError("raylab keys rotate: --config names the config whose governance.encryption to rotate")
    cfg = config.load(args.config)
    os.environ.update(audit.process_env(cfg))  # the rotation's audit entry joins the config's chain
    os.environ.update(crypto.process_env(cfg))  # old keys unwrap what the new one re-wraps
    done = rotation.rotate(crypto.settings_of(cfg), [cfg.output_dir, str(runs.home().root), *args.path],
                           retire=args.retire)
    print(f"keys rotate: {len(done.rewrapped)} sealed file(s) re-wrapped under key {done.key_id}"
          + (" and the control-plane database's record-id key" if done.record_key else "")
          + (f"; retired {', '.join(done.retired)}" if done.retired else ""))
    return 0
