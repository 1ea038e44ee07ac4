"""The `platform:` section: where the job runs when it is not on this machine, as much as
`raylab render` needs to write the platform files (CI pipelines, KubeRay, `ray up`) from the
same config. Nothing else reads it: a laptop run ignores it.

    raylab render configs/quickstart.yaml --target kuberay --out cluster/kuberay
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylab.config.types import PositiveInt, Section, invalid

QUANTITY = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$"  # a Kubernetes resource quantity (8Gi, 512Mi)


class NodeGroup(Section):
    """One kind of node: its size, and (for workers) how many."""

    cpus: PositiveInt = Field(description="CPUs per node (a pod's limit; `ray start --num-cpus` on KubeRay)")
    memory: str = Field("8Gi", pattern=QUANTITY, description="memory per node, as Kubernetes writes it (8Gi)")
    gpus: int = Field(0, ge=0, description="GPUs per node")
    min_nodes: int = Field(1, ge=0, description="autoscaling floor (workers)")
    max_nodes: PositiveInt = Field(1, description="autoscaling ceiling (workers)")
    instance_type: str | None = Field(None, description="cloud instance type for `ray up` (m6i.4xlarge)")

    @model_validator(mode="after")
    def _range(self) -> NodeGroup:
        if self.min_nodes > self.max_nodes:
            raise invalid(f"min_nodes ({self.min_nodes}) > max_nodes ({self.max_nodes})")
        return self


class CiConfig(Section):
    """The delivery pipeline the GitHub and GitLab targets write."""

    branch: str = Field("main", min_length=1, description="the branch whose pushes run the pipeline")
    watch: list[str] = Field(default_factory=list, description="more paths whose change retrains (globs); the "
                             "config, its suite files and its file sources inside the repository always do")
    schedule: str | None = Field(None, description="cron line for scheduled retraining (SQL/HTTP sources change "
                                 "without a commit), e.g. '0 3 * * 1'")
    environment: str = Field("production", min_length=1, description="the deployment environment whose approval "
                             "gates promotion (GitHub environment protection rules; a manual GitLab job)")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 5:
            raise ValueError(f"{v!r}: expected five cron fields (minute hour day month weekday)")
        return v


class CloudConfig(Section):
    """`ray up`'s provider."""

    provider: Literal["aws"] = Field("aws", description="aws (the one provider rendered so far)")
    region: str = Field("eu-west-1", min_length=1, description="the provider's region")
    ssh_user: str = Field("ubuntu", description="the nodes' SSH user")
    image_id: str = Field("latest_dlami", description="the nodes' machine image (AWS ImageId)")


class PlatformConfig(Section):
    """The cluster and the delivery pipeline that `raylab render` writes files for."""

    name: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40,
                             description="resource names (Kubernetes, `ray up`); default: registry.model_name, "
                             "lower-cased")
    image: str = Field("ghcr.io/acme/raylab:latest", min_length=1, description="the raylab image (cluster/Dockerfile)")
    gpu_image: str | None = Field(None, description="the image of GPU nodes (default: image)")
    output_dir: str | None = Field(None, description="the run directory on the cluster: shared storage every node "
                                   "sees (s3://bucket/runs/NAME); default: output_dir")
    tracking_uri: str | None = Field(None, description="the MLflow server the cluster and CI use; default: "
                                     "registry.tracking_uri")
    dashboard: str | None = Field(None, pattern=r"^https?://",
                                  description="the cluster's Ray dashboard, where CI submits jobs (`raylab submit "
                                  "--address`); default: the rendered RayCluster's head service, http://NAME-head-svc:8265")
    serve_dashboard: str | None = Field(None, pattern=r"^https?://",
                                        description="the Ray dashboard of the cluster that serves (`raylab deploy "
                                        "--address` after a promotion); default: the rendered RayService's head "
                                        "service, http://NAME-serve-head-svc:8265")
    namespace: str | None = Field(None, description="Kubernetes namespace of the rendered resources")
    api_keys_secret: str | None = Field("raylab-api-keys", description="Kubernetes Secret (key `keys`) holding "
                                        "serve.api_keys_env's value")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for runs on the cluster "
                                 "(after output_dir and registry.tracking_uri)")
    head: NodeGroup = Field(default_factory=lambda: NodeGroup(cpus=2, instance_type="m6i.large"),
                            description="the head node (schedules; runs no stage)")
    workers: NodeGroup = Field(default_factory=lambda: NodeGroup(cpus=4, memory="16Gi", max_nodes=4,
                                                                 instance_type="m6i.xlarge"),
                               description="the worker nodes")
    cloud: CloudConfig = Field(default_factory=CloudConfig, description="`ray up`'s cloud provider")
    ci: CiConfig = Field(default_factory=CiConfig, description="the GitHub / GitLab delivery pipeline")

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if not re.match(r"^[A-Za-z_][\w.]*=", o)]
        if bad:
            raise ValueError(f"{bad}: expected key=value")
        return v
