"""The cluster targets: KubeRay's RayCluster, RayJob and RayService, and `ray up`'s YAML.

No package ships KubeRay's CRD schemas, so tests check the rendered manifests against the
fields the CRDs require (`REQUIRED` below, from KubeRay v1's API reference:
https://ray-project.github.io/kuberay/reference/api/ and ray-operator/apis/ray/v1/*_types.go).
The `ray up` YAML is checked against `ray/autoscaler/ray-schema.json` of the installed Ray.
"""

from __future__ import annotations

import math

import yaml

from raylab.config import NodeGroup, RaylabConfig
from raylab.delivery import common
from raylab.errors import UserError

RAY_VERSION = "2.60.0"
API_VERSION = "ray.io/v1"

# The fields KubeRay v1's CRDs mark required (`+kubebuilder:validation:Required` or without
# `omitempty` in ray-operator/apis/ray/v1), as dotted paths; `[]` steps into every item.
REQUIRED = {
    "RayCluster": ["apiVersion", "kind", "metadata.name", "spec.headGroupSpec.rayStartParams",
                   "spec.headGroupSpec.template.spec.containers[].name",
                   "spec.headGroupSpec.template.spec.containers[].image",
                   "spec.workerGroupSpecs[].groupName", "spec.workerGroupSpecs[].rayStartParams",
                   "spec.workerGroupSpecs[].template.spec.containers[].name",
                   "spec.workerGroupSpecs[].template.spec.containers[].image"],
    "RayJob": ["apiVersion", "kind", "metadata.name", "spec.entrypoint",
               "spec.rayClusterSpec.headGroupSpec.rayStartParams",
               "spec.rayClusterSpec.headGroupSpec.template.spec.containers[].name",
               "spec.rayClusterSpec.headGroupSpec.template.spec.containers[].image",
               "spec.rayClusterSpec.workerGroupSpecs[].groupName",
               "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers[].image"],
    "RayService": ["apiVersion", "kind", "metadata.name", "spec.serveConfigV2",
                   "spec.rayClusterConfig.headGroupSpec.rayStartParams",
                   "spec.rayClusterConfig.headGroupSpec.template.spec.containers[].name",
                   "spec.rayClusterConfig.headGroupSpec.template.spec.containers[].image",
                   "spec.rayClusterConfig.workerGroupSpecs[].groupName",
                   "spec.rayClusterConfig.workerGroupSpecs[].template.spec.containers[].image"],
}


def _env(cfg: RaylabConfig, keys: str | None = None) -> list[dict]:
    """The containers' environment; `keys`: the variable the ingress reads the API keys
    from, filled from platform.api_keys_secret."""
    out = [{"name": k, "value": v} for k, v in common.env(cfg).items()]
    if keys:
        if not cfg.platform.api_keys_secret:
            raise UserError(f"platform.api_keys_secret: the Serve config reads API keys from ${keys}; name the "
                            "Kubernetes Secret (key `keys`) that holds them")
        out.append({"name": keys, "valueFrom": {"secretKeyRef": {"name": cfg.platform.api_keys_secret, "key": "keys"}}})
    return out


def _resources(group: NodeGroup) -> dict:
    limits = {"cpu": str(group.cpus), "memory": group.memory}
    if group.gpus:
        limits["nvidia.com/gpu"] = str(group.gpus)
    return {"limits": limits, "requests": dict(limits)}


def _container(cfg: RaylabConfig, role: str, group: NodeGroup, ports: list[dict] | None = None, keys: str | None = None,
               config_volume: bool = False) -> dict:
    image = cfg.platform.gpu_image if group.gpus and cfg.platform.gpu_image else cfg.platform.image
    c = {"name": f"ray-{role}", "image": image, "env": _env(cfg, keys)}
    if ports:
        c["ports"] = ports
    if config_volume:
        c["volumeMounts"] = [{"name": "config", "mountPath": "/config"}]
    c["resources"] = _resources(group)
    return c


def _pod(container: dict, config_volume: bool, cfg: RaylabConfig) -> dict:
    spec = {"containers": [container]}
    if config_volume:
        spec["volumes"] = [{"name": "config", "configMap": {"name": f"{common.name(cfg)}-config"}}]
    return {"spec": spec}


def _cluster_spec(cfg: RaylabConfig, workers: NodeGroup, replicas: int | None = None, ports: bool = True,
                  keys: str | None = None, config_volume: bool = False) -> dict:
    head_ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    head = _container(cfg, "head", cfg.platform.head, head_ports if ports else None, keys, config_volume)
    worker = _container(cfg, "worker", workers, None, keys, config_volume)
    start = {"num-cpus": str(workers.cpus)} | ({"num-gpus": str(workers.gpus)} if workers.gpus else {})
    fixed = replicas is not None
    return {
        "rayVersion": RAY_VERSION,
        **({} if fixed else {"enableInTreeAutoscaling": True}),
        # The head schedules and serves the dashboard; stages run on workers.
        "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                          "template": _pod(head, config_volume, cfg)},
        "workerGroupSpecs": [{
            "groupName": "workers",
            "replicas": replicas if fixed else workers.min_nodes,
            "minReplicas": replicas if fixed else workers.min_nodes,
            "maxReplicas": replicas if fixed else workers.max_nodes,
            "rayStartParams": start,
            "template": _pod(worker, config_volume, cfg),
        }],
    }


def _metadata(cfg: RaylabConfig, suffix: str = "") -> dict:
    meta = {"name": common.name(cfg) + suffix, "labels": {"app.kubernetes.io/part-of": "raylab",
                                                          "raylab/model": common.model_name(cfg)}}
    if cfg.platform.namespace:
        meta["namespace"] = cfg.platform.namespace
    return meta


def job_nodes(cfg: RaylabConfig) -> int:
    """Worker nodes a run on the cluster needs (its train section after platform.overrides):
    the train workers' CPUs plus one (Ray Data's read tasks need a whole free CPU beside
    them) and their GPUs, over one node's, within platform.workers' min and max nodes."""
    from raylab import config

    t = config.load_dict(cfg.model_dump(mode="json"), cfg.platform.overrides).train
    w = cfg.platform.workers
    need = math.ceil((t.max_workers * t.cpus_per_worker + 1) / w.cpus)
    if t.gpus_per_worker:
        if not w.gpus:
            raise UserError(f"platform.workers.gpus: train.gpus_per_worker is {t.gpus_per_worker}, but the worker "
                            "nodes have no GPUs")
        need = max(need, math.ceil(t.max_workers * t.gpus_per_worker / w.gpus))
    return min(max(need, w.min_nodes, 1), w.max_nodes)


def raycluster(cfg: RaylabConfig) -> dict:
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(cfg),
            "spec": _cluster_spec(cfg, cfg.platform.workers)}


def rayjob(cfg: RaylabConfig) -> dict:
    config_file = "/config/" + common.config_path(cfg).rsplit("/", 1)[-1]
    entry = common.command("raylab", "run", config_file, "--no-serve", *common.cluster_overrides(cfg))
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(cfg, "-run"), "spec": {
        "entrypoint": entry,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": common.env(cfg)}, sort_keys=False),
        "rayClusterSpec": _cluster_spec(cfg, cfg.platform.workers, replicas=job_nodes(cfg), ports=False,
                                        config_volume=True),
    }}


def rayservice(cfg: RaylabConfig, serve_config: dict) -> dict:
    keys = {(app.get("args") or {}).get("api_keys_env") for app in serve_config["applications"]} - {None}
    if len(keys) > 1:
        raise UserError(f"--serve-config: its applications read API keys from different variables {sorted(keys)}")
    spec = _cluster_spec(cfg, cfg.platform.workers, keys=next(iter(keys), None))
    return {"apiVersion": API_VERSION, "kind": "RayService", "metadata": _metadata(cfg, "-serve"), "spec": {
        "serveConfigV2": common.dump(serve_config),
        "rayClusterConfig": spec,
    }}


def ray_up(cfg: RaylabConfig) -> dict:
    p, w = cfg.platform, cfg.platform.workers
    for key, group in (("head", p.head), ("workers", w)):
        if not group.instance_type:
            raise UserError(f"platform.{key}.instance_type: --target ray-up needs the cloud instance type")
    env_flags = " ".join(f"-e {k}={v}" for k, v in common.env(cfg).items())
    workers = {"node_config": {"InstanceType": w.instance_type, "ImageId": p.cloud.image_id},
               "resources": {}, "min_workers": w.min_nodes, "max_workers": w.max_nodes}
    if w.gpus and p.gpu_image:
        workers["docker"] = {"worker_image": p.gpu_image}
    return {
        "cluster_name": common.name(cfg),
        "max_workers": w.max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": p.cloud.provider, "region": p.cloud.region, "cache_stopped_nodes": False},
        "docker": {"image": p.image, "container_name": "raylab", "pull_before_run": True,
                   "run_options": ["--ulimit nofile=65536:65536", env_flags]},
        "auth": {"ssh_user": p.cloud.ssh_user},
        "available_node_types": {
            # The head schedules; stages run on workers.
            "head": {"node_config": {"InstanceType": p.head.instance_type, "ImageId": p.cloud.image_id},
                     "resources": {"CPU": 0}, "min_workers": 0, "max_workers": 0},
            "workers": workers,
        },
        "head_node_type": "head",
        "setup_commands": [],
        "head_start_ray_commands": ["ray stop", "ray start --head --port=6379 --dashboard-host=0.0.0.0 "
                                    "--autoscaling-config=~/ray_bootstrap_config.yaml"],
        "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
    }


def missing_required(doc: dict) -> list[str]:
    """The REQUIRED fields of the manifest's kind that it lacks (empty when complete)."""
    return [path for path in REQUIRED[doc["kind"]] if not _present(doc, path.split("."))]


def _present(node, parts: list[str]) -> bool:
    """Whether `node` has the path: each key there and not null (an empty map is a value:
    rayStartParams: {}); a `[]` step needs a non-empty list whose every item has the rest."""
    if not parts:
        return node is not None and node != ""
    key, every = parts[0].removesuffix("[]"), parts[0].endswith("[]")
    if not isinstance(node, dict) or node.get(key) is None:
        return False
    if every:
        items = node[key]
        return isinstance(items, list) and bool(items) and all(_present(i, parts[1:]) for i in items)
    return _present(node[key], parts[1:])
