"""Every config key is documented: each field of each model reachable from RaylabConfig
(nested sections, list items, mapping values, union members such as the source types) has a
non-empty description, which docs/config.md and the missing-key report print."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from raylab.config import RaylabConfig


def reachable_models(annotation: Any, seen: dict[type[BaseModel], None] | None = None) -> list[type[BaseModel]]:
    """Every pydantic model `annotation` holds, at any depth: a model's field annotations are
    followed, and so is every type argument (Optional, unions, Annotated, list, tuple, dict)."""
    seen = {} if seen is None else seen
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen[annotation] = None
            for field in annotation.model_fields.values():
                reachable_models(field.annotation, seen)
    for arg in typing.get_args(annotation):
        reachable_models(arg, seen)
    return list(seen)


def undescribed(root: type[BaseModel]) -> list[str]:
    """`Model.field` for every field reachable from `root` without a description."""
    return [f"{model.__name__}.{name}" for model in reachable_models(root)
            for name, field in model.model_fields.items() if not (field.description or "").strip()]


def test_every_config_field_has_a_description():
    missing = undescribed(RaylabConfig)
    assert not missing, f"config fields without a description (Field(description=...)): {missing}"


def test_the_walk_reaches_union_members_and_nested_models():
    names = {m.__name__ for m in reachable_models(RaylabConfig)}
    expected = {"RaylabConfig", "DataConfig", "FileSource", "SqlSource", "HttpSource", "Fields", "ValidationConfig",
                "LoraConfig", "ModelConfig", "TuneConfig", "SearchDim", "AshaConfig", "GoldenPrompt", "GatesConfig",
                "AutoscalingConfig", "ServeConfig", "PretrainConfig", "RayConfig"}
    assert expected <= names, expected - names


# Negative control: a schema with an undescribed field at each depth the walk must reach.
class _Leaf(BaseModel):
    described: int = Field(0, description="a described field")
    blank: int = Field(0, description="  ")


class _InUnion(BaseModel):
    type: Literal["b"] = Field(description="tag")
    bare: str = ""


class _OtherInUnion(BaseModel):
    type: Literal["a"] = Field(description="tag")


class _InMapping(BaseModel):
    bare_value: int = 1


class _Root(BaseModel):
    top: int = 0
    leaf: _Leaf | None = Field(None, description="optional section")
    items: list[Annotated[_OtherInUnion | _InUnion, Field(discriminator="type")]] = Field(
        default_factory=list, description="a list of a discriminated union")
    by_name: dict[str, _InMapping] = Field(default_factory=dict, description="mapping values")


def test_the_check_reports_every_undescribed_field():
    assert sorted(undescribed(_Root)) == ["_InMapping.bare_value", "_InUnion.bare", "_Leaf.blank", "_Root.top"]
