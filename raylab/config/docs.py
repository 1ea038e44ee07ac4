"""The config reference (docs/config.md), generated from the pydantic schema so it cannot
drift: every key with its type, default and description. tests/unit/config/test_docs.py fails
when the committed file differs from what this writes.

    python -m raylab.config.docs > docs/config.md
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raylab.config.root import RaylabConfig

HEADER = """# Config reference

Generated from the schema in `raylab/config/` by `python -m raylab.config.docs > docs/config.md`
(a test keeps it in sync). Unknown keys are errors. `[]` marks a list item, `{}` a mapping
value. Sources (`data.sources[]`) are chosen by their `type`; each type's keys follow.
"""


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list[{', '.join(type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)}]"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"map[{type_name(key)}, {type_name(value)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _models(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, dict):
        args = typing.get_args(annotation)
        return [m for a in (args[1:] if origin is dict else args) for m in _models(a)]
    return [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(section defaults)"
    value = field.default.value if isinstance(field.default, enum.Enum) else field.default
    return "`" + json.dumps(value, default=str) + "`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models(field.annotation)
        kind = "section" if len(nested) == 1 and _models(field.annotation) == [field.annotation] else type_name(field.annotation)
        out.append((path, kind, _default(field), (field.description or "").replace("|", "\\|")))
        origin = typing.get_origin(field.annotation)
        suffix = "[]." if origin in (list, tuple) or "list[" in type_name(field.annotation).split(" | ")[0] else (
            "{}." if origin is dict else ".")
        for sub in nested:
            label = f"{path}{suffix}" if len(nested) == 1 else f"{path}{suffix}(type={_literal(sub)})."
            out += rows(sub, label)
    return out


def _literal(model: type[BaseModel]) -> str:
    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field else ()
    return "/".join(str(a) for a in args) or model.__name__


def render() -> str:
    lines = [HEADER, "| key | type | default | description |", "|---|---|---|---|"]
    for path, kind, default, description in rows(RaylabConfig):
        lines.append(f"| `{path}` | {kind.replace('|', chr(92) + '|')} | {default.replace('|', chr(92) + '|')} | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
