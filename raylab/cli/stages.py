"""The pipeline's verbs: validate, doctor, data, index, train, tune, run, submit, eval, serve,
render, deploy, export. Each parser sits next to the command it calls.

    raylab validate configs/quickstart.yaml train.lr=1e-4
    raylab run configs/quickstart.yaml --until train
"""

from __future__ import annotations

import argparse
import os
import sys

from raylab.cli.common import from_env as _from_env
from raylab.cli.common import split as _split
from raylab.errors import UserError


def add_parsers(sub) -> dict:
    """Add this module's verbs to `sub`; return {verb: command}."""
    from raylab.pipeline import STAGES

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
    ix = verb("index", "chunk, embed and store documents for retrieval (LanceDB); re-runs embed only what changed",
              "required")
    ix.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    ix.add_argument("--raft", metavar="OUT.jsonl", help="then write RAFT training examples (index.raft: questions, "
                    "distractors, oracle_fraction) to OUT.jsonl, a chat source for the data stage")
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
    ev.add_argument("--rag", action="store_true", help="evaluate the retrieval index instead (index.eval: recall@k, "
                    "MRR, answer faithfulness, latency -> eval/rag.json); exit 1 when registry.gates.min_recall_at_k "
                    "or min_mrr fails")
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
    dp = sub.add_parser("deploy", help="point the running endpoint at another version, no downtime; or canary it",
                        description="point the running endpoint at another version, no downtime; with --canary, "
                        "send a share of production traffic to it and let the endpoint's controller promote it "
                        "or roll it back (serve.canary's thresholds)")
    dp.add_argument("ref", metavar="REF", nargs="?", help="NAME@ALIAS or NAME/VERSION")
    dp.add_argument("--canary", type=float, metavar="PCT", help="percent of production traffic to send to REF "
                    "(sticky per request `user` or API key); promoted after --for if it holds, else rolled back")
    dp.add_argument("--for", dest="duration", metavar="DURATION", help="with --canary: how long REF must hold "
                    "(e.g. 90s, 10m, 1h; default serve.canary.window_s)")
    dp.add_argument("--status", action="store_true", help="show the canary rollout: both versions' live metrics "
                    "and the decision")
    ld = dp.add_mutually_exclusive_group()
    ld.add_argument("--load", action="store_true", help="keep REF loaded on every replica, ahead of its traffic "
                    "(routing unchanged; needs serve.load, admin, through the service)")
    ld.add_argument("--unload", action="store_true", help="let go of a version --load kept loaded")
    dp.add_argument("--address", help="the Ray dashboard, http://HEAD:8265 (default: the `raylab serve` running here)")
    dp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the endpoint was deployed from)")
    ex = sub.add_parser("export", help="write the trained model as a Hugging Face directory",
                        description="write the trained model as a Hugging Face directory")
    ex.add_argument("run", metavar="RUN", help="run directory, its train/final/, its config file, or a registry NAME/VERSION or NAME@ALIAS")
    ex.add_argument("out", metavar="OUT", help="new directory to write")
    ex.add_argument("--merge", action="store_true", help="merge the adapter into the base model (full precision)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="write the (merged or full) model's weights in this dtype; default: as trained (float32)")
    return {"validate": cmd_validate, "doctor": cmd_doctor, "data": cmd_data, "index": cmd_index, "train": cmd_train,
            "tune": cmd_tune, "run": cmd_run, "submit": cmd_submit, "eval": cmd_eval, "serve": cmd_serve,
            "render": cmd_render, "deploy": cmd_deploy, "export": cmd_export}


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
    if cfg is not None:
        from raylab import serve

        lines += serve.engine_report(cfg)
    return doctor.run(cfg, args.address, lines)


def cmd_data(args: argparse.Namespace) -> int:
    from raylab import config, data
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cluster.run_stage(data.run_data, config.load(path, overrides), args.address)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from raylab import config, rag
    from raylab.core import cluster

    path, overrides = _split(args, required=True)
    cfg = config.load(path, overrides)
    if args.raft and cfg.index.raft is None:  # before the index is built, not after
        raise UserError("--raft needs an index.raft section with at least `questions` (a JSONL of "
                        "question/answer pairs)")
    cluster.run_stage(rag.run_index, cfg, args.address)
    if args.raft:
        rag.run_raft(cfg, args.raft)
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
    if args.rag:
        return _eval_rag(args, config.load(path, overrides))
    cluster.run_stage(evaluate.run_eval, config.load(path, overrides), args.address, model_ref=args.model,
                      input_path=args.input)
    return 0


def _eval_rag(args: argparse.Namespace, cfg) -> int:
    """`eval --rag`: the index is searched in this process (no Ray needed), then the run's
    retrieval gates are checked against the report just written, like `models evaluate`."""
    from raylab import evaluate, rag
    from raylab.errors import RunFailed

    given = [flag for flag, value in (("--model", args.model), ("--input", args.input)) if value]
    if given:
        raise UserError(f"{' and '.join(given)} apply to the model evaluation, not --rag (which reads "
                        "index.eval.questions)")
    if cfg.index.eval is None:  # checked here too: before anything loads
        raise UserError("--rag needs an index.eval section with at least `questions` (a JSONL of "
                        '{"question": ..., "relevant": [...]} lines)')
    print(rag.eval_table(rag.run_rag_eval(cfg)))
    checks = evaluate.rag_checks(cfg.registry.gates, cfg.output_dir)
    failed = [c for c in checks if not c["passed"]]
    for c in checks:
        print(f"gate {'pass' if c['passed'] else 'FAIL'}  {evaluate.describe(c)}")
    if failed:  # a failed gate is a failed test run: exit 1, as `models evaluate`
        raise RunFailed(f"{len(failed)} of {len(checks)} retrieval gate(s) failed (registry.gates): "
                        + "; ".join(f"{c['gate']}: {c['message']}" for c in failed))
    return 0


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
    from raylab.cli import apiclient

    if apiclient.through_api():
        return _deploy_through_api(args, apiclient)
    if args.load or args.unload:
        _only_ref(args, "--load" if args.load else "--unload")
        out = deploy.run_load(args.ref, args.load, args.address, args.tracking_uri)
        print(_loaded_line(out))
        return 0
    if args.status:
        if args.ref or args.canary is not None or args.duration:
            raise UserError("--status takes no REF, --canary or --for: it shows the rollout that is running")
        print(deploy.describe_canary(deploy.canary_status()))
        return 0
    if not args.ref:
        raise UserError("give the REF to deploy (NAME@ALIAS or NAME/VERSION), or --status")
    if args.duration and args.canary is None:
        raise UserError("--for applies to a canary: add --canary PCT")
    if args.canary is not None:
        try:
            window = deploy.parse_duration(args.duration) if args.duration else None
        except ValueError as e:
            raise UserError(f"--for: {e}") from None
        print(deploy.describe_canary(deploy.start_canary(args.ref, args.canary, window, args.address, args.tracking_uri)))
        return 0
    deploy.run_deploy(args.ref, args.address, args.tracking_uri)
    return 0


def _deploy_through_api(args: argparse.Namespace, apiclient) -> int:
    """`raylab deploy REF` as the service's /v1/registry/deploy: the caller's key needs
    serve.deploy on the version. The dashboard token alone would pass no role, which is why a
    deploy goes through the service when one runs."""
    given = [flag for flag, v in (("--canary", args.canary is not None), ("--for", args.duration),
                                  ("--status", args.status), ("--address", args.address),
                                  ("--tracking-uri", args.tracking_uri)) if v]
    if given:
        raise UserError(f"{', '.join(given)}: not available through the service (${apiclient.URL_ENV} is set); "
                        f"a canary rollout is started on the cluster: unset {apiclient.URL_ENV} and run it there")
    if not args.ref:
        raise UserError("give the REF to deploy (NAME@ALIAS or NAME/VERSION)")
    if args.load or args.unload:
        out = apiclient.Api.from_env().post(f"/v1/registry/{'load' if args.load else 'unload'}", {"ref": args.ref},
                                            timeout=360)
        print(f"{_loaded_line(out)} through {apiclient.URL_ENV}")
        return 0
    out = apiclient.Api.from_env().post("/v1/registry/deploy", {"ref": args.ref}, timeout=360)
    print(f"deployed {out['ref']} ({out['model']}) through {apiclient.URL_ENV}")
    return 0


def _only_ref(args: argparse.Namespace, flag: str) -> None:
    if not args.ref:
        raise UserError(f"{flag}: give the REF (NAME@ALIAS or NAME/VERSION)")
    if args.canary is not None or args.duration or args.status:
        raise UserError(f"{flag} takes a REF only: not --canary, --for or --status")


def _loaded_line(out: dict) -> str:
    if not out.get("changed", True):
        return f"{out['model']} was loaded already; nothing changed"
    if not out["loaded"]:
        return f"unloaded {out['model']}: every replica of the endpoint let go of it"
    return (f"loaded {out['model']}: every replica of the endpoint has run the change (a replica that could not "
            "load it logs why and loads it on demand; `stats()` lists what each holds)")


def cmd_export(args: argparse.Namespace) -> int:
    from raylab import models

    models.export(args.run, args.out, merge=args.merge, dtype=args.dtype)
    return 0
