"""`raylab render`: every target's files validate against the schema their platform reads
(GitHub's and GitLab's as check-jsonschema vendors them, Ray's cluster schema, Serve's
ServeDeploySchema, KubeRay's required fields, MLflow's MLproject loader), cluster/ is what
render writes from configs/quickstart.yaml, and a config change reaches every file."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_here
from raylab import config, delivery, registry
from raylab.errors import UserError
from registry_helpers import META, fake_final, open_test_store

QUICKSTART = "configs/quickstart.yaml"
SERVE_YAML = "cluster/kuberay/serve.yaml"


@pytest.fixture
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # render names files relative to the repository, as CI reads them


def load(*overrides: str) -> config.RaylabConfig:
    return config.load(QUICKSTART, list(overrides))


def rendered(cfg, target: str, **kw) -> dict[str, str]:
    return {Path(p).name: text for p, text in delivery.render(cfg, target, write=False, **kw).items()}


def check_jsonschema(schema: str, text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / "file.yml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(f)],
                          capture_output=True, text=True)


def test_cluster_files_are_what_render_writes(at_repo):
    cfg = load()
    kuberay = rendered(cfg, "kuberay", serve_config=SERVE_YAML)
    assert set(kuberay) == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    for name, text in kuberay.items():
        assert (REPO / "cluster" / "kuberay" / name).read_text() == text, f"re-render cluster/kuberay/{name}"
    ray_up = rendered(cfg, "ray-up")
    assert (REPO / "cluster" / "ray-cluster.yaml").read_text() == ray_up["ray-cluster.yaml"], "re-render cluster/ray-cluster.yaml"


@pytest.mark.parametrize("target,schema", [("github", "vendor.github-workflows"), ("gitlab", "vendor.gitlab-ci")])
def test_ci_files_pass_their_platforms_schema(at_repo, tmp_path, target, schema):
    (text,) = rendered(load(), target).values()
    done = check_jsonschema(schema, text, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = yaml.safe_load(text)  # negative control: the same file with one job the schema rejects
    if target == "github":
        del broken["jobs"]["test"]["runs-on"]
    else:
        broken["test"]["needs"] = {"not": "a list"}
    bad = check_jsonschema(schema, yaml.safe_dump(broken), tmp_path)
    assert bad.returncode == 1 and ("runs-on" in bad.stdout if target == "github" else "needs" in bad.stdout), bad.stdout


def test_ci_pipeline_runs_submit_then_tests_then_an_approved_promote(at_repo):
    cfg = load()
    gh = yaml.safe_load(rendered(cfg, "github")["raylab-acme-assistant.yml"])
    push = gh["on"]["push"]  # quoted in the file: PyYAML would read a bare `on` as true
    assert push["paths"][:2] == [QUICKSTART, "examples/acme/faq.csv"] and "examples/acme/handbook/**" in push["paths"]
    jobs = gh["jobs"]
    assert "raylab submit configs/quickstart.yaml --address http://acme-assistant-head-svc:8265 --until train" \
        in jobs["train"]["steps"][1]["run"]
    assert "registry.auto_promote=false" in jobs["train"]["steps"][1]["run"]
    assert "raylab models evaluate acme-assistant/${VERSION} --junit reports/gates.xml" in jobs["test"]["steps"][1]["run"]
    assert jobs["test"]["needs"] == "train" and jobs["promote"]["needs"] == ["train", "test"]
    assert jobs["promote"]["environment"] == "production"
    assert "raylab deploy acme-assistant@production --address http://acme-assistant-serve-head-svc:8265" \
        in jobs["promote"]["steps"][0]["run"]
    gl = yaml.safe_load(rendered(cfg, "gitlab")[".gitlab-ci.yml"])
    assert gl["test"]["artifacts"]["reports"]["junit"] == "reports/gates.xml"
    assert all(r["when"] == "manual" for r in gl["promote"]["rules"]) and gl["promote"]["environment"]["name"] == "production"
    assert gl["train"]["rules"][0]["changes"] == push["paths"]


def test_suite_files_and_a_schedule_trigger_the_pipeline(at_repo, tmp_path):
    suite = REPO / "configs" / "_test_suite_render.yaml"
    suite.write_text("golden: [{prompt: hi, contains: hello}]\n")
    try:
        cfg = load(f"registry.gates.suites=[{suite.relative_to(REPO)}]", "platform.ci.schedule=0 3 * * 1")
        gh = yaml.safe_load(rendered(cfg, "github")["raylab-acme-assistant.yml"])
    finally:
        suite.unlink()
    on = gh["on"]
    assert "configs/_test_suite_render.yaml" in on["push"]["paths"] and on["schedule"] == [{"cron": "0 3 * * 1"}]


def test_ray_up_yaml_passes_rays_cluster_schema(at_repo):
    import jsonschema
    import ray

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    doc = yaml.safe_load(rendered(load(), "ray-up")["ray-cluster.yaml"])
    jsonschema.validate(doc, schema)
    broken = copy.deepcopy(doc)
    broken["available_node_types"]["workers"]["min_workers"] = "one"  # negative control
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    gpu = yaml.safe_load(rendered(load("platform.workers.gpus=1", "platform.gpu_image=ghcr.io/acme/raylab:gpu"),
                                  "ray-up")["ray-cluster.yaml"])
    jsonschema.validate(gpu, schema)
    assert gpu["available_node_types"]["workers"]["docker"] == {"worker_image": "ghcr.io/acme/raylab:gpu"}


def test_kuberay_manifests_have_the_fields_kuberays_crds_require(at_repo):
    docs = {n: yaml.safe_load(t) for n, t in rendered(load(), "kuberay", serve_config=SERVE_YAML).items()}
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob", "RayService"}
    for name, doc in docs.items():
        assert delivery.missing_required(doc) == [], name
    job = copy.deepcopy(docs["rayjob.yaml"])  # negative controls: the check finds what is missing
    del job["spec"]["entrypoint"]
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image")
    assert delivery.missing_required(job) == ["spec.entrypoint",
                                              "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers[].image"]
    # 4 workers x 2 CPUs (platform.overrides) + 1 for Ray Data, on 8-CPU nodes: 2 nodes
    workers = docs["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["maxReplicas"] == 2
    entry = docs["rayjob.yaml"]["spec"]["entrypoint"]
    assert entry.startswith("raylab run /config/quickstart.yaml --no-serve output_dir=s3://acme-raylab/runs/quickstart")
    service = docs["rayservice.yaml"]
    env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAYLAB_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "raylab-api-keys", "key": "keys"}}} in env


def test_embedded_serve_config_passes_serves_schema_and_raylabs_builder(at_repo):
    from ray.serve.schema import ServeDeploySchema

    from raylab import serve
    from raylab.config import ServeConfig

    service = yaml.safe_load(rendered(load(), "kuberay", serve_config=SERVE_YAML)["rayservice.yaml"])
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / SERVE_YAML).read_text())
    ServeDeploySchema.parse_obj(embedded)
    app = embedded["applications"][0]
    assert app["import_path"] == "raylab.serve:build" and set(app["args"]["limits"]) <= set(ServeConfig.model_fields)
    serve.build(app["args"])  # the builder accepts these arguments
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"]
    assert ingress["default"] in ingress["routes"].values() and set(ingress["listed"]) <= set(ingress["routes"])
    assert embedded["http_options"]["host"] == "0.0.0.0" and app["args"]["api_keys_env"]  # reachable: keys on


def test_mlproject_loads_in_mlflow(at_repo, tmp_path):
    from mlflow.projects import _project_spec

    (tmp_path / "MLproject").write_text(rendered(load(), "mlflow-project")["MLproject"])
    project = _project_spec.load_project(str(tmp_path))
    assert project.name == "acme-assistant" and project.docker_env["image"] == "ghcr.io/acme/raylab:latest"
    main = project.get_entry_point("main").compute_command({"overrides": "train.lr=1e-4"}, str(tmp_path))
    assert main == "raylab run configs/quickstart.yaml --no-serve train.lr=1e-4"
    ev = project.get_entry_point("evaluate").compute_command({"version": "3"}, str(tmp_path))
    assert ev == "raylab models evaluate acme-assistant/3 --junit reports/gates.xml"


def _register(store, tmp_path: Path, name: str, n: int) -> None:
    cfg = config.load_dict({"version": 1, "output_dir": str(tmp_path / "run"), "data": {"sources": [
        {"type": "jsonl", "path": str(tmp_path / "x.jsonl")}]}, "model": {"name_or_path": "preset:tiny-llama"},
        "registry": {"model_name": name}})
    exp = registry.experiment_id(store, name)
    run_id = registry.log_run(store, exp, name=f"{name}{n}", key=f"{name}{n}", params={}, history=[], artifacts={},
                              tags={})
    registry.register(store, cfg, run_id, str(fake_final(tmp_path, f"{name}-final{n}")), META)
    registry.set_tags(store, name, n, {"raylab.gates.status": "passed"})
    registry.promote(store, name, n)


def test_serve_target_is_serve_emit_config_and_passes_serves_schema(at_repo, tmp_path, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from raylab import serve

    store = open_test_store(tmp_path, monkeypatch)
    _register(store, tmp_path, "acme-assistant", 1)
    cfg = load(f"registry.tracking_uri={store.uri}")
    (text,) = rendered(cfg, "serve").values()
    ServeDeploySchema.parse_obj(yaml.safe_load(text))
    emitted = tmp_path / "emitted.yaml"
    serve.emit(str(emitted), cfg, "acme-assistant@production")  # `raylab serve --emit-config`: the same file
    assert emitted.read_text() == text
    with_service = rendered(cfg, "kuberay", model="acme-assistant@production")
    embedded = yaml.safe_load(yaml.safe_load(with_service["rayservice.yaml"])["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(text)


def test_a_config_change_reaches_every_rendered_file(at_repo, tmp_path, monkeypatch):
    store = open_test_store(tmp_path, monkeypatch)
    for name in ("acme-assistant", "acme-helper"):
        _register(store, tmp_path, name, 1)
    before, after = {}, {}
    for out, name in ((before, "acme-assistant"), (after, "acme-helper")):
        cfg = load(f"registry.tracking_uri={store.uri}", f"registry.model_name={name}",
                   f"platform.tracking_uri=http://mlflow-{name}:5000")
        for target in delivery.TARGETS:
            for file, text in rendered(cfg, target, model=None if target not in ("serve", "kuberay")
                                       else f"{name}@production").items():
                out[(target, file.replace(name, "NAME"))] = text
    assert set(before) == set(after) and len(before) == 8  # github, gitlab, 3 kuberay, ray-up, serve, MLproject
    for key in before:
        assert before[key] != after[key], key
        assert "acme-helper" in after[key] and "acme-assistant" not in after[key], key


def test_user_errors_name_the_key(at_repo, monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"platform.output_dir: the run directory on a cluster must be storage"):
        rendered(load("platform.output_dir=null", "output_dir=runs/x"), "kuberay")
    with pytest.raises(UserError, match=r"platform.tracking_uri: the cluster and CI need an MLflow server"):
        rendered(load("platform.tracking_uri=null"), "github")
    with pytest.raises(UserError, match=r"platform.workers.instance_type: --target ray-up needs"):
        rendered(load("platform.workers={cpus: 8}"), "ray-up")
    with pytest.raises(UserError, match="--serve-config nope.yaml: file not found"):
        rendered(load(), "kuberay", serve_config="nope.yaml")
    with pytest.raises(config.ConfigError, match=r"platform.overrides.0: train.lrr: not a config key"):
        load("platform.overrides=[train.lrr=1]")
    with pytest.raises(config.ConfigError, match=r"platform.ci.schedule"):
        load("platform.ci.schedule=daily")
    monkeypatch.chdir(tmp_path)  # the config outside the directory render runs in
    with pytest.raises(UserError, match="outside the directory raylab render runs in"):
        rendered(config.load(REPO / QUICKSTART), "github")


def test_cli_writes_into_out_and_refuses_flags_of_other_targets(tmp_path):
    out = cli_here("render", QUICKSTART, "--target", "gitlab", "--out", str(tmp_path / "ci"))
    assert out.returncode == 0 and f"wrote {tmp_path / 'ci' / '.gitlab-ci.yml'}" in out.stdout, out.stderr
    assert (tmp_path / "ci" / ".gitlab-ci.yml").read_text() == rendered_at_repo("gitlab")[".gitlab-ci.yml"]
    wrong = cli_here("render", QUICKSTART, "--target", "github", "--model", "acme-assistant/1")
    assert wrong.returncode == 2 and "--model and --serve-config apply to --target kuberay and serve" in wrong.stderr
    kuberay = cli_here("render", QUICKSTART, "--target", "kuberay", "--out", str(tmp_path / "k"))
    assert kuberay.returncode == 0 and "no rayservice.yaml: give --serve-config FILE" in kuberay.stdout
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["raycluster.yaml", "rayjob.yaml"]


def rendered_at_repo(target: str) -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return rendered(load(), target)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("page", ["docs/delivery.md", "README.md"])
def test_docs_show_the_workflow_render_writes(at_repo, page):
    readme = (REPO / page).read_text()
    shown = readme.split("<!-- rendered: github")[1].split("```yaml\n", 1)[1].split("```\n<!-- /rendered -->")[0]
    assert shown == rendered(load(), "github")["raylab-acme-assistant.yml"]
