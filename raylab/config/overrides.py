"""Command-line overrides: `key.path=VALUE`, read as YAML and set into the raw config mapping.

    raylab train configs/quickstart.yaml train.lr=1e-4 data.sources.0.path=more.jsonl tune=null

The value is read as a YAML scalar or flow collection and coerced later by the schema; list
items are addressed by index (one past the end appends); an override may create a section
that the file does not have.
"""

from __future__ import annotations

from typing import Any

import yaml

from raylab.errors import UserError


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b.0.c=VALUE` -> ("a.b.0.c", VALUE read as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except RecursionError:  # `[[[...]]]` hundreds deep; shallower nesting is loading's check
        raise UserError(f"override {key}: value is nested too deep") from None
    except yaml.YAMLError as e:
        raise UserError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__}); quote it") from None
    return key, value


def apply_override(raw: dict, key: str, value: Any) -> None:
    """Set `key` (dotted, list items by index) in `raw`, creating absent sections."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "(top level)"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise UserError(f"override {key}: {here} is a list; address its items by index ({here}.0)")
            idx = int(part)
            if idx > len(node):
                raise UserError(f"override {key}: {here} has {len(node)} items; index {idx} is out of range")
            if idx == len(node):
                node.append(value if last else {})
            elif last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    if node.get(part) is not None:
                        raise UserError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(f"override {key}: {here} is a value, not a section")
