"""Value types shared by the config sections, the `Section` base (unknown keys are errors;
assignments are validated too), and `invalid`, the error a section's cross-field check raises."""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def is_uri(value: str) -> bool:
    return "://" in value


def _absolute(value: str | None) -> str | None:
    """Local paths become absolute; URIs (s3://, gs://, file://) and env refs stay as given."""
    if value is None or is_uri(value) or "${" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _model_ref(value: str) -> str:
    """`preset:NAME` and hub ids stay; anything that looks like or is a local path is made
    absolute, so a saved adapter's base path still resolves from another directory."""
    if value.startswith("preset:") or is_uri(value) or "${" in value:
        return value
    looks_local = value.startswith(("/", "./", "../", "~")) or os.path.exists(value)
    return os.path.abspath(os.path.expanduser(value)) if looks_local else value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PathOrUri = Annotated[str, AfterValidator(_absolute)]
ModelRef = Annotated[str, AfterValidator(_model_ref)]
StrList = Annotated[list[str], BeforeValidator(_as_list)]
PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CROSS_FIELD = "cross_field"


def invalid(problem: str, at: str = "") -> PydanticCustomError:
    """The error a section's cross-field check (a `model_validator`) raises.

        raise invalid(f"only used by method: hybrid (method is {self.method})", at="lora.modules_to_save")
        raise invalid(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")

    `at` is the one key the problem is about, as a dotted path relative to the section; for a
    rule between several keys leave it out and name each key, with its value, in `problem`.
    `report.problems` prints `<section path>.<at>: <problem>`, so the key appears once, as the
    path, and prints no `got` (pydantic's input here is the whole section mapping, which would
    bury the values the problem names).
    """
    return PydanticCustomError(CROSS_FIELD, "{at}: {problem}" if at else "{problem}", {"at": at, "problem": problem})
