"""The `raylab` command: `raylab <verb> [CONFIG] [key=value ...] [flags]`.

    raylab validate configs/quickstart.yaml train.lr=1e-4
    raylab validate configs/quickstart.yaml --print       # the resolved config
    raylab doctor                                          # embedded local Ray
    raylab doctor configs/quickstart.yaml --address auto   # a running cluster

Exit codes: 0 success; 2 a problem the user can fix (the message names it); 1 a bug, with
its traceback. Stage verbs (data, train, tune, run, serve, ...) join as they are built.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from raylab.errors import RunFailed, UserError


def _parser() -> argparse.ArgumentParser:
    from raylab.pipeline import STAGES
    from raylab.version import __version__

    p = argparse.ArgumentParser(prog="raylab", description="Fine-tune LLMs on your own data with Ray.")
    p.add_argument("--version", action="version", version=f"raylab {__version__}")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own messages (worker warnings, C++ core lines) on the console; by default "
                        "they go to a log file under $RAYLAB_HOME/logs, named at the end")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_: str, config: str) -> argparse.ArgumentParser:
        v = sub.add_parser(name, help=help_, description=help_)
        v.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help=f"config file ({config}) then overrides")
        v.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
        return v

    v = verb("validate", "check a config and report every problem", "required")
    v.add_argument("--print", action="store_true", dest="print_config", help="print the resolved config")
    v.add_argument("--offline-check", action="store_true",
                   help="check the config and the resource plan only, not the world it names (data files, the model's "
                        "config and module names, referenced files, the Ray address)")
    d = verb("doctor", "versions, cluster, GPUs, threads and the resource plan", "optional")
    d.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    da = verb("data", "data stage: read, validate, quarantine; write records and the manifest", "required")
    da.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    tr = verb("train", "train stage: fine-tune on the data stage's shards with Ray Train; resumes", "required")
    tr.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    tu = verb("tune", "sweep hyperparameters (Optuna TPE + ASHA) over train-stage runs; resumes", "required")
    tu.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    rn = verb("run", "the pipeline: data, tune|train, gates, promote, serve, smoke requests, summary", "required")
    rn.add_argument("--until", choices=STAGES, help="stop after this stage")
    rn.add_argument("--no-serve", action="store_true", help="stop before serving")
    rn.add_argument("--keep-serving", action="store_true", help="leave the endpoint up (foreground) after the smoke requests")
    rn.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    rn.add_argument("--config-env", metavar="NAME", help="read the config as YAML text from environment variable NAME "
                    "(what `raylab submit` sends for a config outside the working directory)")
    sb = verb("submit", "run the pipeline (`raylab run`) as a Ray job on a cluster; tails its logs", "required")
    sb.add_argument("--address", help="the cluster's Ray dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)")
    sb.add_argument("--working-dir", default=".", help="directory sent with the job (default: the current one)")
    sb.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="environment variable for the job")
    sb.add_argument("--no-wait", action="store_true", help="return once submitted (print the job id)")
    sb.add_argument("--until", choices=STAGES, help="stop after this stage")
    sb.add_argument("--no-serve", action="store_true", help="stop before serving")
    ev = verb("eval", "batch evaluation / inference (Ray Data actor pool): base vs tuned model", "required")
    ev.add_argument("--model", help="registry REF (NAME@ALIAS or NAME/VERSION); default: this run's model")
    ev.add_argument("--input", help="JSONL prompts to answer instead of the held-out split")
    ev.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    _models_parser(sub)
    _audit_parser(sub)
    _lineage_parsers(sub)
    sv = verb("serve", "serve a registry version or a plain model: OpenAI-compatible Ray Serve endpoint (foreground)",
              "optional")
    sv.add_argument("--model", help="REF to serve (NAME@ALIAS or NAME/VERSION; default <registry.model_name>@production), "
                                    "or a Hugging Face model directory, exported model or hub id, served as it is "
                                    "with no registry entry")
    sv.add_argument("--detach", action="store_true", help="return once it is up (needs a running cluster)")
    sv.add_argument("--emit-config", metavar="FILE", help="only write the `serve deploy` / RayService config to FILE "
                    "(the same as `raylab render --target serve`)")
    sv.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    rd = verb("render", "write the platform files (CI pipelines, KubeRay, ray up, Serve, MLproject) from the config",
              "required")
    from raylab.delivery import TARGETS

    rd.add_argument("--target", required=True, choices=TARGETS, help="which platform's files")
    rd.add_argument("--out", metavar="DIR", help="directory to write into (default: where the platform looks: "
                    ".github/workflows, cluster/kuberay, cluster, or the current directory)")
    rd.add_argument("--model", help="serve, kuberay: the REF served (default <registry.model_name>@production; "
                    "read from the registry)")
    rd.add_argument("--serve-config", metavar="FILE", help="kuberay: embed this Serve config (--target serve's "
                    "output) in the RayService")
    dp = sub.add_parser("deploy", help="point the running endpoint at another version, no downtime",
                        description="point the running endpoint at another version, no downtime")
    dp.add_argument("ref", metavar="REF", help="NAME@ALIAS or NAME/VERSION")
    dp.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: the `raylab serve` running here)")
    dp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the endpoint was deployed from)")
    ex = sub.add_parser("export", help="write the trained model as a Hugging Face directory",
                        description="write the trained model as a Hugging Face directory")
    ex.add_argument("run", metavar="RUN", help="run directory, its train/final/, its config file, or a registry NAME/VERSION or NAME@ALIAS")
    ex.add_argument("out", metavar="OUT", help="new directory to write")
    ex.add_argument("--merge", action="store_true", help="merge the adapter into the base model (full precision)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="write the (merged or full) model's weights in this dtype; default: as trained (float32)")
    return p


def _models_parser(sub) -> None:
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
                   "$RAYLAB_AUDIT_CHECKPOINTS, else $RAYLAB_HOME/audit/checkpoints)")
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


def _split(args: argparse.Namespace, required: bool) -> tuple[str | None, list[str]]:
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


def cmd_validate(args: argparse.Namespace) -> int:
    from raylab import config
    from raylab.core import cluster, plan
    from raylab.errors import ConfigError

    path, overrides = _split(args, required=True)
    cfg = config.load(path, overrides)
    cluster.apply_offline(cfg)  # before anything below loads a model config from the hub
    problems = []
    nodes = plan.planned_nodes(cfg)
    if nodes is not None:  # embedded Ray: its capacity is known without starting it
        problems += [f"the resource plan does not fit the cluster: {p}" for p in plan.make_plan(cfg, nodes).problems()]
    if not args.offline_check:
        from raylab import world

        problems += world.problems(cfg)
    if problems:
        raise ConfigError(path, problems)
    if args.print_config:
        print(config.to_yaml(cfg), end="")
    missing = [(key, name) for key, name in config.env_refs(cfg) if name not in os.environ]
    for key, name in missing:
        print(f"warning: {key} references ${{env:{name}}}, which is not set here", file=sys.stderr)
    # Like an ${env:} reference, the keys' variable is needed where `raylab serve` runs (a
    # cluster, a submitted job), not where the config is checked: a warning, not an error.
    keys_env = cfg.serve.api_keys_env
    if keys_env and not os.environ.get(keys_env):
        print(f"warning: serve.api_keys_env names ${keys_env}, which is not set here (serving needs it)",
              file=sys.stderr)
    print(f"{path}: ok (run {cfg.run_name!r} -> {cfg.output_dir})", file=sys.stderr if args.print_config else sys.stdout)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from raylab import config, models
    from raylab.core import cluster, doctor

    path, overrides = _split(args, required=False)
    cfg = config.load(path, overrides) if path else None
    cluster.apply_offline(cfg)  # `offline: true` holds for the model description too
    lines = models.describe(cfg.model, gpus_per_worker=cfg.train.gpus_per_worker) if cfg is not None else []
    return doctor.run(cfg, args.address, lines)


def cmd_data(args: argparse.Namespace) -> int:
    from raylab import config, data
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cluster.run_stage(data.run_data, config.load(path, overrides), args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raylab import config, train
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cluster.run_stage(train.run_train, config.load(path, overrides), args.address)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raylab import config, tune
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cluster.run_stage(tune.run_tune, config.load(path, overrides), args.address)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raylab import config, pipeline
    from raylab.core import cluster

    if args.config_env is not None:
        cfg = _from_env(args)
    else:
        path, overrides = _split(args, required=True)
        cfg = config.load(path, overrides)
    cluster.run_stage(pipeline.run, cfg, args.address, until=args.until, serve=not args.no_serve,
                      keep_serving=args.keep_serving)
    return 0


def _from_env(args: argparse.Namespace):
    """The config in $NAME for --config-env NAME (then overrides), validated like a file."""
    from raylab import config

    name = args.config_env
    flag = f"--config-env {name}"
    if args.config is not None:
        raise UserError(f"{flag} and --config both give the config; use one")
    _, overrides = _split(argparse.Namespace(config=flag, args=args.args), required=False)
    if not name.isidentifier():
        raise UserError(f"{flag}: expected the name of an environment variable")
    if not os.environ.get(name):
        raise UserError(f"{flag}: ${name} is not set (or empty); it should hold the config as YAML text")
    return config.load_text(os.environ[name], overrides, source=flag)


def cmd_submit(args: argparse.Namespace) -> int:
    from raylab import config
    from raylab.core import jobs

    path, overrides = _split(args, required=True)
    cfg = config.load(path, overrides)
    flags = (["--until", args.until] if args.until else []) + (["--no-serve"] if args.no_serve else [])
    if os.path.isdir(args.working_dir):  # the CLI sends CONFIG as a file in the job's working directory
        jobs.require_inside(path, args.working_dir)
    job_id = jobs.submit(cfg, args.address, path=path, overrides=overrides, working_dir=args.working_dir, env=args.env,
                         flags=flags)
    if args.no_wait:
        return 0
    return jobs.follow(job_id, args.address)


def cmd_eval(args: argparse.Namespace) -> int:
    from raylab import config, evaluate
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cluster.run_stage(evaluate.run_eval, config.load(path, overrides), args.address, model_ref=args.model,
                      input_path=args.input)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import json

    from raylab import registry

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
        from raylab.core import audit

        cfg = config.load(args.config)
        os.environ.update(audit.process_env(cfg))  # governance.database, as a stage would see it
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


def storage_url(db_url: str) -> str:
    from raylab.core.secrets import redact_url

    return redact_url(db_url)


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


def cmd_serve(args: argparse.Namespace) -> int:
    from raylab import config
    from raylab import serve as deploy

    path, overrides = _split(args, required=False)
    cfg = config.load(path, overrides) if path else None
    if args.emit_config:
        deploy.emit(args.emit_config, cfg, deploy.default_ref(cfg, args.model))
        print(f"wrote {args.emit_config}")
        return 0
    deploy.run_serve(cfg, args.model, args.address, args.detach)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from raylab import config, delivery

    path, overrides = _split(args, required=True)
    if args.target not in ("kuberay", "serve") and (args.model or args.serve_config):
        raise UserError(f"--model and --serve-config apply to --target kuberay and serve, not {args.target}")
    if args.target == "serve" and args.serve_config:
        raise UserError("--serve-config applies to --target kuberay (the serve target writes that file)")
    files = delivery.render(config.load(path, overrides), args.target, args.out, args.model, args.serve_config)
    for written in files:
        print(f"wrote {written}")
    if args.target == "kuberay" and not any(f.endswith("rayservice.yaml") for f in files):
        print("(no rayservice.yaml: give --serve-config FILE from --target serve, or --model REF)")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from raylab import serve as deploy

    deploy.run_deploy(args.ref, args.address, args.tracking_uri)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raylab import models

    models.export(args.run, args.out, merge=args.merge, dtype=args.dtype)
    return 0


COMMANDS = {"validate": cmd_validate, "doctor": cmd_doctor, "data": cmd_data, "train": cmd_train, "tune": cmd_tune, "run": cmd_run, "submit": cmd_submit,
            "eval": cmd_eval, "models": cmd_models, "audit": cmd_audit, "lineage": cmd_lineage, "erase": cmd_lineage, "serve": cmd_serve, "render": cmd_render,
            "deploy": cmd_deploy, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """The `raylab` command. Called with `argv` (tests, scripts), the console is left as it
    is; as the command itself (argv None), Ray's own output goes to a log file unless
    --verbose (raylab/core/console.py)."""
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # a global flag, accepted anywhere on the line
    argv = [a for a in argv if a != "--verbose"]
    parser = _parser()
    # Flags may stand anywhere: positionals after a flag come back as "unknown" and rejoin.
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if item.startswith("-") or not hasattr(args, "args"):
            parser.error(f"unrecognized argument: {item}")
        args.args.append(item)
    from raylab.core import console, logs

    if as_command and not verbose:
        console.quiet(args.verb)
    logs.console()
    try:
        return COMMANDS[args.verb](args)
    except UserError as e:
        print(f"raylab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"raylab {args.verb}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"raylab {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"raylab {args.verb}: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
