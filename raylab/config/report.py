"""Reading a pydantic schema the way a user reads their YAML: key paths as written, and
error reports that say what was received, what is expected, and which key was meant.

    problems(RaylabConfig, validation_error, raw_mapping)  -> ["train.lrr: unknown key (did you mean train.lr?)", ...]
    is_schema_path(RaylabConfig, ["train", "lr"])          -> True

A section's cross-field check raises `types.invalid(problem, at="key.relative.to.section")`;
`problems` prints it as `<section>.<key>: <problem>` (see `types.invalid`).
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from raylab.config.types import CROSS_FIELD


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types an annotation can hold (Optional, Union, Annotated peeled off)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg) if t is not type(None)]
    return [annotation]


def _models(annotation: Any, raw: Any) -> list[type[BaseModel]]:
    """The models `annotation` holds; of a discriminated union, the member that `raw`'s `type`
    picks (all members when `raw` does not say)."""
    members = [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    if len(members) > 1 and isinstance(raw, dict):
        members = [m for m in members if raw.get("type") in _literals(m, "type")] or members
    return members


def _model(annotation: Any, raw: Any) -> type[BaseModel] | None:
    models = _models(annotation, raw)
    return models[0] if models else None


def _child(annotation: Any, part: str | int, raw: Any = None) -> Any | None:
    """The annotation reached by stepping `part` (a key or list index) into `annotation`;
    `raw` (the user's value at `annotation`) picks a discriminated union's member."""
    for t in _unwrap(annotation):
        origin = typing.get_origin(t)
        if origin is list and (isinstance(part, int) or str(part).isdigit()):
            return typing.get_args(t)[0]
        if origin is dict:
            return typing.get_args(t)[1]
    for model in _models(annotation, raw):
        field = model.model_fields.get(str(part))
        if field is not None:
            return field.annotation
    return None


def _literals(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    field = model.model_fields.get(name)
    return typing.get_args(field.annotation) if field else ()


def _resolve(annotation: Any, parts: list[Any], raw: Any = None) -> Any | None:
    """The annotation at key path `parts` below `annotation` (None if the path is not in the
    schema), following the user's values in `raw` to pick union members."""
    node = raw
    for part in parts:
        annotation = _child(annotation, part, node)
        if annotation is None:
            return None
        node = _descend(node, part)
    return annotation


def is_schema_path(root: type[BaseModel], parts: list[str]) -> bool:
    """Whether a dotted key path (split) names a field of the schema rooted at `root`."""
    return _resolve(root, parts) is not None


def _keys_at(root: type[BaseModel], parts: list[Any], raw: Any) -> list[str]:
    """Valid keys of the section at `parts` (used to suggest a fix for a misspelled key)."""
    model = _model(_resolve(root, parts, raw), _descend_path(raw, parts))
    return list(model.model_fields) if model else []


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
    if isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _descend_path(node: Any, parts: list[Any]) -> Any:
    for part in parts:
        node = _descend(node, part)
    return node


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


def _display_loc(root: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """The error's key path as the user wrote it. Below a union, pydantic's location names
    the member it tried ('http' for a source of type http, 'constrained-int' for one side of
    `int | tuple`); that is no key of the user's, so it is dropped."""
    parts: list[Any] = []
    annotation: Any = root
    node = raw
    after_union = False
    for i, part in enumerate(loc):
        if after_union:
            after_union = False
            continue  # the member's name; the annotation stays the union (_child picks the member)
        last = i == len(loc) - 1
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        )
        if annotation is not None:
            annotation = _child(annotation, part, node)
            after_union = annotation is not None and len(_unwrap(annotation)) > 1
        if present or last:  # a part neither written nor last is another member name: drop it
            parts.append(part)
            node = _descend(node, part)
    return parts


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _cross_field(root: type[BaseModel], parts: list[Any], err: dict, raw: Any) -> tuple[list[Any], str]:
    """(path, message) of a `types.invalid` error: its `at` key joined onto the section's path
    when `at` names a key of that section, so the key is printed once, as the path."""
    ctx = err.get("ctx") or {}
    at = [p for p in str(ctx.get("at") or "").split(".") if p]
    if at and _resolve(_resolve(root, parts, raw), at, _descend_path(raw, parts)) is not None:
        return [*parts, *at], str(ctx["problem"])
    return parts, err["msg"]  # no key, or a key the schema lacks: keep it in the message


def _at_section(root: type[BaseModel], parts: list[Any], raw: Any) -> bool:
    """Whether `parts` is a section (a model): its error's input is the whole mapping."""
    return _model(_resolve(root, parts, raw), _descend_path(raw, parts)) is not None


def problems(root: type[BaseModel], exc: ValidationError, raw: dict) -> list[str]:
    """One line per validation error: the key path as written, what was received, what is
    expected, and for an unknown key the likely intended one."""
    out = []
    for err in exc.errors():
        parts = _display_loc(root, tuple(err["loc"]), raw)
        kind = err["type"]
        if kind == CROSS_FIELD:  # the message names the values it is about
            parts, line = _cross_field(root, parts, err, raw)
        elif kind == "extra_forbidden":
            line = f"unknown key{_suggest(root, parts[:-1], str(parts[-1]), raw)}"
        elif kind == "missing":
            description = _description(root, parts, raw)
            line = "missing required key" + (f"; expected {description}" if description else "")
        else:
            line = err["msg"].removeprefix("Value error, ")
            # A section's input is its whole mapping: too long to read, and the message says
            # what is wrong with it. A key's input is the value the user wrote: show it.
            if not (isinstance(err.get("input"), dict) and _at_section(root, parts, raw)):
                line += f"; got {_describe(err.get('input'))}"
        out.append(f"{'.'.join(map(str, parts)) or '(top level)'}: {line}")
    return out


def _description(root: type[BaseModel], parts: list[Any], raw: Any) -> str | None:
    """The field description of the key at `parts`, to say what a missing key expects."""
    model = _model(_resolve(root, parts[:-1], raw), _descend_path(raw, parts[:-1]))
    field = model.model_fields.get(str(parts[-1])) if model else None
    return field.description if field else None
