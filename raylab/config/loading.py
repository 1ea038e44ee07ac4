"""Reading a config: YAML, overrides, validation, every problem at once.

    cfg = load("configs/quickstart.yaml", ["train.lr=1e-4", "data.sources.0.path=x.jsonl"])

Rules (DESIGN.md, "Contracts"): unknown keys are errors; an override's value is read as a
YAML scalar or flow collection and then coerced by the schema; list items are addressed by
index; an override may create a section absent from the file; relative paths are made
absolute against the current directory at load time (Ray workers change directory);
`${env:NAME}` secrets stay references in the model and in every written config and are
expanded only where they are used (`raylab.core.secrets.expand_env`).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from raylab.config import report
from raylab.config.overrides import apply_override, parse_override
from raylab.config.root import SCHEMA_VERSION, RaylabConfig
from raylab.core import crypto, runs, secrets, storage
from raylab.errors import ConfigError, UserError


def read_yaml(path: str | os.PathLike) -> dict:
    """The raw mapping in a config file; every reading problem is a UserError naming the file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file not found: {path}")
    if p.is_dir():
        raise UserError(f"config path is a directory, expected a YAML file: {path}")
    try:
        data = p.read_bytes()
        # a run's own config.resolved.yaml is sealed under governance.encryption
        text = (storage.read_text(str(p)) if crypto.is_sealed(data) else data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path))


# Deeper nesting than any config needs. Checked where a config comes in, because the YAML
# parser, the deep copy, pydantic and the error report all recurse: a few hundred levels of
# `[[[...]]]` would otherwise end in a RecursionError traceback somewhere among them.
MAX_DEPTH = 32


def too_deep(raw, limit: int = MAX_DEPTH) -> str | None:
    """The dotted path of a value nested deeper than `limit` in `raw`, or None. Iterative, so
    it cannot itself run out of stack."""
    stack = [(raw, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(v, (dict, list)):
                if depth + 1 > limit:
                    return f"{path}{k}"
                stack.append((v, f"{path}{k}.", depth + 1))
    return None


def _check_depth(raw, source: str) -> None:
    where = too_deep(raw)
    if where is not None:
        raise UserError(f"{source}: {where}: nested more than {MAX_DEPTH} levels deep; "
                        "no raylab key takes that (check the brackets and indentation)")


def parse_yaml(text: str, source: str) -> dict:
    """The raw mapping in a config's YAML text; every problem is a UserError naming `source`."""
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{source}: nested more than {MAX_DEPTH} levels deep; no raylab key takes that "
                        "(check the brackets and indentation)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raise UserError(f"{source}: the config is empty; expected a mapping starting with `version: {SCHEMA_VERSION}`")
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    _check_depth(raw, source)
    return raw


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RaylabConfig:
    """Read, override, validate. Raises ConfigError listing every problem at once."""
    raw = read_extended(path)
    return load_dict(raw, overrides, source=str(path), stem=Path(path).stem)


def read_extended(path: str | os.PathLike, seen: tuple[str, ...] = ()) -> dict:
    """A config file's mapping with `extends: OTHER.yaml` resolved: OTHER (a path relative to
    this file) is read first and this file's keys are merged over it, mappings key by key and
    any other value (lists included) replaced whole, so a team keeps one base config and each
    job states only what differs (configs/quickstart-governed.yaml)."""
    raw = read_yaml(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"{path}: extends: expected the path of another config file, got {type(base).__name__}")
    target = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(base)))
    if target in seen or target == os.path.abspath(path):
        raise UserError(f"{path}: extends: {base} extends this file again (a cycle: {' -> '.join((*seen, target))})")
    return _merged(read_extended(target, (*seen, os.path.abspath(path))), raw)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_text(text: str, overrides: list[str] | tuple[str, ...] = (), source: str = "<config>") -> RaylabConfig:
    """`load` for a config given as YAML text (`raylab run --config-env NAME`: a submitted job's
    config); validated exactly like a file, every problem naming `source`."""
    return load_dict(parse_yaml(text, source), overrides, source=source)


def load_dict(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<config>", stem: str = "run"
) -> RaylabConfig:
    """Validate a config given as a mapping (the Python API's entry point)."""
    _check_depth(raw, source)
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain YAML types only
    for item in overrides:
        apply_override(raw, *parse_override(item))
    _check_depth(raw, source)  # an override's value or long key can nest too
    raw.setdefault("output_dir", runs.default_output_dir(stem))
    literal, values = secrets.literal_secrets(raw)
    problems = secrets.malformed_refs(raw) + literal
    try:
        cfg = RaylabConfig.model_validate(raw)
    except ValidationError as e:
        lines = report.problems(RaylabConfig, e, raw) + problems
        raise ConfigError(source, [secrets.scrub(line, values) for line in lines]) from None
    if problems:
        raise ConfigError(source, [secrets.scrub(line, values) for line in problems])
    cfg._source = source
    return cfg


def env_refs(cfg: RaylabConfig) -> list[tuple[str, str]]:
    """(key path, variable) for every `${env:NAME}` reference in the config."""
    return secrets.env_refs(cfg.model_dump(mode="json"))


def to_yaml(cfg: RaylabConfig) -> str:
    """The resolved config as YAML: defaults filled, paths absolute, secrets still references."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: RaylabConfig) -> str:
    """Write `<output_dir>/config.resolved.yaml` (local path or URI) and return its location."""
    header = f"# resolved by raylab from {cfg.source or 'a mapping'}; re-run with: raylab run THIS_FILE\n"
    return storage.write_text(runs.Run(cfg.output_dir).resolved_config, header + to_yaml(cfg))
