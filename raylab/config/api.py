"""The `api:` section: the fine-tuning service (`raylab api CONFIG`, and the same routers in
`raylab serve`'s ingress when `api.enabled`).

    api:
      enabled: true                       # mount /v1/files and /v1/fine_tuning in the ingress
      max_file_bytes: 50000000            # an upload above it is a 413, nothing kept
      base_models:                        # the `model` names a job may ask for -> what they load
        tiny-llama: preset:tiny-llama
      address: http://127.0.0.1:8265      # the Ray dashboard jobs are submitted to

The rest of the config (data rules, model method, train settings, registry, governance) is
the template every job starts from: a job's request overrides only its base model, data
source and hyper-parameters (raylab/serve/ftjobs.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylab.config.types import ModelRef, PathOrUri, PositiveInt, Section


class ApiConfig(Section):
    """The OpenAI-compatible fine-tuning service: files and fine-tuning jobs over Ray Jobs."""

    enabled: bool = Field(False, description="mount the fine-tuning routes (/v1/files, /v1/fine_tuning/jobs) in "
                          "raylab serve's ingress; `raylab api CONFIG --standalone` serves them either way")
    max_file_bytes: PositiveInt = Field(50_000_000, description="the largest upload POST /v1/files accepts (413 above)")
    files: PathOrUri | None = Field(None, description="where uploaded files and job results are kept (a directory or "
                                    "URI the cluster reaches too: a job's data stage reads its training file there; "
                                    "encrypted with governance.encryption); default $RAYLAB_HOME/api/files")
    runs: PathOrUri | None = Field(None, description="where each job's run directory goes (shared storage the "
                                   "cluster reaches); default $RAYLAB_HOME/api/runs")
    base_models: dict[str, ModelRef] = Field(
        default_factory=dict, description="the `model` names a job may fine-tune -> a hub id, a local directory or "
        "preset:NAME; default: model.name_or_path only, under its own name")
    min_examples: PositiveInt = Field(10, description="training files with fewer valid, distinct examples are refused")
    on_pii: Literal["redact", "reject"] = Field(
        "redact", description="personal data found in a training file: redact (the data stage replaces it, the "
        "validation counts it) or reject the file")
    address: str | None = Field(None, description="the Ray dashboard jobs go to (http://HEAD:8265); default "
                                "$RAY_API_SERVER_ADDRESS, else an http:// $RAY_ADDRESS")
    host: str = Field("127.0.0.1", description="`raylab api --standalone`: the address to listen on")
    port: int = Field(8100, ge=1, le=65535, description="`raylab api --standalone`: the port to listen on")
