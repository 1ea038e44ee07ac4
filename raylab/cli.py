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

from raylab.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylab", description="Fine-tune LLMs on your own data with Ray.")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_: str, config: str) -> argparse.ArgumentParser:
        v = sub.add_parser(name, help=help_, description=help_)
        v.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]", help=f"config file ({config}) then overrides")
        v.add_argument("--config", "-c", help="the config file (instead of the positional CONFIG)")
        return v

    v = verb("validate", "check a config and report every problem", "required")
    v.add_argument("--print", action="store_true", dest="print_config", help="print the resolved config")
    d = verb("doctor", "versions, cluster, GPUs, threads and the resource plan", "optional")
    d.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    da = verb("data", "data stage: read, validate, quarantine; write records and the manifest", "required")
    da.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    tr = verb("train", "train stage: fine-tune on the data stage's shards with Ray Train; resumes", "required")
    tr.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    tu = verb("tune", "sweep hyperparameters (Optuna TPE + ASHA) over train-stage runs; resumes", "required")
    tu.add_argument("--address", help="Ray address: auto, HOST:PORT or ray://HOST:10001")
    ex = sub.add_parser("export", help="write the trained model as a Hugging Face directory",
                        description="write the trained model as a Hugging Face directory")
    ex.add_argument("run", metavar="RUN", help="run directory, its train/final/, or its config file")
    ex.add_argument("out", metavar="OUT", help="new directory to write")
    ex.add_argument("--merge", action="store_true", help="merge the adapter into the base model (full precision)")
    return p


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
    from raylab import cluster, config

    path, overrides = _split(args, required=True)
    cfg = config.load(path, overrides)
    nodes = cluster.planned_nodes(cfg)
    if nodes is not None:  # embedded Ray: its capacity is known without starting it
        cluster.check_plan(cluster.make_plan(cfg, nodes))
    if args.print_config:
        print(config.to_yaml(cfg), end="")
    missing = [(key, name) for key, name in config.env_refs(cfg) if name not in os.environ]
    for key, name in missing:
        print(f"warning: {key} references ${{env:{name}}}, which is not set here", file=sys.stderr)
    print(f"{path}: ok (run {cfg.run_name!r} -> {cfg.output_dir})", file=sys.stderr if args.print_config else sys.stdout)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from raylab import config, doctor

    path, overrides = _split(args, required=False)
    cfg = config.load(path, overrides) if path else None
    return doctor.run(cfg, args.address)


def cmd_data(args: argparse.Namespace) -> int:
    from raylab import config, data

    path, overrides = _split(args, required=True)
    data.run_data(config.load(path, overrides), args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raylab import config, train

    path, overrides = _split(args, required=True)
    train.run_train(config.load(path, overrides), args.address)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raylab import config, tune

    path, overrides = _split(args, required=True)
    tune.run_tune(config.load(path, overrides), args.address)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raylab import export

    export.export(args.run, args.out, merge=args.merge)
    return 0


COMMANDS = {"validate": cmd_validate, "doctor": cmd_doctor, "data": cmd_data, "train": cmd_train, "tune": cmd_tune, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Flags may stand anywhere: positionals after a flag come back as "unknown" and rejoin.
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if item.startswith("-") or not hasattr(args, "args"):
            parser.error(f"unrecognized argument: {item}")
        args.args.append(item)
    try:
        return COMMANDS[args.verb](args)
    except UserError as e:
        print(f"raylab {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raylab {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"raylab {args.verb}: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
