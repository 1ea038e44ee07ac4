"""Everything in cluster/ parses and names only raylab keys that exist. No Docker engine,
cloud account or Kubernetes runs here, so these files are checked, not run: every
`key=value` override against the config schema, the Dockerfile's paths, the Serve configs'
API keys. The YAML files are rendered by `raylab render` from configs/quickstart.yaml;
tests/unit/delivery/test_render.py checks they are what it writes and validates each
against its platform's schema (Ray's cluster schema, Serve's, KubeRay's required fields)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from conftest import REPO
from raylab.config import RaylabConfig
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


def reachable_without_keys(serve_config: dict) -> bool:
    return serve_config["http_options"]["host"] in ("0.0.0.0", "::") and not any(
        app["args"].get("api_keys_env") or app["args"].get("api_keys_file") for app in serve_config["applications"])


def test_serve_configs_on_a_reachable_host_set_api_keys():
    # `serve.host=0.0.0.0` without keys fails raylab's validation; a shipped Serve config must not do it either.
    configs = [yaml.safe_load((CLUSTER / "kuberay" / "serve.yaml").read_text()),
               yaml.safe_load(yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])]
    assert all(not reachable_without_keys(c) for c in configs)
    open_one = json.loads(json.dumps(configs[0]))  # negative control
    open_one["applications"][0]["args"]["api_keys_env"] = None
    assert reachable_without_keys(open_one)
