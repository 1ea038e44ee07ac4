"""Governance verbs: `raylab audit verify|log|export`, `raylab lineage`, `raylab erase`
(`raylab keys` is raylab/cli/keys.py).

    raylab audit verify --strict
    raylab lineage faq.csv:12
    raylab erase faq.csv:12 --reason "erasure request #41"
"""

from __future__ import annotations

import argparse
import os
import sys

from raylab.cli.common import storage_url


def add_parsers(sub) -> dict:
    """Add this module's verbs to `sub`; return {verb: command}."""
    _audit_parser(sub)
    _lineage_parsers(sub)
    return {"audit": cmd_audit, "lineage": cmd_lineage, "erase": cmd_lineage}


def _audit_parser(sub) -> None:
    a = sub.add_parser("audit", help="the tamper-evident audit log: verify the chain, list or export entries",
                       description="the tamper-evident audit log: verify the chain, list or export entries")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="take governance.database / governance.audit from this config")
    common.add_argument("--database", help="control-plane database URL (default: governance.database, "
                        "$RAYLAB_DATABASE_URL, else $RAYLAB_HOME/raylab.db)")
    acts = a.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = acts.add_parser("verify", parents=[common], help="check every hash link and the signed checkpoints; "
                        "exit 1 naming the first bad entry")
    v.add_argument("--checkpoints", help="where the signed checkpoints are (default: governance.audit.checkpoints, "
                   "$RAYLAB_AUDIT_CHECKPOINTS, else $RAYLAB_HOME/audit/checkpoints, or checkpoints-<digest> "
                   "beside it for a non-default database)")
    v.add_argument("--public-key", action="append", default=[], metavar="FILE",
                   help="a trusted public key (PEM; repeatable); default: the signing key or its .pub")
    v.add_argument("--strict", action="store_true", help="also fail when entries after the newest checkpoint are unsigned")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", help="entries at or after: ISO date/time (UTC unless a zone is given) or an age (12h, 7d)")
    filters.add_argument("--until", help="entries before: ISO date/time or an age")
    filters.add_argument("--actor", action="append", default=[], help="user or user@host (repeatable)")
    filters.add_argument("--kind", action="append", default=[], help="event kind, or its prefix: registry, stage.end (repeatable)")
    filters.add_argument("--model", action="append", default=[], help="NAME or NAME/VERSION (repeatable)")
    lg = acts.add_parser("log", parents=[common, filters], help="list entries, oldest first")
    lg.add_argument("--limit", type=int, help="only the newest N entries")
    lg.add_argument("--json", action="store_true", help="print a JSON array (hashes included)")
    ex = acts.add_parser("export", parents=[common, filters], help="write entries as JSON lines (for a SIEM)")
    ex.add_argument("file", metavar="FILE", help="output file or URI (s3://...); - for stdout")


def _lineage_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", help="take governance.database and registry.tracking_uri from this config")
    common.add_argument("--database", help="control-plane database URL (default: governance.database, "
                        "$RAYLAB_DATABASE_URL, else $RAYLAB_HOME/raylab.db)")
    common.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else $RAYLAB_HOME/mlflow)")
    common.add_argument("--source", help="the source name (data.sources[].name, default source<N>) the record is in")
    h = "the data runs, model versions and deployments that hold a record (or a source)"
    li = sub.add_parser("lineage", parents=[common], help=h, description=h)
    li.add_argument("record_id", nargs="?", metavar="RECORD_ID", help="as the data stage writes it: faq.csv:12, sql:42")
    li.add_argument("--erased", action="store_true", help="list the suppression list instead")
    li.add_argument("--json", action="store_true", help="print JSON")
    h = "stop every future use of a record: suppress it in later data runs, mark the versions holding it erasure_pending"
    er = sub.add_parser("erase", parents=[common], help=h, description=h)
    er.add_argument("record_id", metavar="RECORD_ID", help="as the data stage writes it: faq.csv:12, sql:42")
    er.add_argument("--reason", required=True, help="why (the request it answers): recorded in the audit log")


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from raylab.core import audit, storage
    from raylab.core.audit import chain, check

    if args.config:
        from raylab import config

        os.environ.update(audit.process_env(config.load(args.config)))
    settings = audit.Settings.from_env(database=args.database, checkpoints=getattr(args, "checkpoints", None))
    where = f"audit log {storage_url(settings.database)}"
    if args.action == "verify":
        report = check.verify(settings, args.public_key)
        if args.json:
            print(check.as_json(report))
        else:
            print(f"{where}: {report.entries} entries, {report.checkpoints} signed checkpoints "
                  f"(key {', '.join(report.key_ids)}), head {report.head[:16]}")
        broken = not report.ok or (args.strict and report.unsigned_tail > 0)
        if not args.json:
            for i, p in enumerate(report.problems[:20]):
                print(f"{'BROKEN: first bad entry' if i == 0 else '  also: entry'} {p.entry} ({p.reason}): {p.message}")
            if len(report.problems) > 20:
                print(f"  ... and {len(report.problems) - 20} more")
            if report.unsigned_tail:
                print(f"{'BROKEN' if args.strict else 'warning'}: entries {report.latest_checkpoint + 1}..{report.entries} "
                      f"are after the newest signed checkpoint ({report.latest_checkpoint})")
            if not broken:
                print("OK: every link holds and every signed checkpoint matches")
        return 1 if broken else 0
    flt = chain.Filter(since=args.since and chain.parse_time(args.since, "--since"),
                       until=args.until and chain.parse_time(args.until, "--until"),
                       actors=tuple(args.actor), kinds=tuple(args.kind), models=tuple(args.model),
                       limit=getattr(args, "limit", None))
    rows = list(audit.entries(settings, flt))
    if args.action == "export":
        text = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in rows)
        if args.file == "-":
            sys.stdout.write(text)
        else:
            storage.write_text(args.file, text)
            print(f"wrote {len(rows)} entries to {args.file}", file=sys.stderr)
    elif args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for e in rows:
            target = f"{e['model']}/{e['version']}" if e["model"] and e["version"] else e["model"] or ""
            extra = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)[:60]}" for k, v in sorted(e["fields"].items()))
            print(f"{e['seq']:>6} {e['time']} {e['actor']:<20} {e['kind']:<20} {target:<20} {extra}")
        if not rows:
            print(f"no entries in {where} match")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """`raylab lineage` and `raylab erase` (raylab/lineage/)."""
    import json

    from raylab import lineage

    tracking_uri = args.tracking_uri
    if args.config:
        from raylab import config
        from raylab.core import audit, crypto

        cfg = config.load(args.config)
        os.environ.update(audit.process_env(cfg))  # governance.database, as a stage would see it
        os.environ.update(crypto.process_env(cfg))  # the keys that open sealed record ids
        tracking_uri = tracking_uri or cfg.registry.tracking_uri
    if args.verb == "erase":
        result = lineage.run_erase(args.record_id, args.reason, args.source, args.database, tracking_uri)
        print(lineage.format_erase(result))
    elif args.erased:
        from raylab.core import lineage as records

        entries = records.erased(args.database)
        print(json.dumps(entries, indent=2) if args.json else lineage.format_erased(entries))
    else:
        report = lineage.run_lineage(args.record_id, args.source, args.database, tracking_uri)
        print(json.dumps(report, indent=2) if args.json else lineage.format_lineage(report))
    return 0
