"""Delivery: the platform files (`raylab render`) a model ships with, from the one config.

    from raylab.delivery import render
    render(cfg, "github")                       # .github/workflows/raylab-<name>.yml
    render(cfg, "kuberay", out="cluster/kuberay")

Modules: render (the verb: targets, headers, writing), ci (GitHub, GitLab, MLproject),
cluster (KubeRay manifests, `ray up` YAML, KubeRay's required fields), common (names, the
cluster's overrides, the YAML dumper).
"""

from __future__ import annotations

from raylab.delivery.cluster import REQUIRED, missing_required
from raylab.delivery.render import DEFAULT_OUT, TARGETS, render

__all__ = ["DEFAULT_OUT", "REQUIRED", "TARGETS", "missing_required", "render"]
