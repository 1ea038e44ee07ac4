"""`raylab models list|show|card|evaluate|promote|rollback`: the registry from the shell (no CONFIG).

    raylab models list
    raylab models card acme-support/3 --output cards/   # the model card (README.md + model_card.json)
    raylab models promote acme-support 3 --reason "passed review"

With $RAYLAB_API_URL set, `promote` and `rollback` go through the service
(`/v1/registry/models/...`) with $RAYLAB_API_KEY: an approver's key, who did not create the
version. Without it they act on the registry directly (embedded single-user mode): the OS
user is recorded in the alias history and the audit log, and no role is enforced.
"""

from __future__ import annotations

import argparse

from raylab.errors import RunFailed, UserError


def add_parsers(sub) -> dict:
    """Add `raylab models ACTION`; return {verb: command}."""
    m = sub.add_parser("models", help="the registry: versions, lineage, gates, aliases (no CONFIG needed)",
                       description="the registry: versions, lineage, gates, aliases (no CONFIG needed)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else $RAYLAB_HOME/mlflow)")
    ms = m.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        return ms.add_parser(name, help=help_, description=help_, parents=[common])

    ls = action("list", "versions with metrics, gate status and aliases")
    ls.add_argument("name", nargs="?")
    sh = action("show", "one version's lineage, gates, checksums; the alias history")
    sh.add_argument("ref", metavar="REF")
    for a in (ls, sh):
        a.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of the table")
    c = action("card", "a version's model card: Markdown (Hugging Face format) or --json; --output writes both")
    c.add_argument("ref", metavar="REF", help="NAME/VERSION or NAME@ALIAS")
    c.add_argument("--json", action="store_true", help="print the card's facts as JSON instead of Markdown")
    c.add_argument("--output", metavar="DIR", help="write README.md and model_card.json into DIR instead of printing")
    e = action("evaluate", "run a version's promotion gates (its test suite) and record the result; exit 1 if it fails")
    e.add_argument("name", metavar="REF", help="NAME/VERSION, NAME/latest or NAME@ALIAS (or NAME then VERSION)")
    e.add_argument("version", nargs="?", help=argparse.SUPPRESS)
    e.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML (for CI test reports)")
    e.add_argument("--suite", action="append", default=[], metavar="FILE",
                   help="a suite file (the keys of registry.gates) to run as well; repeatable")
    e.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    p = action("promote", "move the production alias to a version that passed its gates")
    p.add_argument("name")
    p.add_argument("version", help="a version number, or latest")
    p.add_argument("--force", action="store_true", help="promote although the gates did not pass (needs --reason)")
    p.add_argument("--reason", help="recorded in the alias history")
    r = action("rollback", "move production back to the previous production version")
    r.add_argument("name")
    r.add_argument("--reason", help="recorded in the alias history")
    return {"models": cmd_models}


def cmd_models(args: argparse.Namespace) -> int:
    import json

    from raylab import registry
    from raylab.cli import apiclient

    if args.action in ("promote", "rollback") and apiclient.through_api():
        if args.tracking_uri:
            raise UserError(f"--tracking-uri: with ${apiclient.URL_ENV} set the service's registry is used; "
                            f"unset {apiclient.URL_ENV} to act on another registry directly")
        return _models_move_through_api(args, apiclient.Api.from_env())

    store = registry.open_store(tracking_uri=args.tracking_uri)
    if args.action == "list":
        rows = registry.versions(store, args.name)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        print(f"{'model':<24} {'ver':>4} {'aliases':<22} {'method':<7} {'val_loss':>9} {'gates':<8} {'stage':<6} created")
        for r in rows:
            print(f"{r['name']:<24} {r['version']:>4} {','.join(r['aliases']):<22} {r['method'] or '':<7} "
                  f"{r['val_loss'] or '':>9} {r['gates']:<8} {r['stage'] or '':<6} {r['created']}")
        if not rows:
            from raylab.core.secrets import redact_url

            print(f"no registered versions in {redact_url(store.uri)}")
    elif args.action == "show":
        mv = registry.get_version(store, args.ref)
        tags = dict(mv.tags)
        sums = json.loads(tags.pop("raylab.checksums", "{}"))
        report = tags.pop("raylab.gates.report", None)
        aliases = [a for a, v in registry.registered_model(store, mv.name).aliases.items() if int(v) == int(mv.version)]
        if args.json:
            print(json.dumps({"name": mv.name, "version": int(mv.version), "aliases": aliases, "source": mv.source,
                              "run_id": mv.run_id, "tags": tags, "checksums": sums,
                              "gates": json.loads(report) if report else None,
                              "alias_history": registry.alias_history(store, mv.name)}, indent=2))
            return 0
        print(f"{mv.name}/{mv.version}  aliases: {', '.join(aliases) or '-'}\n  source: {mv.source}\n  run: {mv.run_id}")
        for k in sorted(tags):
            print(f"  {k}: {tags[k]}")
        print(f"  artifact files (sha256 recorded): {len(sums)}")
        if report:
            for c in json.loads(report)["checks"]:
                print(f"  gate {c['gate']}: {'pass' if c['passed'] else 'FAIL'} (value {c['value']!r:.60}, limit {c['limit']!r:.60})")
        print("alias history:")
        for h in registry.alias_history(store, mv.name):
            print(f"  {h['time']} {h['user']}: {h['alias']} {h['from']} -> {h['to']}{' (forced)' if h['forced'] else ''}: {h['reason']}")
    elif args.action == "card":
        _models_card(args, store)
    elif args.action == "evaluate":
        _models_evaluate(args, store)
    elif args.action == "promote":
        args.version = registry.version_number(store, args.name, args.version)
        moves = registry.promote(store, args.name, args.version, args.force, args.reason)
        for h in moves or [{"alias": registry.PRODUCTION, "from": args.version, "to": args.version}]:
            print(f"{args.name}: {h['alias']} {h['from']} -> {h['to']}")
    elif args.action == "rollback":
        for h in registry.rollback(store, args.name, args.reason):
            print(f"{args.name}: {h['alias']} {h['from']} -> {h['to']}")
    return 0


def _models_move_through_api(args: argparse.Namespace, api) -> int:
    import urllib.parse

    path = f"/v1/registry/models/{urllib.parse.quote(args.name, safe='')}/{args.action}"
    body = {"reason": args.reason}
    if args.action == "promote":
        body |= {"version": args.version, "force": args.force}
    out = api.post(path, body)
    if not out["moves"]:
        print(f"{args.name}: version {args.version} is production already")
    for h in out["moves"]:
        print(f"{args.name}: {h['alias']} {h['from']} -> {h['to']}")
    return 0


def _models_card(args: argparse.Namespace, store) -> None:
    import json
    import os

    from raylab import registry

    mv = registry.get_version(store, args.ref)
    card = registry.card_for(store, mv)
    if args.output:
        if os.path.isfile(args.output):
            raise UserError(f"--output {args.output}: is a file; give a directory (README.md and model_card.json go in it)")
        written = registry.write_card(card, os.path.abspath(args.output))
        linked = registry.download_card_files(store, mv, card, os.path.abspath(args.output))  # the plots it links
        print(f"wrote {written['md']} and {written['json']}" + (f" and {len(linked)} linked file(s)" if linked else ""))
    elif args.json:
        print(json.dumps(card, indent=2, default=str))
    else:
        print(registry.render_card(card))


def _models_evaluate(args: argparse.Namespace, store) -> None:
    from raylab import config, evaluate, registry

    suites = []
    for path in args.suite:  # read first: a broken suite file is exit 2 before anything runs
        try:
            suites.append(config.GatesConfig.model_validate(config.read_suite(path)))
        except ValueError as e:
            raise UserError(f"--suite {path}: {e}") from None
    if args.version is not None:
        name, version = args.name, registry.version_number(store, args.name, args.version)
    elif "/" in args.name and args.name.rsplit("/", 1)[1] == "latest":
        name = args.name.rsplit("/", 1)[0]
        version = registry.version_number(store, name, "latest")
    else:
        mv = registry.get_version(store, args.name)
        name, version = mv.name, int(mv.version)
    result = evaluate.evaluate_version(store, name, version, args.address, suites=suites)
    if args.junit:
        evaluate.write_junit(result, args.junit)
        print(f"wrote {args.junit} ({len(result['checks'])} checks)")
    if result["status"] != "passed":  # a failed test suite: exit 1, like any failing test run
        failed = sum(not c["passed"] for c in result["checks"])
        raise RunFailed(f"{name}/{version} failed {failed} of {len(result['checks'])} gate checks; it may not be "
                        "promoted (the result is recorded on the version: `raylab models show`)")
    print(f"{name}/{version} passed its gates; promote it with `raylab models promote {name} {version}`")
