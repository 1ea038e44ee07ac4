"""The fine-tuning API's request bodies and response objects, in OpenAI's shapes.

A request is a pydantic model that forbids unknown keys, so a misspelt argument is a 400
naming it; `parse` turns a validation error into OpenAI's error body with the key as `param`.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raylab.serve import openai_api as oa

SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # it becomes part of a model name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """OpenAI's supervised hyper-parameters (each may be "auto") and raylab's extension keys."""

    n_epochs: Literal["auto"] | int = Field("auto")
    batch_size: Literal["auto"] | int = Field("auto")
    learning_rate_multiplier: Literal["auto"] | float = Field("auto")
    # raylab's extensions: the adapter and the method (model.method / model.lora)
    lora_r: int | None = Field(None, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0)
    target_modules: list[str] | None = Field(None, min_length=1)
    method: Literal["lora", "full", "hybrid"] | None = None

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive_int(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be 'auto' or an integer of at least 1")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not value > 0:
            raise ValueError("must be 'auto' or a number above 0")
        return value


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: dict | None = None
    reinforcement: dict | None = None


class JobRequest(_Strict):
    """POST /v1/fine_tuning/jobs."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value is not None and not SUFFIX.match(value):
            raise ValueError("at most 64 letters, digits and . _ - (it becomes part of the model's name)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value):
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 and values of at most 512 characters")
        return value

    def hyper(self) -> Hyperparameters:
        """The hyper-parameters wherever the request put them; dpo and reinforcement are a 400."""
        if self.method is not None and self.method.type != "supervised":
            raise oa.ApiError(400, f"method.type {self.method.type!r} is not supported by this service; use "
                              "'supervised'", "method.type", "unsupported_method")
        if self.integrations:
            raise oa.ApiError(400, "integrations are not supported by this service; leave it out", "integrations")
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def parse(raw: bytes, kind: type[BaseModel]) -> BaseModel:
    """A request body as `kind`, or a 400 naming the first bad key."""
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError as e:
        raise oa.ApiError(400, f"the body is not JSON ({e.msg})") from None
    if not isinstance(body, dict):
        raise oa.ApiError(400, "the body should be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("literal[", "int", "float")))
        raise oa.ApiError(400, f"{loc}: {first['msg']}", loc or None, "invalid_value") from None


def too_large(size: int, limit: int) -> oa.ApiError:
    return oa.ApiError(413, f"the file is {size} bytes, more than {limit} (api.max_file_bytes)", "file",
                       "file_too_large")


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def job_object(row: dict) -> dict:
    request = json.loads(row["request"])
    hyper = json.loads(row["hyperparameters"])
    shown = {k: hyper[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {"id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
            "error": json.loads(row["error"]) if row["error"] else None,
            "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
            "hyperparameters": shown, "model": row["model"], "organization_id": row["org"],
            "result_files": json.loads(row["result_files"]), "seed": request["seed"], "status": row["status"],
            "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
            "validation_file": row["validation_file"], "suffix": row["suffix"], "estimated_finish": None,
            "integrations": [], "metadata": request.get("metadata"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": shown}}}


def event_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": json.loads(row["data"]) if row["data"] else None}
