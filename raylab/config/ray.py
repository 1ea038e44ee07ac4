"""The `ray:` section: how raylab reaches Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raylab.config.types import Section


class RayConfig(Section):
    """How raylab reaches Ray (precedence: --address, RAY_ADDRESS, this, embedded local)."""

    address: str | None = Field(None, description="'auto', 'HOST:PORT', 'ray://HOST:10001' or null (embedded)")
    num_cpus: float | None = Field(
        None, gt=0, description="logical CPUs of the embedded Ray; default max(4, 2 x cores)"
    )
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded Ray; default: detected")
    auth: Literal["token", "disabled"] | None = Field(
        None, description="token authentication; default $RAY_AUTH_MODE, else token"
    )
    dashboard: bool = Field(False, description="start the embedded Ray's dashboard even when no stage needs it")
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535, description="the embedded Ray's Prometheus port (its metrics agent, dashboard or "
        "not); default a free port Ray picks (ray.nodes()[i]['MetricsExportPort']). A cluster's: ray start "
        "--metrics-export-port")
    namespace: str = Field("raylab", description="Ray namespace of raylab's actors and jobs")
