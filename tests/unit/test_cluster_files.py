"""Everything in cluster/ parses and names only raylab keys that exist. No Docker engine,
cloud account or Kubernetes runs here, so these files are checked, not run: the `ray up`
YAML against Ray's own cluster schema, the RayService's serveConfigV2 against Serve's schema
and raylab's application arguments, every `key=value` override against the config schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from raylab.config import RaylabConfig, ServeConfig
from raylab.config import report as config_report

CLUSTER = REPO / "cluster"
COMMAND = re.compile(r"raylab (?:run|submit|serve) ")
OVERRIDE = re.compile(r"(?<![\w/-])([a-z_]+(?:\.[a-z_0-9]+)*)=\S+")


def overrides_in(text: str) -> set[str]:
    """Dotted raylab keys given as key=value to a `raylab run|submit|serve` command, in a
    comment (with its backslash continuations) or in a RayJob's entrypoint."""
    commands, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#") and COMMAND.search(line):
            command, j = line, i
            while command.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                command = command.rstrip()[:-1] + " " + lines[j].lstrip("# ")
            commands.append(command)
    try:
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError:
        docs = []
    commands += [d.get("spec", {}).get("entrypoint", "") for d in docs]
    return {m.group(1) for c in commands if COMMAND.search(c) for m in OVERRIDE.finditer(c[COMMAND.search(c).end():])}


def test_every_yaml_parses_and_names_existing_raylab_keys():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    for f in files:
        text = f.read_text()
        assert list(yaml.safe_load_all(text)), f
        for key in overrides_in(text):
            assert config_report.is_schema_path(RaylabConfig, key.split(".")), f"{f.name}: unknown raylab key {key}"
    assert overrides_in((CLUSTER / "kuberay" / "rayjob.yaml").read_text()) >= {"output_dir", "registry.tracking_uri"}


def test_ray_up_yaml_passes_rays_cluster_schema():
    import jsonschema
    import ray

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert any(t["max_workers"] > t["min_workers"] for t in workers)  # autoscaling groups


def test_rayservice_embeds_a_valid_raylab_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from raylab import serve

    service = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(serve_config)
    app = serve_config["applications"][0]
    assert app["import_path"] == "raylab.serve:build"
    limits = {k for k in ServeConfig.model_fields if k in app["args"]["limits"]}
    assert limits == set(app["args"]["limits"])  # every limit is a serve.* key
    assert {"base", "tracking_uri", "dtype", "threads", "limits"} <= set(app["args"])
    serve.build(app["args"])  # the builder accepts these arguments
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]
    assert ingress["default"] in ingress["routes"].values() and set(ingress["listed"]) <= set(ingress["routes"])


def test_dockerfile_installs_raylab_from_this_repository():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\S+", text, re.M)
    for path in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.M):
        assert (CLUSTER.parent / path).exists(), path
    images = {m for f in CLUSTER.rglob("*.yaml") for m in re.findall(r"image: (\S+)", f.read_text())}
    assert images and all(i.startswith("ghcr.io/acme/raylab:") for i in images)


def test_local_cluster_script_usage():
    done = subprocess.run(["bash", str(CLUSTER / "local.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: cluster/local.sh start" in done.stderr
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")]).returncode == 0


@pytest.mark.parametrize("text,keys", [
    ("#   raylab run c.yaml output_dir=s3://x train.lr=1e-4 --no-serve", {"output_dir", "train.lr"}),
    ("spec:\n  entrypoint: raylab run /c.yaml registry.tracking_uri=http://m:5000", {"registry.tracking_uri"}),
    ("#   raylab serve c.yaml serve.host=0.0.0.0 \\\n#       serve.port=80 --emit-config s.yaml", {"serve.host", "serve.port"}),
])
def test_override_extraction(text, keys):
    assert overrides_in(text) == keys


def test_commands_serving_on_a_reachable_host_set_api_keys():
    # `serve.host=0.0.0.0` without keys fails validation, so a documented command must set them.
    checked = 0
    for f in sorted(CLUSTER.rglob("*.yaml")):
        keys = overrides_in(f.read_text())
        if "serve.host" in keys:
            checked += 1
            assert keys & {"serve.api_keys_env", "serve.api_keys_file", "serve.allow_unauthenticated"}, f.name
    assert checked >= 2  # rayservice.yaml's and ray-cluster.yaml's commands, or this checks nothing
    assert not overrides_in("#   raylab serve c.yaml serve.host=0.0.0.0 --emit-config s.yaml") & {"serve.api_keys_env"}
