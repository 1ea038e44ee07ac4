"""The `raylab` command: `raylab <verb> [CONFIG] [key=value ...] [flags]`.

    raylab validate configs/quickstart.yaml train.lr=1e-4
    raylab validate configs/quickstart.yaml --print       # the resolved config
    raylab doctor                                          # embedded local Ray
    raylab doctor configs/quickstart.yaml --address auto   # a running cluster

Exit codes: 0 success; 2 a problem the user can fix (the message names it); 1 a bug, with
its traceback.

One module per group of verbs (stages, models, governance, ...); each has
`add_parsers(sub) -> {verb: command}`. A new verb group is a new module added to GROUPS.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from raylab.cli import (
    api,
    explain,
    governance,
    jobs,
    keys,
    models,
    monitor,
    optimize,
    stages,
    synth,
)
from raylab.errors import RunFailed, UserError

GROUPS = (stages, models, governance, keys, optimize, explain, synth, monitor, api, jobs)
# verb -> command, filled by _parser() (tests patch entries to inject failures)
COMMANDS: dict = {}


def _parser() -> argparse.ArgumentParser:
    from raylab.version import __version__

    p = argparse.ArgumentParser(prog="raylab", description="Fine-tune LLMs on your own data with Ray.")
    p.add_argument("--version", action="version", version=f"raylab {__version__}")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own messages (worker warnings, C++ core lines) on the console; by default "
                        "they go to a log file under $RAYLAB_HOME/logs, named at the end")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in GROUPS:
        for verb, command in group.add_parsers(sub).items():
            COMMANDS.setdefault(verb, command)  # setdefault: keep a test's patched entry
    return p


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
