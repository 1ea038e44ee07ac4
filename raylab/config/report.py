"""Reading a pydantic schema the way a user reads their YAML: key paths as written, and
error reports that say what was received, what is expected, and which key was meant.

    problems(RaylabConfig, validation_error, raw_mapping)  -> ["train.lrr: unknown key (did you mean train.lr?)", ...]
    is_schema_path(RaylabConfig, ["train", "lr"])          -> True
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation can hold (Optional, Union, Annotated peeled off)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg) if t is not type(None)]
    return [annotation]


def _child(annotation: Any, part: str | int, raw: Any = None) -> Any | None:
    """The annotation reached by stepping `part` (a key or list index) into `annotation`."""
    for t in _unwrap(annotation):
        origin = typing.get_origin(t)
        if origin is list and (isinstance(part, int) or str(part).isdigit()):
            return typing.get_args(t)[0]
        if origin is dict:
            return typing.get_args(t)[1]
        if isinstance(t, type) and issubclass(t, BaseModel):
            members = _unwrap(annotation)
            if len(members) > 1 and isinstance(raw, dict):  # discriminated union: pick by `type`
                chosen = [m for m in members if raw.get("type") in _literals(m, "type")]
                t = chosen[0] if chosen else t
            field = t.model_fields.get(str(part))
            if field is not None:
                return field.annotation
    return None


def _literals(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    field = model.model_fields.get(name)
    return typing.get_args(field.annotation) if field else ()


def is_schema_path(root: type[BaseModel], parts: list[str]) -> bool:
    """Whether a dotted key path (split) names a field of the schema rooted at `root`."""
    annotation: Any = root
    for part in parts:
        annotation = _child(annotation, part)
        if annotation is None:
            return False
    return True


def _keys_at(root: type[BaseModel], parts: list[Any], raw: Any) -> list[str]:
    """Valid keys of the section at `parts` (used to suggest a fix for a misspelled key)."""
    annotation: Any = root
    node = raw
    for part in parts:
        annotation = _child(annotation, part, node)
        node = _descend(node, part)
    node_models = [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    if len(node_models) > 1 and isinstance(node, dict):
        node_models = [m for m in node_models if node.get("type") in _literals(m, "type")] or node_models
    return list(node_models[0].model_fields) if node_models else []


def _all_paths(annotation: Any, prefix: str = "") -> list[str]:
    out = []
    for t in _unwrap(annotation):
        if isinstance(t, type) and issubclass(t, BaseModel):
            for name, field in t.model_fields.items():
                path = f"{prefix}{name}"
                out.append(path)
                out.extend(_all_paths(field.annotation, path + "."))
        elif typing.get_origin(t) is list:
            out.extend(_all_paths(typing.get_args(t)[0], prefix + "0."))
    return out


def _descend(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _suggest(root: type[BaseModel], parts: list[Any], key: str, raw: dict) -> str:
    siblings = _keys_at(root, parts, raw)
    elsewhere = [p for p in _all_paths(root) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:  # the right key in the wrong section
        return f" (did you mean {elsewhere[0]}?)"
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join(map(str, [*parts, close[0]]))}?)"
    if siblings:
        return f"; expected one of: {', '.join(siblings)}"
    return ""


# ---------------------------------------------------------------- error reporting


def _display_loc(loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """Drop pydantic's union-branch tags so the path is the one the user wrote."""
    parts: list[Any] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        )
        if present or last:
            parts.append(part)
            node = _descend(node, part)
    return parts


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def problems(root: type[BaseModel], exc: ValidationError, raw: dict) -> list[str]:
    """One line per validation error: the key path as written, what was received, what is
    expected, and for an unknown key the likely intended one."""
    out = []
    for err in exc.errors():
        parts = _display_loc(tuple(err["loc"]), raw)
        path = ".".join(map(str, parts)) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            out.append(f"{path}: unknown key{_suggest(root, parts[:-1], str(parts[-1]), raw)}")
        elif kind == "missing":
            annotation = _child_annotation(root, parts)
            hint = f"; expected {annotation}" if annotation else ""
            out.append(f"{path}: missing required key{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{path}: {msg}; got {_describe(err.get('input'))}")
    return out


def _child_annotation(root: type[BaseModel], parts: list[Any]) -> str | None:
    """The field description of the key at `parts`, to say what a missing key expects."""
    model: Any = root
    for part in parts[:-1]:
        model = _child(model, part)
    for t in _unwrap(model):
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(str(parts[-1]))
            if field is not None:
                return field.description
    return None
